"""`/v1`: classify (JSON or Server-Sent Events) and model information."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.deps import EngineDep, admit_inference
from service.engine import Answer, ColumnAnswer, Engine, StreamEvent
from service.engine import Request as EngineRequest
from service.errors import INTERNAL_ERROR, NotFound, ServiceError
from service.jsonresponse import JSONResponse, dumps
from service.protocol import EVENT_STREAM
from service.requests import (
    DEADLINE_HEADER,
    INLINE_DECODE_PIXELS,
    PRECISIONS,
    REQUEST_START_HEADER,
    VIEWS,
    DecodeElsewhere,
    decode_images,
    encoded_images,
    parse_column,
    parse_confidence,
    parse_deadline_ms,
    parse_precision,
    parse_views,
    read_body,
    stamped_transit_ms,
)
from service.responses import answer_body, column_event, done_event, model_card
from service.routes.direct import DirectRoute
from service.sse import EventStreamResponse

router = APIRouter(prefix="/v1", tags=["v1"], route_class=DirectRoute)

CLASSIFY_BODY = {
    "parameters": [
        DEADLINE_HEADER,
        REQUEST_START_HEADER,
        {"name": "X-Column", "in": "header", "schema": {"type": "integer", "minimum": 1}},
        {"name": "X-Precision", "in": "header", "schema": {"type": "string", "enum": PRECISIONS}},
        {"name": "X-Views", "in": "header", "schema": {"type": "integer", "enum": VIEWS}},
        {
            "name": "X-Min-Confidence",
            "in": "header",
            "schema": {"type": "number", "minimum": 0, "maximum": 1},
        },
    ],
    "requestBody": {
        "required": True,
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "format": "byte"},
                        "images": {"type": "array", "items": {"type": "string", "format": "byte"}},
                    },
                }
            },
        },
    },
}


@router.post(
    "/classify",
    openapi_extra=CLASSIFY_BODY,
    responses={200: {"description": "the answer (JSON) or a text/event-stream"}},
)
async def classify(request: Request) -> Response:
    engine, settings = await admit_inference(request)
    state = request.state
    arrival = getattr(state, "arrival_s", engine.clock())
    headers = request.headers
    deadline = parse_deadline_ms(headers.get("x-deadline-ms"), settings.default_deadline_ms)
    column = parse_column(headers.get("x-column"))
    precision = parse_precision(headers.get("x-precision"))
    views = parse_views(headers.get("x-views"))
    threshold = parse_confidence(headers.get("x-min-confidence"))
    transit = stamped_transit_ms(request, settings)
    state.deadline_ms = deadline
    model = engine.current_model(arrival)
    body = await read_body(request, settings.max_body_bytes)
    encoded = encoded_images(body, headers.get("content-type"), settings)
    try:
        images = decode_images(encoded, model, settings, INLINE_DECODE_PIXELS)
    except DecodeElsewhere:
        images = await asyncio.to_thread(decode_images, encoded, model, settings)
    req = EngineRequest(images, arrival, deadline, column, precision, threshold, views, transit)
    if EVENT_STREAM in headers.get("accept", ""):
        return await _stream(request, engine, req)
    try:
        answer = await engine.classify(req)
    except ServiceError as exc:
        state.outcome = getattr(exc, "reason", "error")
        raise
    _note(request, answer)
    final = answer.final
    return JSONResponse(
        answer_body(answer, req.cascade_threshold),
        headers={
            "X-Fractal-Column": str(final.variant.column),
            "Server-Timing": server_timing(final, req.transit_ms),
        },
    )


def server_timing(final: ColumnAnswer, transit_ms: float | None) -> str:
    """The `Server-Timing` header: queue and inference, and the time on the way when the
    request was stamped (X-Request-Start)."""
    timing = f"queue;dur={final.queue_ms:.3f}, inference;dur={final.inference_ms:.3f}"
    return timing if transit_ms is None else f"{timing}, transit;dur={transit_ms:.3f}"


def _note(request: Request, answer: Answer) -> None:
    request.state.column = answer.final.variant.column
    request.state.outcome = "met" if answer.deadline_met else "missed"


def sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + dumps(data) + b"\n\n"


async def _stream(request: Request, engine: Engine, req: EngineRequest) -> Response:
    events: AsyncGenerator[StreamEvent, None] = engine.stream(req)
    try:
        first = await anext(events)  # a 503 here is still a plain JSON answer
    except ServiceError as exc:
        request.state.outcome = getattr(exc, "reason", "error")
        raise
    # Column 1 is answered; deeper columns use spare capacity only: the stream gives its
    # admission slot back instead of holding it until its deadline.
    release = getattr(request.state, "release_admission", None)
    if release is not None:
        release()

    async def body() -> AsyncGenerator[bytes, None]:
        event: StreamEvent | None = first
        try:
            while event is not None:
                yield _render(request, event, req.deadline_ms)
                event = await anext(events, None)
        except ServiceError as exc:
            yield sse("error", {"error": exc.message})
        except Exception:
            yield sse("error", INTERNAL_ERROR)
        finally:
            await events.aclose()

    return EventStreamResponse(body(), {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _render(request: Request, event: StreamEvent, deadline_ms: float | None) -> bytes:
    kind, item = event
    if isinstance(item, ColumnAnswer):
        request.state.column = item.variant.column
        return sse(kind, column_event(item, deadline_ms))
    assert isinstance(item, Answer)
    _note(request, item)
    return sse(kind, done_event(item))


@router.get("/models")
async def list_models(engine: EngineDep) -> dict[str, Any]:
    model = engine.model
    return {"models": [] if model is None else [_card(engine)]}


@router.get("/models/{name}")
async def get_model(name: str, engine: EngineDep) -> dict[str, Any]:
    if engine.model is None or engine.model.name != name:
        raise NotFound(f"no model named {name!r}")
    return _card(engine)


def _card(engine: Engine) -> dict[str, Any]:
    assert engine.model is not None
    depth = {v.key: engine.batcher.queued_for(v) for v in engine.model.variants.values()}
    return model_card(engine.model, depth, engine.ready)
