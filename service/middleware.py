"""ASGI middleware: arrival time, request id, metrics and one JSON access-log line; and
the refusal at arrival of work an overloaded server cannot answer in time, which then
hands `/v1/classify` to its endpoint without routing.

Pure ASGI (not BaseHTTPMiddleware) so streaming responses pass through untouched and the
request is timed to its last byte (for a stream: the `done` event).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.access import Access
from service.engine import Engine
from service.errors import INTERNAL_ERROR, BadRequest, ServiceError, Unavailable, error_response
from service.jsonresponse import JSONResponse
from service.metrics import Metrics
from service.requests import noted_transit_ms, parse_deadline_ms
from service.warmup import WARMUP_STATE_KEY

access_log = logging.getLogger("service.access")
log = logging.getLogger(__name__)

CLASSIFY = "/v1/classify"
UNTIMED_PATHS = ("/metrics", "/v2/health/live", "/v2/health/ready")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
Endpoint = Callable[[Request], Awaitable[Response]]


_PROCESS_ID = uuid.uuid4().hex[:12]
_SEQUENCE = itertools.count(1)


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID when it is sane, else a fresh one: this process's random
    prefix and a counter (unique across replicas without a system call per request)."""
    for name, value in headers:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _REQUEST_ID.match(text):
                return text
    return f"{_PROCESS_ID}-{next(_SEQUENCE):x}"


class ObservabilityMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        log_json: bool = True,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.clock = clock
        self.log_json = log_json

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = self.clock()
        state: dict[str, Any] = scope.setdefault("state", {})
        state["arrival_s"] = start
        state["arrival_epoch_s"] = time.time()  # for X-Request-Start
        request_id = request_id_from(scope.get("headers", []))
        state["request_id"] = request_id
        status = 500
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = int(message["status"]), True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            # Answered here rather than by the server, which would also close the
            # connection: a bare 500 with the request id; the details go to the log.
            log.exception("request %s failed", request_id)
            if started:
                raise
            await JSONResponse(INTERNAL_ERROR, status_code=500)(scope, receive, send_wrapper)
        finally:
            self._record(scope, state, status, start)

    def _record(self, scope: Scope, state: dict[str, Any], status: int, start: float) -> None:
        path = scope.get("path", "")
        if path in UNTIMED_PATHS or state.get(WARMUP_STATE_KEY):
            return
        elapsed = self.clock() - start
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or state.get("endpoint", "unmatched")
        column = str(state.get("column", "none"))
        self.metrics.child(self.metrics.requests, endpoint, str(status)).inc()
        self.metrics.child(self.metrics.request_duration, endpoint, column).observe(elapsed)
        transit = state.get("transit_ms")
        if transit is not None:
            self.metrics.request_transit.observe(transit / 1000.0)
        if not access_log.isEnabledFor(logging.INFO):
            return
        record = {
            "request_id": state.get("request_id"),
            "method": scope.get("method"),
            "path": path,
            "status": status,
            "duration_ms": round(elapsed * 1000.0, 3),
            "column": column,
            "deadline_ms": state.get("deadline_ms"),
            "transit_ms": None if transit is None else round(transit, 3),
            "outcome": state.get("outcome"),
            "client": (scope.get("client") or ("", 0))[0],
        }
        if self.log_json:
            access_log.info(json.dumps(record))
        else:
            access_log.info(
                "%s %s %s %.1fms column=%s",
                record["method"],
                path,
                status,
                record["duration_ms"],
                column,
            )


class EarlyShedding:
    """Judges a `/v1/classify` request with a deadline at arrival, before its body is
    read: first access (`service.access.Access`: 401, 429), then whether the server can
    answer it in time (`Engine.shed_early`: 503 when the server already holds as many such
    requests as it answers in time, or when this one's deadline cannot be met).

    An overloaded server that reads and decodes every request before refusing most of them
    spends its time on refusals and answers nothing in time. (A `/v2` request may carry its
    deadline in the body: it is judged once parsed.) An admitted `/v1/classify` request
    then goes straight to `endpoint` when one is given (`_serve`).
    """

    def __init__(
        self,
        app: ASGIApp,
        engine: Engine,
        default_deadline_ms: float | None,
        access: Access,
        endpoint: Endpoint | None = None,
    ) -> None:
        self.app = app
        self.engine = engine
        self.default_deadline_ms = default_deadline_ms
        self.access = access
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Every HTTP request counts, refused ones too: an inference run may take the event
        # loop only when no other request is in the server (`run_on_loop`).
        self.engine.active_requests += 1
        try:
            await self._admit(scope, receive, send)
        finally:
            self.engine.active_requests -= 1

    async def _admit(self, scope: Scope, receive: Receive, send: Send) -> None:
        deadline = self._deadline(scope)
        if deadline is None:  # not judged here: the route checks (a bad header is a 400)
            await self._serve(scope, receive, send)
            return
        state = scope["state"]
        try:
            self._check_access(scope)
            stamp = header(scope, b"x-request-start")
            honor = self.engine.settings.honor_request_start
            transit = noted_transit_ms(state, stamp, honor)  # a bad stamp: 400
            self.engine.shed_early(state["arrival_s"], deadline, transit)
        except ServiceError as exc:
            # Answered before routing: name the endpoint for the metrics and the log.
            outcome = exc.reason if isinstance(exc, Unavailable) else None
            state.update(outcome=outcome, endpoint=CLASSIFY)
            await error_response(exc)(scope, receive, send)
            return
        with self.engine.admission.admitted() as release:
            state["release_admission"] = release
            await self._serve(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A `/v1/classify` request straight to its endpoint when one is given: FastAPI's
        routing, its exception middleware and the route's wrappers took about a tenth of
        the event loop's CPU a request (column 1 at 540 requests/s: 0.83-0.87 ms routed,
        0.72-0.73 direct), for nothing this endpoint uses: it takes only the request, its
        errors are `ServiceError`s, rendered here as their handler would, and anything else
        reaches `ObservabilityMiddleware`'s 500. Everything else is routed."""
        if self.endpoint is None or not is_classify(scope):
            await self.app(scope, receive, send)
            return
        scope["state"]["endpoint"] = CLASSIFY
        try:
            response = await self.endpoint(Request(scope, receive, send))
        except ServiceError as exc:
            response = error_response(exc)
        await response(scope, receive, send)

    def _check_access(self, scope: Scope) -> None:
        client = scope.get("client")
        self.access.check_once(
            scope["state"], header(scope, b"authorization") or "", client[0] if client else None
        )

    def _deadline(self, scope: Scope) -> float | None:
        """The deadline of a `/v1/classify` request (None for other requests, and for a
        bad header, which the route explains)."""
        if not is_classify(scope):
            return None
        try:
            return parse_deadline_ms(header(scope, b"x-deadline-ms"), self.default_deadline_ms)
        except BadRequest:
            return None


def is_classify(scope: Scope) -> bool:
    return bool(scope["method"] == "POST" and scope["path"] == CLASSIFY)


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header `name` (lower case) in an ASGI scope, else None."""
    value = next((v for k, v in scope["headers"] if k == name), None)
    return None if value is None else value.decode("latin-1")
