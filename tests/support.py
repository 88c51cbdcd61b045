"""Test support shared by every test folder: free ports, test images, the server in a
thread of the test process or as a `fractal serve` subprocess, metrics and memory
readings, and a bounded traffic loop."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from fastapi import FastAPI
from PIL import Image

from service.app import create_app
from service.bundle import Variant, read_manifest, write_manifest
from service.engine import Engine
from service.settings import Settings

STARTUP_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def image_bytes(seed: int = 0, size: tuple[int, int] = (24, 20), fmt: str = "PNG") -> bytes:
    """Random RGB pixels of `size` (width, height), encoded as `fmt`."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def blank_png(width: int, height: int, rgb: bool = False) -> bytes:
    """A complete, valid black PNG of `width` x `height`, at one bit per pixel (or 8-bit
    RGB): the file is about 1/1000 of the pixels it decodes to (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    row = b"\x00" * (1 + (3 * width if rgb else (width + 7) // 8))  # filter byte, pixels
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, *((8, 2) if rgb else (1, 0)), 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def copy_with_accuracies(
    source: Path, dest: Path, accuracy: Callable[[Variant], float | None]
) -> Path:
    """A copy of bundle `source` at `dest` whose manifest gives each variant
    `accuracy(variant)`, so that which variant serves does not depend on training."""
    shutil.copytree(source, dest)
    manifest = read_manifest(dest)
    variants = tuple(v.model_copy(update={"accuracy": accuracy(v)}) for v in manifest.variants)
    write_manifest(dest, manifest.model_copy(update={"variants": variants}))
    return dest


def manifest_profile(bundle: Path) -> dict[str, dict[int, float]]:
    """The latency profile the exporter measured (in the manifest), as a fixed profile:
    realistic numbers without measuring at every start."""
    manifest = read_manifest(bundle)
    return {
        v.key: {int(n): ms for n, ms in v.latency.ms_by_batch.items()}
        for v in manifest.variants
        if v.latency is not None
    }


def metric_value(text: str, name: str, labels: str = "") -> float:
    """One sample of the Prometheus text `text` (`labels` as written, e.g. 'outcome="shed"')."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(wanted)


# -- in-thread server ------------------------------------------------------------------------
@dataclass
class ThreadServer:
    url: str
    app: FastAPI

    @property
    def engine(self) -> Engine:
        engine: Engine = self.app.state.engine
        return engine

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0, **kwargs)


@contextlib.contextmanager
def serve_in_thread(settings: Settings) -> Iterator[ThreadServer]:
    """uvicorn in a thread of this process, so that tests can reach into the engine."""
    app = create_app(settings)
    with serve_app_in_thread(app, settings.port) as url:
        yield ThreadServer(url, app)


@contextlib.contextmanager
def serve_app_in_thread(app: FastAPI, port: int) -> Iterator[str]:
    """Any app under uvicorn on 127.0.0.1:`port`, in a thread; its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# -- `fractal serve` as a subprocess ---------------------------------------------------------
def fractal_command() -> list[str]:
    """The installed `fractal` script next to this interpreter, else the module."""
    script = Path(sys.executable).with_name("fractal")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fractal.cli"]


@dataclass
class ProcessServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_mb(self) -> float:
        """Resident memory (VmRSS) of the server process."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
        raise RuntimeError("no VmRSS line")

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines (the server logs one JSON object per line)."""
        records = []
        for line in self.log_lines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10.0).text

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)


@contextlib.contextmanager
def serve_process(bundle: Path, log_path: Path, **env: str) -> Iterator[ProcessServer]:
    """`fractal serve --model BUNDLE --port P` with FRACTAL_* settings from `env`; stopped
    with SIGTERM (then killed if it hangs) when the block ends."""
    port = free_port()
    full_env = {
        **os.environ,
        "FRACTAL_LOG_JSON": "true",
        "FRACTAL_INTRA_OP_THREADS": "1",
        **env,
    }
    cmd = [*fractal_command(), "serve", "--model", str(bundle), "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    server = ProcessServer(url, process, log_path)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"fractal serve exited with {process.returncode}:\n"
                    + log_path.read_text(errors="replace")
                )
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/v2/health/ready", timeout=2.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("fractal serve did not become ready")
            time.sleep(0.1)
        yield server
    finally:
        stop_process(process, wait_s=60)


def stop_process(process: subprocess.Popen[bytes], wait_s: float) -> None:
    """SIGTERM a still-running process, wait up to `wait_s`, then kill it."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# -- bounded client traffic ------------------------------------------------------------------
@dataclass
class Outcome:
    """One request of a traffic loop: when it started and ended (monotonic seconds), and
    its status (0 for a transport error), body (parsed JSON or SSE events) and error."""

    start_s: float
    end_s: float
    status: int
    body: Any = None
    error: str | None = None


@dataclass
class Traffic:
    """Client threads sending `send(client)` in a loop until stopped (or `max_s` passes)."""

    url: str
    send: Callable[[httpx.Client], tuple[int, Any]]
    threads: int
    max_s: float = 60.0
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _loop(self) -> None:
        end = time.monotonic() + self.max_s
        with httpx.Client(base_url=self.url, timeout=30.0) as client:
            while not self._stop.is_set() and time.monotonic() < end:
                start = time.monotonic()
                try:
                    status, body = self.send(client)
                    outcome = Outcome(start, time.monotonic(), status, body)
                except httpx.HTTPError as exc:
                    outcome = Outcome(start, time.monotonic(), 0, error=repr(exc))
                with self._lock:
                    self.outcomes.append(outcome)

    def __enter__(self) -> Traffic:
        self._workers = [threading.Thread(target=self._loop) for _ in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def join(self) -> None:
        for worker in self._workers:
            worker.join(timeout=self.max_s + 30)

    def stop(self) -> None:
        """Send no more requests (those in flight finish)."""
        self._stop.set()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.join()


def read_sse(response: httpx.Response) -> list[tuple[str, Any]]:
    """(event, data) pairs of a text/event-stream response, read to its end."""
    events: list[tuple[str, Any]] = []
    kind = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: ") and kind is not None:
            events.append((kind, json.loads(line[len("data: ") :])))
    return events


MADE_REQUEST_ID = r"[0-9a-f]{12}-[0-9a-f]+"
"""The shape of a request id the server makes (a process prefix and a counter)."""
