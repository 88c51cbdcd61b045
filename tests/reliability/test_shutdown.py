"""Shutdown without loss: `fractal serve` under load gets SIGTERM. Readiness turns 503 at
once, new work gets 503 (reason draining) on new and old connections alike, requests and
streams in flight finish, and the process exits 0 within the grace period."""

from __future__ import annotations

import base64
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import (
    Outcome,
    Traffic,
    blank_png,
    image_bytes,
    read_sse,
    serve_process,
)

pytestmark = pytest.mark.slow

GRACE_S = 20.0
IMAGES = 32  # per request: enough work that requests are still in flight at SIGTERM


def batch_body() -> bytes:
    images = [base64.b64encode(image_bytes(seed)).decode() for seed in range(IMAGES)]
    return json.dumps({"images": images}).encode()


def plain(body: bytes) -> Any:
    def send(client: httpx.Client) -> tuple[int, Any]:
        r = client.post("/v1/classify", content=body, headers={"Content-Type": "application/json"})
        return r.status_code, r.json()

    return send


def stream(body: bytes) -> Any:
    """A progressive answer without a deadline: every column, one after the other."""

    def send(client: httpx.Client) -> tuple[int, Any]:
        with client.stream(
            "POST",
            "/v1/classify",
            content=body,
            headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
        ) as r:
            return r.status_code, read_sse(r) if r.status_code == 200 else r.read()

    return send


def decode_heavy_image(url: str, into: list[Outcome]) -> threading.Thread:
    """One request with a PNG of 16 M pixels (a fraction of a second to decode), sent in
    the background."""
    image = blank_png(4000, 4000, rgb=True)

    def send() -> None:
        with httpx.Client(base_url=url, timeout=30.0) as client:
            start = time.monotonic()
            r = client.post("/v1/classify", content=image, headers={"Content-Type": "image/png"})
            into.append(Outcome(start, time.monotonic(), r.status_code, r.json()))

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def probe(
    url: str,
    path: str,
    go: threading.Event,
    until: threading.Event,
    every_s: float,
    method: str = "GET",
    **kwargs: Any,
) -> list[Outcome]:
    """Requests on a fresh connection each time, from `go` until `until` is set."""
    seen = []
    fresh = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=url, timeout=10.0, limits=fresh) as client:
        go.wait()
        while not until.is_set():
            start = time.monotonic()
            try:
                r = client.request(method, path, **kwargs)
                seen.append(
                    Outcome(
                        start,
                        time.monotonic(),
                        r.status_code,
                        r.json(),
                        error=r.headers.get("retry-after"),
                    )
                )
            except httpx.TransportError as exc:
                seen.append(Outcome(start, time.monotonic(), 0, error=type(exc).__name__))
            time.sleep(every_s)
    return seen


def test_sigterm_drains_without_loss(bundle: Path, profile: Path, tmp_path: Path) -> None:
    body = batch_body()
    with serve_process(
        bundle,
        tmp_path / "server.log",
        FRACTAL_LATENCY_PROFILE_PATH=str(profile),
        FRACTAL_SHUTDOWN_GRACE_S=str(GRACE_S),
    ) as server:
        idle = httpx.Client(base_url=server.url, timeout=10.0)
        assert idle.get("/v2/health/ready").status_code == 200  # a kept-alive connection
        go, gone = threading.Event(), threading.Event()
        results: dict[str, list[Outcome]] = {}

        def watch(name: str, path: str, every_s: float, **kwargs: Any) -> threading.Thread:
            def run() -> None:
                results[name] = probe(server.url, path, go, gone, every_s, **kwargs)

            thread = threading.Thread(target=run)
            thread.start()
            return thread

        with (
            Traffic(server.url, plain(body), threads=8) as plains,
            Traffic(server.url, stream(body), threads=6) as streams,
        ):
            time.sleep(3.0)
            # One request still decoding its image when the signal comes: it arrived
            # before the drain, so it is served.
            decoding: list[Outcome] = []
            decoder = decode_heavy_image(server.url, decoding)
            time.sleep(0.1)
            plains.stop()  # nothing more is sent after this ...
            streams.stop()
            # ... and what was sent has reached the server (a body is written in well under
            # a millisecond on loopback; a longer wait lets a fast machine answer it all).
            time.sleep(0.02)
            probes = [
                watch("ready", "/v2/health/ready", 0.02),
                watch(
                    "new",
                    "/v1/classify",
                    0.05,
                    method="POST",
                    content=image_bytes(),
                    headers={"Content-Type": "image/png"},
                ),
            ]
            sigterm_s = time.monotonic()
            server.signal(signal.SIGTERM)
            go.set()
            time.sleep(0.05)
            old_connection = idle.post(
                "/v1/classify", content=image_bytes(), headers={"Content-Type": "image/png"}
            )
        decoder.join()
        code = server.process.wait(timeout=GRACE_S + 30)
        exited_s = time.monotonic()
        gone.set()
        for p in probes:
            p.join()
        idle.close()
        log = server.log_lines()

    sent = plains.outcomes + streams.outcomes + decoding
    in_flight = [o for o in sent if o.end_s > sigterm_s]
    streams_in_flight = [o for o in streams.outcomes if o.end_s > sigterm_s]
    drained_s = max(o.end_s for o in in_flight)
    cut = {str(o.error) for o in results["ready"] + results["new"] if not o.status}
    first_503 = min(o.end_s for o in results["ready"] if o.status == 503) - sigterm_s
    print(
        f"\nshutdown: {len(sent)} requests sent before SIGTERM, {len(in_flight)} in flight "
        f"at SIGTERM ({len(streams_in_flight)} streams), the last done "
        f"{drained_s - sigterm_s:.2f} s after it; readiness 503 after {first_503:.3f} s; "
        f"exit {code} after {exited_s - sigterm_s:.2f} s; "
        f"connections refused after the drain: {sorted(cut)}"
    )
    assert code == 0
    assert exited_s - sigterm_s < GRACE_S
    assert len(in_flight) >= 3 and streams_in_flight, "the test needs work in flight"

    # Zero lost: every request sent before SIGTERM got its whole answer.
    for o in plains.outcomes:
        assert o.status == 200 and len(o.body["predictions"]) == IMAGES, (o.status, o.error)
    assert [o.status for o in decoding] == [200]
    for o in streams.outcomes:
        assert o.status == 200, (o.status, o.error, o.body)
        kinds = [kind for kind, _ in o.body]
        assert kinds[-1] == "done" and kinds.count("prediction") == 4, kinds

    # Readiness is 503 once the signal is handled (the loop's next turn), until the socket
    # closes.
    ready = [o for o in results["ready"] if o.status and o.start_s > sigterm_s + 0.02]
    assert ready and all(o.status == 503 and o.body == {"ready": False} for o in ready)
    # New work on a new connection is a 503 JSON (the socket is still open) ...
    refused = [o for o in results["new"] if o.status]
    assert refused, "no new connection was answered during the drain"
    for o in refused:
        assert o.status == 503 and o.body["reason"] == "draining" and o.error == "1"
    # ... and so it is on a kept-alive connection.
    assert old_connection.status_code == 503
    assert old_connection.json()["reason"] == "draining"
    assert old_connection.headers["Retry-After"] == "1"
    # Once the last request in flight has finished, the socket closes: a connection made
    # then is refused (or reset, if it was still in the listen backlog), as for any server
    # that stops listening. Before that, every new connection got its answer.
    for o in results["ready"] + results["new"]:
        assert o.status or o.start_s > drained_s - 0.05, (o.error, o.start_s - drained_s)
    assert any("draining" in line for line in log)
