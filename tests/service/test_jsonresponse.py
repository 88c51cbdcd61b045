"""The orjson response: compact UTF-8 JSON that parses back to what was sent."""

from __future__ import annotations

import json

from service.jsonresponse import JSONResponse, dumps


def test_renders_compact_json_that_parses_back() -> None:
    content = {"class_name": "frog", "confidence": 0.9327653646469116, "top5": [1e-05, 0.5]}
    body = bytes(JSONResponse(content).body)
    assert json.loads(body) == content
    assert b" " not in body  # compact, as Starlette's
    assert bytes(JSONResponse({"name": "grenouille é"}).body).decode() == '{"name":"grenouille é"}'


def test_non_finite_floats_become_null() -> None:
    assert dumps({"x": float("nan"), "y": float("inf")}) == b'{"x":null,"y":null}'
