"""Hygiene: no stack trace or internal path in any error, CORS off unless configured,
request ids in the access log and on every response, and a dependency audit."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.app import create_app
from service.logs import JsonFormatter
from service.middleware import EarlyShedding
from service.routes import v1
from service.settings import Settings
from tests.support import (
    MADE_REQUEST_ID,
    ThreadServer,
    image_bytes,
    read_sse,
    serve_in_thread,
)

SECRET = "/srv/secret/path/model.onnx"


@pytest.fixture
def failing_column_2(live: ThreadServer) -> Iterator[None]:
    """Column 2 raises, with an internal path in its message, until the test ends."""
    assert live.engine.model is not None
    variant = live.engine.model.variants["column_2"]

    def boom(images: np.ndarray) -> np.ndarray:
        raise RuntimeError(f"onnxruntime failed reading {SECRET}")

    original = variant.run
    variant.run = boom  # type: ignore[method-assign]
    try:
        yield
    finally:
        variant.run = original  # type: ignore[method-assign]


def assert_private(text: str) -> None:
    assert SECRET not in text and "Traceback" not in text and "RuntimeError" not in text


@pytest.mark.usefixtures("failing_column_2")
def test_internal_error_is_a_bare_500(live: ThreadServer, caplog: pytest.LogCaptureFixture) -> None:
    with live.client() as c, caplog.at_level(logging.INFO):
        r = c.post(
            "/v1/classify",
            content=image_bytes(),
            headers={"Content-Type": "image/png", "X-Column": "2", "X-Request-ID": "err-1"},
        )
        v2 = c.post(
            "/v2/models/tiny/infer",
            json={
                "inputs": [
                    {
                        "name": "images",
                        "shape": [1, 16, 16, 3],
                        "datatype": "UINT8",
                        "data": [0] * 768,
                    }
                ],
                "parameters": {"column": 2},
            },
        )
        assert c.get("/v2/health/ready").status_code == 200  # the server lives on
    for response in (r, v2):
        assert response.status_code == 500
        assert response.json() == {"error": "internal error"}
        assert_private(response.text)
    assert r.headers["X-Request-ID"] == "err-1"
    # The details are in the log, under the request's id.
    assert any(SECRET in (rec.exc_text or "") + rec.getMessage() for rec in caplog.records)
    access = [
        json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "service.access"
    ]
    assert {"request_id": "err-1", "status": 500} in [
        {"request_id": a["request_id"], "status": a["status"]} for a in access
    ]


@pytest.mark.usefixtures("failing_column_2")
def test_internal_error_in_a_stream_is_an_error_event(live: ThreadServer) -> None:
    with (
        live.client() as c,
        c.stream(
            "POST",
            "/v1/classify",
            content=image_bytes(),
            headers={"Content-Type": "image/png", "Accept": "text/event-stream"},
        ) as r,
    ):
        events = read_sse(r)
    assert r.status_code == 200
    assert [kind for kind, _ in events] == ["prediction", "error"]
    assert events[-1][1] == {"error": "internal error"}
    assert_private(json.dumps(events))


def test_not_found_and_wrong_method_are_json(live: ThreadServer) -> None:
    with live.client() as c:
        for r in (c.get("/nope"), c.get("/v1/classify"), c.delete("/v2/models/tiny")):
            assert r.status_code in (404, 405) and isinstance(r.json()["error"], str)


# -- CORS --------------------------------------------------------------------------------------
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def cors(make_settings: Callable[..., Settings]) -> Iterator[ThreadServer]:
    with serve_in_thread(make_settings(cors_origins=(ORIGIN,))) as server:
        yield server


def preflight(c: httpx.Client, origin: str) -> httpx.Response:
    return c.options(
        "/v1/classify",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-deadline-ms",
        },
    )


def test_classify_skips_the_router_unless_cors_must_see_it(
    make_settings: Callable[..., Settings],
) -> None:
    """`EarlyShedding` calls the endpoint itself, except when the CORS middleware (inside
    it) is on: then the request is routed, through CORS (the tests below)."""

    def endpoint(settings: Settings) -> Any:
        app = create_app(settings)
        return next(m.kwargs["endpoint"] for m in app.user_middleware if m.cls is EarlyShedding)

    assert endpoint(make_settings()) is v1.classify
    assert endpoint(make_settings(cors_origins=(ORIGIN,))) is None


def test_cors_is_off_by_default(live: ThreadServer) -> None:
    with live.client() as c:
        r = c.post(
            "/v1/classify",
            content=image_bytes(),
            headers={"Content-Type": "image/png", "Origin": ORIGIN},
        )
        pre = preflight(c, ORIGIN)
    assert r.status_code == 200
    for response in (r, pre):
        assert not any(h.lower().startswith("access-control-") for h in response.headers)


def test_cors_allows_only_the_configured_origin(cors: ThreadServer) -> None:
    with cors.client() as c:
        r = c.post(
            "/v1/classify",
            content=image_bytes(),
            headers={"Content-Type": "image/png", "Origin": ORIGIN},
        )
        pre = preflight(c, ORIGIN)
        other = c.post(
            "/v1/classify",
            content=image_bytes(),
            headers={"Content-Type": "image/png", "Origin": "https://evil.example"},
        )
        other_pre = preflight(c, "https://evil.example")
    assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "X-Fractal-Column" in r.headers["Access-Control-Expose-Headers"]
    assert pre.status_code == 200 and pre.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    assert "access-control-allow-origin" not in other.headers
    assert other_pre.status_code == 400
    assert "access-control-allow-origin" not in other_pre.headers


# -- request ids -------------------------------------------------------------------------------
def access_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "service.access"]


def test_request_id_in_the_access_log(live: ThreadServer, caplog: pytest.LogCaptureFixture) -> None:
    with live.client() as c, caplog.at_level(logging.INFO, logger="service.access"):
        given = c.post(
            "/v1/classify",
            content=image_bytes(),
            headers={"Content-Type": "image/png", "X-Request-ID": "trace-42"},
        )
        made = c.post("/v1/classify", content=image_bytes(), headers={"Content-Type": "image/png"})
        refused = c.post("/v1/classify", content=b"x", headers={"Content-Type": "text/plain"})
    assert given.headers["X-Request-ID"] == "trace-42"
    logged = {r["request_id"]: r for r in access_records(caplog)}
    assert logged["trace-42"]["status"] == 200 and logged["trace-42"]["path"] == "/v1/classify"
    for response in (made, refused):
        rid = response.headers["X-Request-ID"]
        assert re.fullmatch(MADE_REQUEST_ID, rid) and logged[rid]["status"] == response.status_code


@pytest.mark.parametrize("given", ["two words", "x" * 200, 'a"b', "é"])
def test_unsafe_request_id_is_replaced(live: ThreadServer, given: str) -> None:
    """A client's id goes into logs and headers: only a plain token is taken as it is."""
    with live.client() as c:
        r = c.get("/v1/models", headers=[(b"X-Request-ID", given.encode())])
    assert re.fullmatch(MADE_REQUEST_ID, r.headers["X-Request-ID"])


def test_json_log_line_carries_the_request_id() -> None:
    """The server's log format puts the access fields at the top level of one JSON line."""
    record = logging.LogRecord(
        "service.access",
        logging.INFO,
        __file__,
        1,
        json.dumps({"request_id": "abc", "status": 200, "path": "/v1/classify"}),
        None,
        None,
    )
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "abc" and line["status"] == 200 and line["level"] == "info"


# -- dependency audit --------------------------------------------------------------------------
OFFLINE = (
    "ConnectionError",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "timed out",
    "Name or service not known",
)


@pytest.mark.slow
def test_dependency_audit() -> None:
    """pip-audit over the installed environment. Report-only: findings are printed (they
    need a dependency bump, not a test failure); skipped when the advisory database cannot
    be reached."""
    audit = Path(sys.executable).with_name("pip-audit")
    if not audit.is_file():
        pytest.skip("pip-audit is not installed (the dev extra)")
    try:
        result = subprocess.run(
            [
                str(audit),
                "--format",
                "json",
                "--progress-spinner",
                "off",
                "--skip-editable",
                "--timeout",
                "15",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("pip-audit: no answer from the advisory database within 300 s")
    if result.returncode not in (0, 1) or not result.stdout.strip():
        if any(word in result.stderr for word in OFFLINE):
            pytest.skip("pip-audit: the advisory database cannot be reached (offline)")
        pytest.fail(f"pip-audit failed ({result.returncode}): {result.stderr[-2000:]}")
    report = json.loads(result.stdout)
    found = [
        (d["name"], d["version"], v["id"], v.get("fix_versions"))
        for d in report["dependencies"]
        for v in d.get("vulns", [])
    ]
    print(f"\npip-audit: {len(report['dependencies'])} packages, {len(found)} advisories")
    for name, version, advisory, fixes in found:
        print(f"  {name} {version}: {advisory} (fixed in {', '.join(fixes or []) or 'no release'})")
