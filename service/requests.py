"""Turning HTTP input into engine requests: headers, bodies, limits. Shared by both APIs."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np
from fastapi import Request

from service.errors import BadRequest, PayloadTooLarge
from service.imaging import check_image_type, decode_base64, decode_image, media_type
from service.model import LoadedModel
from service.settings import Settings

DEADLINE_HEADER = {
    "name": "X-Deadline-Ms",
    "in": "header",
    "required": False,
    "schema": {"type": "number", "exclusiveMinimum": 0},
    "description": "time budget in ms from arrival (from X-Request-Start when given); "
    "absent: the server's default (if any)",
}
"""The X-Deadline-Ms header, as an OpenAPI parameter (both APIs read it)."""

REQUEST_START_HEADER = {
    "name": "X-Request-Start",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "example": "t=1796659200.123456"},
    "description": "when the client or a proxy in front took the request (`t=` and Unix "
    "time in seconds, milliseconds or microseconds): the deadline counts from then",
}
"""The X-Request-Start header, as an OpenAPI parameter (both APIs read it)."""

_EPOCH_MS_FROM = 1e11
"""Unix times at or above this are milliseconds (1e11 s is the year 5138)..."""
_EPOCH_US_FROM = 1e14
"""...and at or above this, microseconds (1e14 ms is the year 5138 too)."""


PRECISIONS = ["fp32", "int8"]
VIEWS = [1, 2]


def parse_json(body: bytes, what: str) -> Any:
    """A JSON document, or 400 (also for nesting too deep for the parser)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(f"{what} is not valid JSON") from None


def parse_deadline_ms(value: str | None, default: float | None) -> float | None:
    """X-Deadline-Ms: a positive, finite number of milliseconds."""
    if value is None:
        return default
    try:
        ms = float(value)
    except ValueError:
        raise BadRequest(f"X-Deadline-Ms must be a positive number of ms, got {value!r}") from None
    if not math.isfinite(ms) or ms <= 0:
        raise BadRequest(f"X-Deadline-Ms must be a positive number of ms, got {value!r}")
    return ms


def parse_request_start_s(value: str | None) -> float | None:
    """X-Request-Start: when the request was taken, in seconds since the Unix epoch, or
    None without the header. The value is `t=` and a Unix time (the `t=` may be left
    out) in seconds, milliseconds or microseconds, told apart by size as New Relic's
    agents do: nginx's `t=${msec}` (seconds, to the ms), Apache's `%t` (microseconds)."""
    if value is None:
        return None
    text = value.strip()
    number = text[2:] if text.startswith("t=") else text
    try:
        stamp = float(number)
    except ValueError:
        stamp = math.nan
    if not math.isfinite(stamp) or stamp <= 0:
        raise BadRequest(f"X-Request-Start must be t= and a Unix time, got {value!r}")
    if stamp >= _EPOCH_US_FROM:
        return stamp / 1e6
    if stamp >= _EPOCH_MS_FROM:
        return stamp / 1e3
    return stamp


def transit_ms(request_start: str | None, arrival_epoch_s: float) -> float | None:
    """Milliseconds from the X-Request-Start stamp to the request's arrival (at
    `arrival_epoch_s`, Unix time): time the request spent on its way (a proxy's queue, the
    network, a server loop that had not read it yet), which its deadline counts. None
    without the header; 0 for a stamp after the arrival (the two clocks disagree)."""
    start_s = parse_request_start_s(request_start)
    if start_s is None:
        return None
    return max(arrival_epoch_s - start_s, 0.0) * 1000.0


def noted_transit_ms(state: dict[str, Any], request_start: str | None, honor: bool) -> float | None:
    """The request's time on the way (`transit_ms`) when the server honours
    X-Request-Start (`honor`), worked out once per request and noted in its ASGI `state`
    for the arrival's judgement, the route, the metrics and the access log; None when not
    stamped."""
    if not honor:
        return None
    if "transit_ms" not in state:
        arrival_epoch_s = state.get("arrival_epoch_s") or time.time()  # set by the middleware
        state["transit_ms"] = transit_ms(request_start, arrival_epoch_s)
    noted: float | None = state["transit_ms"]
    return noted


def stamped_transit_ms(request: Request, settings: Settings) -> float | None:
    """`noted_transit_ms` for a route's request."""
    return noted_transit_ms(
        request.scope.setdefault("state", {}),
        request.headers.get("x-request-start"),
        settings.honor_request_start,
    )


def parse_column(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        column = int(value)
    except ValueError:
        raise BadRequest(f"X-Column must be a column number, got {value!r}") from None
    if column < 1:
        raise BadRequest(f"X-Column must be at least 1, got {column}")
    return column


def parse_precision(value: str | None) -> str:
    if value is None:
        return "fp32"
    if value not in PRECISIONS:
        raise BadRequest(f"X-Precision must be fp32 or int8, got {value!r}")
    return value


def parse_views(value: str | None) -> int:
    if value is None:
        return 1
    if value.strip() not in [str(v) for v in VIEWS]:
        raise BadRequest(f"X-Views must be 1 or 2, got {value!r}")
    return int(value)


def parse_confidence(value: str | float | None, name: str = "X-Min-Confidence") -> float | None:
    if value is None:
        return None
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= threshold <= 1.0:
        raise BadRequest(f"{name} must be a number in [0, 1], got {value!r}")
    return threshold


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise PayloadTooLarge(f"body of {declared} bytes is over the {limit} byte limit")
        except ValueError:
            raise BadRequest("invalid Content-Length") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is over the {limit} byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


INLINE_DECODE_PIXELS = 512 * 512
"""Images up to this many pixels in all are decoded on the event loop (a few ms at most);
larger ones in a worker thread, so they never stall other requests (health checks,
shedding) behind them. The hand-off to a thread costs more than a small image does. The
headers decide (`DecodeElsewhere`): what the loop decoded before a request's images
went over is wasted, and is at most this much."""


def images_from_body(
    body: bytes, content_type: str | None, model: LoadedModel, settings: Settings
) -> np.ndarray:
    """uint8 [N, H, W, 3] from raw image bytes or JSON {"image"} / {"images": [...]}."""
    return decode_images(encoded_images(body, content_type, settings), model, settings)


def encoded_images(body: bytes, content_type: str | None, settings: Settings) -> list[bytes]:
    """The still-encoded images of a body (its type, JSON shape, base64 and image count
    checked)."""
    if media_type(content_type) == "application/json":
        return _encoded_from_json(body, settings)
    check_image_type(content_type)
    return [body]


class DecodeElsewhere(Exception):
    """The images of a request hold more pixels than `decode_images` may decode here."""


def decode_images(
    encoded: list[bytes], model: LoadedModel, settings: Settings, max_pixels: float = math.inf
) -> np.ndarray:
    """uint8 [N, H, W, 3]. Raises DecodeElsewhere, once an image's header is read, when
    the images so far declare more than `max_pixels` in all: each image is opened once,
    whether it is then decoded here or the caller sends the lot to a thread."""
    spec = model.manifest.input
    declared = 0

    def admit(pixels: int) -> None:
        nonlocal declared
        declared += pixels
        if declared > max_pixels:
            raise DecodeElsewhere

    limit = settings.max_image_pixels
    return np.stack([decode_image(data, spec.height, spec.width, limit, admit) for data in encoded])


def _encoded_from_json(body: bytes, settings: Settings) -> list[bytes]:
    payload = parse_json(body, "body")
    if not isinstance(payload, dict):
        raise BadRequest('JSON body must be an object with "image" or "images"')
    if "image" in payload and "images" in payload:
        raise BadRequest('send either "image" or "images", not both')
    if "image" in payload:
        items = [payload["image"]]
    elif "images" in payload:
        items = payload["images"]
        if not isinstance(items, list) or not items:
            raise BadRequest('"images" must be a non-empty list of base64 strings')
    else:
        raise BadRequest('JSON body must have "image" or "images"')
    if len(items) > settings.max_images_per_request:
        raise PayloadTooLarge(
            f"{len(items)} images; the limit is {settings.max_images_per_request} per request"
        )
    return [decode_base64(item, f"images[{i}]") for i, item in enumerate(items)]
