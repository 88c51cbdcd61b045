"""Warm the request path before the server reports ready.

The models are warmed and profiled at load, but the first request through each route
still pays for what its libraries set up on first use: Pillow registers its image
plugins on the first decode (about 10 ms here), FastAPI reads each endpoint's source on
its first call (5-6 ms per route, for error context), and the inference thread runs its
first batch. Measured on a fresh server: 22-30 ms for the first classify request against
3-5 ms for the next ones, so the first burst of traffic after start-up missed deadlines
the server had predicted it would meet.

So, once the model is loaded and before uvicorn accepts connections, the app sends
itself one request of each kind (JPEG, PNG, JSON, a stream, the Open Inference
Protocol), in process through its own ASGI stack. They are marked in the ASGI scope's
state (`WARMUP_STATE_KEY`): the access log and the request metrics skip them, and the
engine counts no answer for them (`Engine.warming`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from starlette.types import ASGIApp, Message

log = logging.getLogger(__name__)

WARMUP_STATE_KEY = "warmup"


@dataclass(frozen=True)
class WarmupRequest:
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""


def _encoded(pixels: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def warmup_requests(model_name: str, height: int, width: int) -> list[WarmupRequest]:
    """One request of each kind a client may send, on a fixed random image."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    jpeg, png = _encoded(pixels, "JPEG"), _encoded(pixels, "PNG")
    as_json = json.dumps({"image": base64.b64encode(png).decode()}).encode()
    infer = {
        "inputs": [
            {
                "name": "images",
                "datatype": "UINT8",
                "shape": [1, height, width, 3],
                "data": pixels.ravel().tolist(),
            }
        ]
    }
    return [
        WarmupRequest("POST", "/v1/classify", (("content-type", "image/jpeg"),), jpeg),
        WarmupRequest("POST", "/v1/classify", (("content-type", "image/png"),), png),
        WarmupRequest("POST", "/v1/classify", (("content-type", "application/json"),), as_json),
        WarmupRequest(
            "POST",
            "/v1/classify",
            (("content-type", "image/png"), ("accept", "text/event-stream")),
            png,
        ),
        WarmupRequest(
            "POST",
            f"/v2/models/{model_name}/infer",
            (("content-type", "application/json"),),
            json.dumps(infer).encode(),
        ),
        WarmupRequest("GET", "/v1/models", ()),
    ]


async def call_app(app: ASGIApp, request: WarmupRequest) -> int:
    """Send `request` through `app` in process, marked as a warm-up; its status code."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.encode(), v.encode()) for k, v in request.headers]
        + [(b"content-length", str(len(request.body)).encode())],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
        "state": {WARMUP_STATE_KEY: True},
    }
    answered = asyncio.Event()
    body_sent = False
    status = 0

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await answered.wait()  # a streaming response listens for a disconnect meanwhile
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            answered.set()

    try:
        await app(scope, receive, send)
    finally:
        answered.set()
    return status


async def warm_up(app: ASGIApp, requests: list[WarmupRequest]) -> float:
    """Send every warm-up request in turn; the milliseconds it took. A failed warm-up
    request is logged, never fatal: it only means the first real one pays for it."""
    start = time.perf_counter()
    for request in requests:
        try:
            status = await call_app(app, request)
        except Exception:
            log.exception("warm-up request %s %s failed", request.method, request.path)
            continue
        if status != 200:
            log.warning("warm-up request %s %s answered %d", request.method, request.path, status)
    return (time.perf_counter() - start) * 1000.0
