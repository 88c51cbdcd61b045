"""The app factory: `create_app(settings) -> FastAPI`. Nothing is built at import time.

The lifespan owns the long-lived parts: it loads, checks, warms and profiles the bundle,
starts the batcher workers, and stops them on exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.access import Access
from service.bundle import BundleError
from service.cpuslice import loop_slice
from service.engine import Engine
from service.errors import (
    ServiceError,
    http_error_handler,
    service_error_handler,
    unexpected_error_handler,
    validation_error_handler,
)
from service.metrics import Metrics
from service.middleware import EarlyShedding, ObservabilityMiddleware
from service.routes import admin, health, v1, v2
from service.runtime import gil_switch_interval
from service.settings import Settings
from service.warmup import warm_up, warmup_requests

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"


def read_tokens(settings: Settings) -> tuple[str, ...]:
    tokens = [t.get_secret_value() for t in settings.api_tokens]
    if settings.api_tokens_file is not None:
        lines = settings.api_tokens_file.read_text().splitlines()
        tokens += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return tuple(tokens)


def create_app(
    settings: Settings | None = None, clock: Callable[[], float] = time.monotonic
) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    engine = Engine(settings, metrics, clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with (
            gil_switch_interval(settings.gil_switch_interval_ms),
            loop_slice(settings.loop_slice_us),
        ):
            async with _serving(app, engine):
                yield

    app = FastAPI(
        title="FractalNet anytime inference",
        version="1",
        lifespan=lifespan,
        description="Deadline-aware classification with per-column FractalNet models.",
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = engine
    app.state.access = Access(
        read_tokens(settings), settings.rate_limit_per_s, settings.retry_after_s
    )

    app.add_exception_handler(ServiceError, service_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=["X-Fractal-Column", "Server-Timing", "X-Request-ID"],
        )
    app.add_middleware(
        EarlyShedding,
        engine=engine,
        default_deadline_ms=settings.default_deadline_ms,
        access=app.state.access,
        # Straight to the endpoint, unless CORS (inside this middleware) must see it.
        endpoint=None if settings.cors_origins else v1.classify,
    )
    app.add_middleware(
        ObservabilityMiddleware, metrics=metrics, clock=clock, log_json=settings.log_json
    )

    app.include_router(v1.router)
    app.include_router(v2.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            return Response("demo page not installed", media_type="text/plain", status_code=404)
        return FileResponse(page, media_type="text/html")

    return app


@asynccontextmanager
async def _serving(app: FastAPI, engine: Engine) -> AsyncIterator[None]:
    """Load the bundle, warm the request path, serve; drain and stop on the way out."""
    await engine.start()
    model = engine.model
    if model is not None:
        spec = model.manifest.input
        with engine.warming_up():
            ms = await warm_up(app, warmup_requests(model.name, spec.height, spec.width))
        log.info("request path warmed up in %.0f ms", ms)
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_sighup(engine)))
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
        log.debug("SIGHUP reload not available in this thread")
    try:
        yield
    finally:
        engine.begin_drain()
        await engine.stop()


async def _sighup(engine: Engine) -> None:
    try:
        model = await engine.load(engine.settings.model_path)
        log.info("SIGHUP: reloaded %s %s", model.name, model.manifest.version)
    except BundleError as exc:
        log.error("SIGHUP: bundle refused, still serving the previous model: %s", exc)
