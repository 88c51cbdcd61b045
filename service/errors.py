"""Errors that carry their HTTP status, and the one handler that renders them as JSON."""

from __future__ import annotations

from typing import Any, ClassVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.jsonresponse import JSONResponse


class ServiceError(Exception):
    status_code = 500
    headers: ClassVar[dict[str, str] | None] = None

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    retry_headers: dict[str, str] | None = None

    def response_headers(self) -> dict[str, str] | None:
        return self.retry_headers or self.headers

    def body(self) -> dict[str, Any]:
        return {"error": self.message, **self.extra}


class BadRequest(ServiceError):
    status_code = 400


class Unauthorized(ServiceError):
    status_code = 401
    headers: ClassVar[dict[str, str] | None] = {"WWW-Authenticate": "Bearer"}


class NotFound(ServiceError):
    status_code = 404


class PayloadTooLarge(ServiceError):
    status_code = 413


class UnsupportedMediaType(ServiceError):
    status_code = 415


class Unprocessable(ServiceError):
    status_code = 422


class Unavailable(ServiceError):
    """503 with Retry-After: shed for the deadline, a full queue, draining, not ready."""

    status_code = 503

    def __init__(self, message: str, reason: str, retry_after_s: int) -> None:
        super().__init__(message, reason=reason)
        self.reason = reason
        self.retry_headers = {"Retry-After": str(retry_after_s)}


class TooManyRequests(ServiceError):
    status_code = 429

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_headers = {"Retry-After": str(retry_after_s)}


def error_response(exc: ServiceError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.response_headers())


async def service_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc)


async def http_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse(
        {"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
    )


async def validation_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
        for e in exc.errors()
    )
    return JSONResponse({"error": f"invalid request: {problems}"}, status_code=422)


INTERNAL_ERROR = {"error": "internal error"}
"""The whole body of a 500: never a stack trace or an internal path (the log has those)."""


async def unexpected_error_handler(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(INTERNAL_ERROR, status_code=500)
