"""`fractal serve` as a real subprocess on 127.0.0.1, serving the tiny bundle, for the
demo page and `fractal classify` tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import free_port

STARTUP_TIMEOUT_S = 180.0


def fractal_command() -> list[str]:
    """The installed `fractal` script next to this interpreter, else the module."""
    script = Path(sys.executable).with_name("fractal")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fractal.cli"]


def wait_until_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"fractal serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail(f"fractal serve not ready after {STARTUP_TIMEOUT_S:.0f} s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def server_url(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a `fractal serve` subprocess; stopped (SIGTERM, drained) at the end."""
    port = free_port()
    log = tmp_path_factory.mktemp("web-server") / "server.log"
    # Default settings whatever the caller's environment says, except one onnxruntime
    # thread and a short start-up profile: the tests share the machine.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRACTAL_")}
    env |= {"FRACTAL_INTRA_OP_THREADS": "1", "FRACTAL_PROFILE_REPEATS": "3"}
    command = [
        *fractal_command(),
        "serve",
        "--model",
        str(tiny_bundle),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
