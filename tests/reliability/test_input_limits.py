"""Limits on what a request may carry, and bad input on both APIs: each refused with a
clear 4xx JSON error. (Bad headers, bad bodies, a truncated PNG and too many images on
`/v1`, and bad tensors on `/v2`, are in tests/service.)"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service.settings import Settings
from tests.support import (
    ThreadServer,
    blank_png,
    image_bytes,
    serve_in_thread,
)

SMALL = {"max_body_bytes": 64 * 1024, "max_image_pixels": 1_000_000, "max_images_per_request": 4}


@pytest.fixture(scope="module")
def small(make_settings: Callable[..., Settings]) -> Iterator[ThreadServer]:
    """A server with small limits, so that going over them is cheap."""
    with serve_in_thread(make_settings(**SMALL)) as server:
        yield server


def error_of(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    message = r.json()["error"]
    assert isinstance(message, str) and message
    return message


def v2_body(n: int = 1, **tensor: Any) -> dict[str, Any]:
    spec = {
        "name": "images",
        "shape": [n, 16, 16, 3],
        "datatype": "UINT8",
        "data": [0] * (768 * n),
        **tensor,
    }
    return {"inputs": [spec]}


# -- body size -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/v1/classify", "image/png"),
        ("/v1/classify", "application/json"),
        ("/v2/models/tiny/infer", "application/json"),
    ],
)
def test_body_over_the_limit_is_413(small: ThreadServer, path: str, content_type: str) -> None:
    body = b" " * (SMALL["max_body_bytes"] + 1)
    with small.client() as c:
        message = error_of(c.post(path, content=body, headers={"Content-Type": content_type}), 413)
    assert str(SMALL["max_body_bytes"]) in message


def test_chunked_body_over_the_limit_is_413(small: ThreadServer) -> None:
    """Without Content-Length, the body is counted as it arrives."""
    sent = []

    def chunks() -> Iterator[bytes]:
        for _ in range(32):  # 128 KiB in all: twice the limit
            sent.append(4096)
            yield b"\x00" * 4096

    with small.client() as c:
        r = c.post("/v1/classify", content=chunks(), headers={"Content-Type": "image/png"})
    assert "content-length" not in r.request.headers
    assert r.request.headers["transfer-encoding"] == "chunked"
    error_of(r, 413)


def test_declared_length_over_the_limit_is_refused_before_the_body(live: ThreadServer) -> None:
    """A Content-Length of a terabyte is answered at once, without waiting for the body."""
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        start = time.monotonic()
        s.sendall(
            b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 1000000000000\r\n\r\n"
        )
        reply = s.recv(65536)
        assert time.monotonic() - start < 5
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b'"error"' in body


# -- image size and decompression bombs ------------------------------------------------------
def test_image_over_the_pixel_limit_is_413(live: ThreadServer) -> None:
    image = blank_png(5000, 5000)  # 25 M pixels, over the default 16 M, in a few kB
    assert len(image) < 10_000
    with live.client() as c:
        raw = c.post("/v1/classify", content=image, headers={"Content-Type": "image/png"})
        listed = c.post("/v1/classify", json={"images": [base64.b64encode(image).decode()]})
    assert "5000x5000" in error_of(raw, 413)
    assert "5000x5000" in error_of(listed, 413)


def test_decompression_bomb_is_413(live: ThreadServer) -> None:
    """A real PNG of 20000 x 20000 (400 M pixels, 1.2 GB as RGB) in about 50 kB."""
    bomb = blank_png(20_000, 20_000)
    assert len(bomb) < 100_000
    with live.client() as c:
        started = time.monotonic()
        r = c.post("/v1/classify", content=bomb, headers={"Content-Type": "image/png"})
        assert time.monotonic() - started < 5  # refused from the header, never decoded
    error_of(r, 413)


def test_pixel_limit_is_a_setting(small: ThreadServer) -> None:
    with small.client() as c:
        r = c.post(
            "/v1/classify", content=blank_png(1001, 1000), headers={"Content-Type": "image/png"}
        )
        assert "1000000" in error_of(r, 413)
        ok = c.post(
            "/v1/classify", content=blank_png(1000, 1000), headers={"Content-Type": "image/png"}
        )
    assert ok.status_code == 200


def test_heavy_decoding_does_not_stall_the_server(live: ThreadServer) -> None:
    """Images are decoded off the event loop: while one request decodes 16 M-pixel PNGs
    (a large fraction of a second of CPU each), health checks are answered at once."""
    heavy = base64.b64encode(blank_png(4000, 4000, rgb=True)).decode()
    statuses: list[int] = []

    def send() -> None:
        with live.client() as c:
            statuses.append(c.post("/v1/classify", json={"images": [heavy] * 4}).status_code)

    worker = threading.Thread(target=send)
    worker.start()
    time.sleep(0.3)  # the body is in; decoding has begun
    with live.client() as c:
        started = time.monotonic()
        assert c.get("/v2/health/live").status_code == 200
        waited = time.monotonic() - started
    worker.join(timeout=60)
    assert statuses == [200]
    assert waited < 0.5, f"health waited {waited:.2f} s behind image decoding"


# -- content type and undecodable bodies -----------------------------------------------------
@pytest.mark.parametrize("content_type", [None, "application/xml", "multipart/form-data"])
def test_unsupported_content_type_is_415(live: ThreadServer, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    with live.client() as c:
        r = c.post("/v1/classify", content=image_bytes(), headers=headers)
    assert "Content-Type" in error_of(r, 415)


def tiff_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(buf, format="TIFF")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (image_bytes(fmt="JPEG", size=(64, 64))[:300], "image/jpeg"),  # truncated JPEG
        (image_bytes(fmt="GIF")[:40], "image/gif"),  # truncated GIF
        (tiff_bytes(), "application/octet-stream"),  # a format the server does not decode
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "image/png"),  # a PNG signature, then nothing
    ],
)
def test_undecodable_image_is_400(live: ThreadServer, content: bytes, content_type: str) -> None:
    with live.client() as c:
        r = c.post("/v1/classify", content=content, headers={"Content-Type": content_type})
    assert "decode" in error_of(r, 400)


@pytest.mark.parametrize(
    "payload",
    [
        {"image": "abc"},  # bad padding
        {"image": 12},
        {"image": None},
        {"images": ["aGVsbG8=", None]},
        {"images": "aGVsbG8="},
        {"image": "aGVs bG8="},  # whitespace inside
    ],
)
def test_bad_base64_is_400(live: ThreadServer, payload: dict[str, Any]) -> None:
    with live.client() as c:
        error_of(c.post("/v1/classify", json=payload), 400)


@pytest.mark.parametrize("path", ["/v1/classify", "/v2/models/tiny/infer"])
def test_json_nested_too_deep_is_400(live: ThreadServer, path: str) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    with live.client() as c:
        r = c.post(path, content=body, headers={"Content-Type": "application/json"})
    assert "JSON" in error_of(r, 400)


# -- /v2 tensors and parameters --------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        v2_body(shape=[1, 16, 16]),
        v2_body(shape=[True, 16, 16, 3]),
        v2_body(shape=[0, 16, 16, 3], data=[]),
        v2_body(shape="1,16,16,3"),
        v2_body(datatype="FP32", data=[float("nan")] + [0] * 767),
        v2_body(datatype="FP32", data=[-1] + [0] * 767),
        v2_body(data=[0.5] * 768),
        v2_body(data=["x"] * 768),
        v2_body(data=[[0, 0]] * 384 + [[0]]),
        v2_body(parameters=[1]),
        {"inputs": [v2_body()["inputs"][0], v2_body()["inputs"][0]]},
        {"inputs": "images"},
        {**v2_body(), "outputs": [{"name": ["probabilities"]}]},
        {**v2_body(), "outputs": [{"name": "logits"}]},
        {**v2_body(), "outputs": "probabilities"},
        {**v2_body(), "parameters": "fast"},
    ],
)
def test_bad_v2_requests_are_400(live: ThreadServer, body: dict[str, Any]) -> None:
    with live.client() as c:
        error_of(
            c.post(
                "/v2/models/tiny/infer",
                content=json.dumps(body),
                headers={"Content-Type": "application/json"},
            ),
            400,
        )


@pytest.mark.parametrize(
    "parameters",
    [
        {"deadline_ms": "soon"},
        {"deadline_ms": -1},
        {"deadline_ms": 0},
        {"deadline_ms": "nan"},
        {"timeout": "soon"},
        {"timeout": -5},
        {"min_confidence": 2},
        {"min_confidence": "sure"},
        {"column": "two"},
        {"column": True},
        {"column": 0},
        {"column": 1.5},
    ],
)
def test_bad_v2_parameters_are_400(live: ThreadServer, parameters: dict[str, Any]) -> None:
    with live.client() as c:
        error_of(c.post("/v2/models/tiny/infer", json={**v2_body(), "parameters": parameters}), 400)


@pytest.mark.parametrize("value", ["abc", "-1", "0", "inf"])
def test_bad_deadline_header_on_v2_is_400(live: ThreadServer, value: str) -> None:
    with live.client() as c:
        r = c.post("/v2/models/tiny/infer", json=v2_body(), headers={"X-Deadline-Ms": value})
    assert "X-Deadline-Ms" in error_of(r, 400)


def binary_request(
    header: dict[str, Any], tensor: bytes, length: str | None = None
) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + tensor, {
        "Inference-Header-Content-Length": length or str(len(head)),
        "Content-Type": "application/octet-stream",
    }


@pytest.mark.parametrize(
    ("size", "length"),
    [
        (768.0, None),  # a float where a byte count belongs
        (767, None),
        (768, "abc"),
        (768, "999999"),
        (768, "-1"),
    ],
)
def test_bad_binary_tensors_are_400(live: ThreadServer, size: Any, length: str | None) -> None:
    header = {
        "inputs": [
            {
                "name": "images",
                "shape": [1, 16, 16, 3],
                "datatype": "UINT8",
                "parameters": {"binary_data_size": size},
            }
        ]
    }
    body, headers = binary_request(header, b"\x00" * 768, length)
    with live.client() as c:
        error_of(c.post("/v2/models/tiny/infer", content=body, headers=headers), 400)


def test_v2_batch_over_the_limit_is_413(small: ThreadServer) -> None:
    with small.client() as c:
        r = c.post("/v2/models/tiny/infer", json=v2_body(5))
    assert "limit is 4" in error_of(r, 413)
