"""The CPU image, built and run for real with buildah (slow).

No image registry is reachable here, so the base image is made locally: debootstrap
installs Debian bookworm (Python 3.11) with python3-venv, and the result is imported as
a local image and passed as the Dockerfile's BASE_IMAGE. That base is cached between
local runs (a tarball under ~/.cache/fractal and the image in container storage); CI
(CI=true) builds it afresh. The image is built with chroot isolation, which needs no
daemon and no user namespaces, then the server runs inside it on the host network, bound
to 127.0.0.1, and classifies an image; the image and its container are removed after.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from .local_services import classify, free_port, ready, running, tail, wait_for

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = "localhost/fractal-test-base:bookworm"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = "python3,python3-venv"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fractal"
BASE_TARBALL = CACHE / f"debian-{SUITE}-python3.tar"
# chroot isolation needs no daemon and no user namespaces; the docker format keeps
# HEALTHCHECK, which OCI image configs have no field for.
BUILDAH_BUD = ("buildah", "bud", "--isolation=chroot", "--format=docker")
BUILDAH_RUN = ("buildah", "run", "--isolation=chroot", "--network=host")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def run(command: Sequence[str], timeout_s: float, log: Path | None = None) -> str:
    """Run a command to completion; on failure show its output (or the log's tail)."""
    if log is None:
        result = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout_s)
        output = result.stdout + result.stderr
    else:
        with log.open("w") as out:
            result = subprocess.run(
                list(command), stdout=out, stderr=subprocess.STDOUT, text=True, timeout=timeout_s
            )
        output = tail(log)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output[-4000:]}"
    return result.stdout if log is None else ""


def image_exists(name: str) -> bool:
    result = subprocess.run(
        ["buildah", "inspect", "--type", "image", name], capture_output=True, timeout=60
    )
    return result.returncode == 0


def debootstrap_tarball(workdir: Path) -> None:
    """Debian with Python 3.11 and venv, as a rootfs tarball at BASE_TARBALL."""
    rootfs = workdir / "rootfs"
    debootstrap = ["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}"]
    run([*debootstrap, SUITE, str(rootfs), MIRROR], timeout_s=1200, log=workdir / "debootstrap.log")
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (rootfs / cache).glob("*"):
            if entry.is_file():
                entry.unlink()
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = BASE_TARBALL.with_suffix(".partial")
    run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."], timeout_s=600)
    partial.replace(BASE_TARBALL)
    shutil.rmtree(rootfs)


def ensure_base_image(workdir: Path) -> None:
    fresh = os.environ.get("CI") == "true"
    if not fresh and image_exists(BASE_IMAGE):
        return
    if fresh or not BASE_TARBALL.exists():
        debootstrap_tarball(workdir)
    # Replace, rather than leave a nameless copy of, an older base.
    subprocess.run(["buildah", "rmi", BASE_IMAGE], capture_output=True, timeout=120)
    container = run(["buildah", "from", "scratch"], timeout_s=60).strip()
    try:
        run(["buildah", "add", container, str(BASE_TARBALL), "/"], timeout_s=600)
        run(["buildah", "config", "--cmd", "python3", container], timeout_s=60)
        run(["buildah", "commit", "--quiet", container, BASE_IMAGE], timeout_s=600)
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True, timeout=60)


def ca_bundle() -> str | None:
    """The CA file pip should trust inside the build (an intercepting proxy's, if any)."""
    for candidate in (
        os.environ.get("PIP_CERT"),
        os.environ.get("SSL_CERT_FILE"),
        ssl.get_default_verify_paths().cafile,
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def image(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The CPU image, built on the local base with the test's tiny bundle baked in."""
    for tool in ("buildah", "debootstrap"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (Debian package {tool}; make system)")
    if os.geteuid() != 0:
        pytest.skip("building with buildah's chroot isolation and debootstrap needs root")
    bundle: Path = request.getfixturevalue("tiny_bundle")
    workdir = tmp_path_factory.mktemp("image")
    ensure_base_image(workdir)
    tag = f"localhost/fractal-anytime:test-{os.getpid()}"
    build = [*BUILDAH_BUD, f"--tag={tag}", f"--file={REPO / 'Dockerfile'}"]
    build += [f"--build-arg=BASE_IMAGE={BASE_IMAGE}", f"--build-context=bundle={bundle}"]
    ca = ca_bundle()
    if ca:
        build.append(f"--secret=id=ca-bundle,src={ca}")
    try:
        run([*build, str(REPO)], timeout_s=1200, log=workdir / "build.log")
        yield tag
    finally:
        subprocess.run(["buildah", "rmi", "--force", tag], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def config(image: str) -> dict[str, Any]:
    inspected = json.loads(run(["buildah", "inspect", "--type", "image", image], timeout_s=60))
    docker_config: dict[str, Any] = inspected["Docker"]["config"]
    return docker_config


@pytest.fixture
def container(image: str) -> Iterator[str]:
    name = f"fractal-test-{os.getpid()}"
    run(["buildah", "from", "--name", name, image], timeout_s=120)
    try:
        yield name
    finally:
        subprocess.run(["buildah", "rm", name], capture_output=True, timeout=120)


def in_container(container: str, *command: str, env: dict[str, str] | None = None) -> list[str]:
    """A `buildah run` command line: chroot isolation, host network, the image's user."""
    flags = [f"--env={key}={value}" for key, value in (env or {}).items()]
    return [*BUILDAH_RUN, *flags, container, "--", *command]


def test_image_config(config: dict[str, Any]) -> None:
    env = dict(entry.split("=", 1) for entry in config["Env"])
    assert env["FRACTAL_MODEL_PATH"] == "/models/default"
    assert env["FRACTAL_HOST"] == "0.0.0.0"
    assert config["User"].split(":")[0] not in ("", "0", "root")
    assert config["Entrypoint"] == ["fractal", "serve"]
    assert "8000/tcp" in config["ExposedPorts"]
    assert "/v2/health/ready" in " ".join(config["Healthcheck"]["Test"])


def test_image_has_no_torch_and_no_sources(container: str) -> None:
    check = (
        "import importlib.util as u, pathlib as p; "
        "assert u.find_spec('onnxruntime') and u.find_spec('service.app'); "
        "assert u.find_spec('torch') is None, 'torch in the serving image'; "
        "assert not p.Path('/src').exists(); "
        "assert p.Path('/models/default/manifest.json').is_file()"
    )
    run(in_container(container, "python", "-c", check), timeout_s=120)


def test_server_in_the_image_classifies(
    container: str, config: dict[str, Any], tmp_path: Path
) -> None:
    port = free_port()
    env = {"FRACTAL_HOST": "127.0.0.1", "FRACTAL_PORT": str(port)}
    log = tmp_path / "server.log"
    with running(in_container(container, *config["Entrypoint"], env=env), log) as process:
        url = f"http://127.0.0.1:{port}"
        wait_for(ready(f"{url}/v2/health/ready"), 180, "fractal serve in the image", process, log)

        healthcheck = config["Healthcheck"]["Test"]
        assert healthcheck[0] == "CMD"
        run(in_container(container, *healthcheck[1:], env=env), timeout_s=60)

        response = classify(url, deadline_ms=5000)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["model"] and 1 <= answer["column"] <= answer["columns"]
        assert 0 <= answer["class_index"] < 10 and answer["deadline_met"] is True
