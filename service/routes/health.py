"""Liveness, readiness (Open Inference Protocol paths) and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import EngineDep
from service.jsonresponse import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/v2/health/live")
async def live() -> dict[str, Any]:
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(engine: EngineDep) -> Response:
    return JSONResponse({"ready": engine.ready}, status_code=200 if engine.ready else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
