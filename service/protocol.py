"""The client side of the server's HTTP API (docs/api.md): request headers, answers, SSE.

Shared by `fractal classify`, the load generator and the Locust file, so all send the same
requests and read answers the same way.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

CLASSIFY_PATH = "/v1/classify"
MODELS_PATH = "/v1/models"
LIVE_PATH = "/v2/health/live"
READY_PATH = "/v2/health/ready"
EVENT_STREAM = "text/event-stream"


def classify_headers(
    content_type: str,
    deadline_ms: float | None,
    column: int | None,
    stream: bool,
    request_id: str | None = None,
    request_start_s: float | None = None,
) -> dict[str, str]:
    """Headers for one POST /v1/classify (a NaN or None deadline sends no header).
    `request_start_s` (Unix time, seconds) is when the request is sent: the server counts
    the deadline from then (X-Request-Start), the time on the way included."""
    headers = {"Content-Type": content_type}
    if request_id is not None:
        headers["X-Request-ID"] = request_id
    if request_start_s is not None:
        headers["X-Request-Start"] = f"t={request_start_s:.6f}"
    if deadline_ms is not None and not math.isnan(deadline_ms):
        headers["X-Deadline-Ms"] = f"{deadline_ms:.3f}"
    if column is not None:
        headers["X-Column"] = str(column)
    if stream:
        headers["Accept"] = EVENT_STREAM
    return headers


@dataclass(frozen=True)
class Answer:
    """What one request got back: the answering column and class, or why not."""

    column: int | None = None
    class_name: str | None = None
    error: str | None = None
    server_ms: float | None = None
    """The server's own elapsed time, arrival to answer by its clock (`elapsed_ms`)."""


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def answer_from_json(payload: Any, server_ms: Any = None) -> Answer:
    """The answer in a 200 body (or in a stream's `final` prediction, whose elapsed time
    the `done` event carries beside it: `server_ms`)."""
    if not isinstance(payload, dict) or "class_name" not in payload:
        return Answer(error="answer without class_name")
    column = payload.get("column")
    return Answer(
        column=int(column) if isinstance(column, int | float) else None,
        class_name=str(payload["class_name"]),
        server_ms=_number(payload.get("elapsed_ms") if server_ms is None else server_ms),
    )


def server_timing(header: str | None) -> dict[str, float]:
    """The durations (ms) of a `Server-Timing` header ("queue;dur=0.4, inference;dur=1.2");
    metrics without a readable `dur` are left out."""
    timings: dict[str, float] = {}
    for metric in (header or "").split(","):
        name, *params = (part.strip() for part in metric.split(";"))
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "dur" and name:
                with contextlib.suppress(ValueError):
                    timings[name] = float(value.strip().strip('"'))
    return timings


def error_text(status: int, body: bytes) -> str:
    """Short text for a non-2xx answer: the 503 `reason` or the `error` field."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        payload = None
    if isinstance(payload, dict):
        if status == 503 and "reason" in payload:
            return f"shed:{payload['reason']}"
        if "error" in payload:
            return f"{status}:{str(payload['error'])[:120]}"
    return f"{status}"


@dataclass(frozen=True)
class Event:
    name: str
    data: str


class SseParser:
    """Server-Sent Events from lines (without line endings), per the WHATWG format."""

    def __init__(self) -> None:
        self._name = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> Iterator[Event]:
        if line == "":
            if self._data:
                yield Event(self._name, "\n".join(self._data))
            self._name, self._data = "message", []
            return
        if line.startswith(":"):
            return
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._name = value
        elif field == "data":
            self._data.append(value)


def parse_sse(lines: Iterable[str]) -> list[Event]:
    parser = SseParser()
    events = [e for line in lines for e in parser.feed(line)]
    return events + list(parser.feed(""))


def answer_from_done(event: Event) -> Answer:
    """The final answer carried by a `done` event."""
    try:
        payload = json.loads(event.data)
    except ValueError:
        return Answer(error="done event is not JSON")
    if not isinstance(payload, dict):
        return Answer(error="done event is not an object")
    return answer_from_json(payload.get("final"), payload.get("elapsed_ms"))


def answer_from_error(event: Event) -> Answer:
    try:
        payload = json.loads(event.data)
    except ValueError:
        payload = None
    text = payload.get("error") if isinstance(payload, dict) else event.data
    return Answer(error=f"stream:{str(text)[:120]}")


NO_DONE = Answer(error="stream ended without a done event")


def after_event(answer: Answer, event: Event) -> Answer:
    """A stream's answer so far, after one more event (`done` or `error` change it)."""
    if event.name == "done":
        return answer_from_done(event)
    if event.name == "error":
        return answer_from_error(event)
    return answer


def stream_answer(lines: Iterable[str]) -> Answer:
    """The answer of a whole SSE body, given as lines."""
    answer = NO_DONE
    for event in parse_sse(lines):
        answer = after_event(answer, event)
    return answer


def column_count(models_payload: Any) -> int:
    """Columns of the first model in a GET /v1/models answer."""
    models = models_payload.get("models") if isinstance(models_payload, dict) else None
    if not models:
        raise ValueError("GET /v1/models listed no model")
    variants = models[0].get("variants") or []
    columns = [int(v["column"]) for v in variants if "column" in v]
    if not columns:
        raise ValueError("GET /v1/models: the first model has no variants")
    return max(columns)


def model_classes(models_payload: Any) -> tuple[str, ...]:
    """Class names of the first model in a GET /v1/models answer (empty if not given)."""
    models = models_payload.get("models") if isinstance(models_payload, dict) else None
    return tuple(str(c) for c in (models[0].get("classes") or ())) if models else ()
