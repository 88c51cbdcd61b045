# syntax=docker/dockerfile:1
# The CPU serving image: `fractal serve` with onnxruntime (the `cpu` extra), no torch.
#
#   docker build -t fractal-anytime:cpu .
#   docker run --rm -p 8000:8000 fractal-anytime:cpu
#
# BASE_IMAGE must be a Debian-like image with python3 (>= 3.11) and its venv module; the
# build and runtime stages share it, so the virtualenv's interpreter link stays valid.
# The default bundle is models/cifar10 from the build context, baked at /models/default;
# give another with `--build-context bundle=DIR`, or mount one over /models/default.
# Where pip must trust an extra CA (an intercepting proxy), pass it as a build secret:
# `--secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt`; it is never stored.
# docs/deploy.md has the rest.
ARG BASE_IMAGE=python:3.11-slim

FROM scratch AS bundle
COPY models/cifar10/ /

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY fractal/ fractal/
COPY service/ service/
COPY model/ model/
COPY loadtest/ loadtest/
# A plain (non-editable) install, so the runtime stage needs only /opt/venv.
RUN --mount=type=secret,id=ca-bundle,target=/run/secrets/ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
    && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt ".[cpu]"

FROM ${BASE_IMAGE} AS runtime
# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --gid 10001 fractal \
    && useradd --uid 10001 --gid fractal --no-create-home --home-dir /tmp --shell /usr/sbin/nologin fractal
COPY --from=build /opt/venv /opt/venv
COPY --from=bundle / /models/default
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FRACTAL_MODEL_PATH=/models/default \
    FRACTAL_HOST=0.0.0.0 \
    FRACTAL_PORT=8000
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
# Start-up loads every column and profiles its latency before it reports ready.
HEALTHCHECK --interval=15s --timeout=3s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('FRACTAL_PORT', '8000') + '/v2/health/ready', timeout=2)"]
ENTRYPOINT ["fractal", "serve"]
