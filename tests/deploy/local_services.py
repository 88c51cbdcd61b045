"""Processes the deployment tests run on 127.0.0.1: the server, Prometheus, containers.

Every wait is bounded, every process is stopped by its own pid, and every log goes to a
file whose tail is shown when something does not come up.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import httpx

from tests.support import free_port, stop_process

T = TypeVar("T")


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for(
    probe: Callable[[], T | None],
    timeout_s: float,
    what: str,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> T:
    """Call `probe` until it returns something other than None, or fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = probe()
        except httpx.HTTPError:
            result = None
        if result is not None:
            return result
        if process is not None and process.poll() is not None:
            raise AssertionError(
                f"{what}: the process exited with {process.returncode}\n{tail(log) if log else ''}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what}: not within {timeout_s:.0f} s\n{tail(log) if log else ''}"
            )
        time.sleep(0.25)


def ready(url: str) -> Callable[[], bool | None]:
    """A probe that is True once `url` answers 200."""

    def probe() -> bool | None:
        return True if httpx.get(url, timeout=2).status_code == 200 else None

    return probe


@contextmanager
def running(command: Sequence[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run `command` with its output in `log`; terminate it (then kill) on exit."""
    with log.open("wb") as out:
        process = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            stop_process(process, wait_s=30)


@contextmanager
def fractal_server(bundle: Path, log: Path, timeout_s: float = 120) -> Iterator[str]:
    """`fractal serve` on a free loopback port; yields its base URL once it is ready."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "fractal.cli",
        "serve",
        "--model",
        str(bundle),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with running(command, log) as process:
        url = f"http://127.0.0.1:{port}"
        wait_for(ready(f"{url}/v2/health/ready"), timeout_s, "fractal serve", process, log)
        yield url


def png_bytes(size: tuple[int, int] = (40, 30)) -> bytes:
    """A small, deterministic RGB PNG."""
    from PIL import Image

    image = Image.new("RGB", size)
    image.putdata(
        [((7 * i) % 256, (13 * i) % 256, (29 * i) % 256) for i in range(size[0] * size[1])]
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def classify(url: str, deadline_ms: float | None = None) -> httpx.Response:
    headers = {"Content-Type": "image/png"}
    if deadline_ms is not None:
        headers["X-Deadline-Ms"] = str(deadline_ms)
    return httpx.post(f"{url}/v1/classify", content=png_bytes(), headers=headers, timeout=30)
