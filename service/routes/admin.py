"""`POST /admin/reload`: swap in the configured bundle or another under the models root.

Off (404) unless FRACTAL_ADMIN_TOKEN is set; the bearer token is compared in constant time.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request

from service.access import token_matches
from service.bundle import BundleError
from service.deps import EngineDep, SettingsDep, bearer_token
from service.errors import BadRequest, NotFound, Unauthorized, Unprocessable
from service.requests import parse_json, read_body

log = logging.getLogger(__name__)

router = APIRouter(prefix="/admin", tags=["admin"], include_in_schema=False)

_FOLDERS = re.compile(r"(?<![\w.:/~-])(?:/[^/\s'\"]+)+/")
"""The folders of an absolute path in a message (not a URL's: those follow `:/`)."""


def public_reason(exc: BundleError, path: Path) -> str:
    """Why a bundle was refused, naming the bundle folder by its name and files by theirs:
    server paths stay in the log."""
    return _FOLDERS.sub("", str(exc).replace(str(path), path.name))


def resolve_bundle(name: str | None, model_path: Path, models_root: Path | None) -> Path:
    """The folder to load: the configured path, or `name` directly under the models root."""
    if name is None:
        return model_path
    if models_root is None:
        raise BadRequest("no models root configured (FRACTAL_MODELS_ROOT)")
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise BadRequest("model must be a folder name under the models root")
    return models_root / name


@router.post("/reload")
async def reload(request: Request, engine: EngineDep, settings: SettingsDep) -> dict[str, Any]:
    if settings.admin_token is None:
        raise NotFound("not found")
    if not token_matches(bearer_token(request), (settings.admin_token.get_secret_value(),)):
        raise Unauthorized("missing or invalid admin token")
    body = await read_body(request, 64 * 1024)
    name = None
    if body.strip():
        payload = parse_json(body, 'body (JSON like {"model": "name"})')
        if not isinstance(payload, dict) or not isinstance(payload.get("model", ""), str):
            raise BadRequest('body must be JSON like {"model": "name"}')
        name = payload.get("model")
    path = resolve_bundle(name, settings.model_path, settings.models_root)
    try:
        model = await engine.load(path)
    except BundleError as exc:
        log.warning("reload refused, still serving the previous model: %s", exc)
        reason = public_reason(exc, path)
        raise Unprocessable(f"bundle refused, still serving the previous model: {reason}") from exc
    return {
        "loaded": model.name,
        "version": model.manifest.version,
        "variants": list(model.variants),
    }
