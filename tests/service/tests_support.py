"""Helpers for service tests: test images and an SSE reader."""

from __future__ import annotations

import io
import json
from typing import Any

import httpx
import numpy as np
from PIL import Image


def png_bytes(seed: int = 0, size: tuple[int, int] = (24, 20)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def read_sse(url: str, image: bytes, headers: dict[str, str]) -> list[tuple[str, Any]]:
    """All (event, data) pairs of one progressive answer."""
    events: list[tuple[str, Any]] = []
    with (
        httpx.Client(timeout=10) as c,
        c.stream(
            "POST",
            f"{url}/v1/classify",
            content=image,
            headers={"Content-Type": "image/png", "Accept": "text/event-stream", **headers},
        ) as r,
    ):
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: ") and kind is not None:
                events.append((kind, json.loads(line[len("data: ") :])))
    return events
