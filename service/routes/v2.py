"""The Open Inference Protocol (KServe V2) over HTTP, on the same engine as `/v1`.

Input `images` UINT8 [N, H, W, 3] (FP32 on the 0-255 scale accepted), as JSON `data` or
with the binary tensor extension (`Inference-Header-Content-Length`, as tritonclient
sends by default). Outputs `probabilities` FP32 [N, classes] and `column` INT32 [N], as
JSON. Request parameters: `timeout` (microseconds, Triton's convention), `deadline_ms`,
`column`, `min_confidence`; a parameter wins over the `X-Deadline-Ms` header.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.deps import EngineDep, admit_inference
from service.engine import Engine
from service.engine import Request as EngineRequest
from service.errors import BadRequest, NotFound, PayloadTooLarge, ServiceError
from service.jsonresponse import JSONResponse
from service.model import LoadedModel
from service.requests import (
    DEADLINE_HEADER,
    REQUEST_START_HEADER,
    parse_confidence,
    parse_deadline_ms,
    parse_json,
    read_body,
    stamped_transit_ms,
)
from service.routes.direct import DirectRoute

router = APIRouter(prefix="/v2", tags=["v2"], route_class=DirectRoute)

DTYPES = {"UINT8": np.uint8, "FP32": np.float32}
OUTPUTS = ("probabilities", "column")

INFER_BODY = {
    "parameters": [
        {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
        DEADLINE_HEADER,
        REQUEST_START_HEADER,
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {
                            "type": "object",
                            "properties": {
                                "deadline_ms": {"type": "number", "exclusiveMinimum": 0},
                                "timeout": {
                                    "type": "number",
                                    "exclusiveMinimum": 0,
                                    "description": "deadline in microseconds (Triton's)",
                                },
                                "column": {"type": "integer", "minimum": 1},
                                "min_confidence": {"type": "number", "minimum": 0, "maximum": 1},
                            },
                        },
                        "inputs": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["name", "datatype", "shape"],
                                "properties": {
                                    "name": {"type": "string", "enum": ["images"]},
                                    "datatype": {"type": "string", "enum": list(DTYPES)},
                                    "shape": {
                                        "type": "array",
                                        "items": {"type": "integer", "minimum": 1},
                                        "minItems": 4,
                                        "maxItems": 4,
                                    },
                                    "data": {
                                        "type": "array",
                                        "items": {"type": "number", "minimum": 0, "maximum": 255},
                                    },
                                    "parameters": {
                                        "type": "object",
                                        "properties": {
                                            "binary_data_size": {"type": "integer", "minimum": 0}
                                        },
                                    },
                                },
                            },
                        },
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string", "enum": list(OUTPUTS)}},
                            },
                        },
                    },
                }
            }
        },
    },
}
"""The inference request as an OpenAPI body (JSON form; the binary extension appends raw
tensor bytes after `Inference-Header-Content-Length` bytes of this JSON)."""


@router.get("")
async def server_metadata() -> dict[str, Any]:
    return {"name": "fractal-anytime", "version": "1", "extensions": ["binary_tensor_data"]}


def _model(engine: Engine, name: str) -> LoadedModel:
    model = engine.model
    if model is None or model.name != name:
        raise NotFound(f"unknown model {name!r}")
    return model


@router.get("/models/{name}")
async def model_metadata(name: str, engine: EngineDep) -> dict[str, Any]:
    model = _model(engine, name)
    spec = model.manifest.input
    return {
        "name": model.name,
        "versions": [model.manifest.version],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {
                "name": "images",
                "datatype": "UINT8",
                "shape": [-1, spec.height, spec.width, spec.channels],
            }
        ],
        "outputs": [
            {
                "name": "probabilities",
                "datatype": "FP32",
                "shape": [-1, len(model.manifest.classes)],
            },
            {"name": "column", "datatype": "INT32", "shape": [-1]},
        ],
        "parameters": {"classes": list(model.manifest.classes), "columns": model.columns},
    }


@router.get("/models/{name}/ready")
async def model_ready(name: str, engine: EngineDep) -> Response:
    _model(engine, name)
    return JSONResponse(
        {"name": name, "ready": engine.ready}, status_code=200 if engine.ready else 503
    )


def _split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        head, rest = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise BadRequest("invalid Inference-Header-Content-Length") from None
        if not 0 <= n <= len(body):
            raise BadRequest("Inference-Header-Content-Length is beyond the body")
        head, rest = body[:n], body[n:]
    payload = parse_json(head, "inference request")
    if not isinstance(payload, dict):
        raise BadRequest("inference request must be a JSON object")
    return payload, rest


def _images(payload: dict[str, Any], binary: bytes, model: LoadedModel, limit: int) -> np.ndarray:
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest("expected exactly one input, named 'images'")
    tensor = inputs[0]
    if tensor.get("name") != "images":
        raise BadRequest(f"unknown input {tensor.get('name')!r}; expected 'images'")
    datatype = tensor.get("datatype")
    if datatype not in DTYPES:
        raise BadRequest(f"images datatype must be UINT8 or FP32, got {datatype!r}")
    shape = tensor.get("shape")
    spec = model.manifest.input
    expected = [spec.height, spec.width, spec.channels]
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
        or shape[1:] != expected
        or shape[0] < 1
    ):
        raise BadRequest(
            f"images shape must be [N, {', '.join(map(str, expected))}], got {shape!r}"
        )
    if shape[0] > limit:
        raise PayloadTooLarge(f"{shape[0]} images; the limit is {limit} per request")
    dtype = DTYPES[datatype]
    count = int(np.prod(shape))
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("input parameters must be an object")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if (
            not isinstance(size, int)
            or isinstance(size, bool)
            or size != count * np.dtype(dtype).itemsize
            or len(binary) < size
        ):
            raise BadRequest("binary_data_size does not match the shape and datatype")
        array = np.frombuffer(binary[:size], dtype=dtype)
    else:
        data = tensor.get("data")
        if data is None:
            raise BadRequest("images has no data")
        try:
            array = np.asarray(data, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise BadRequest("images data must be numbers") from None
        if array.size != count:
            raise BadRequest(f"images data has {array.size} values; shape needs {count}")
    if dtype is np.float32 or array.dtype != np.uint8:
        if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 255:
            raise BadRequest("pixel values must lie in 0..255")
        if datatype == "UINT8" and not np.all(array == np.round(array)):
            raise BadRequest("UINT8 data must be whole numbers")
        array = np.round(array).astype(np.uint8)
    return array.reshape(shape)


def _outputs(payload: dict[str, Any]) -> set[str]:
    """The outputs asked for (`outputs: [{"name": ...}]`); all of them when absent."""
    wanted = payload.get("outputs")
    if wanted is None or wanted == []:
        return set(OUTPUTS)
    if not isinstance(wanted, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in wanted
    ):
        raise BadRequest('outputs must be a list of {"name": "..."} objects')
    names = {o["name"] for o in wanted}
    unknown = names - set(OUTPUTS)
    if unknown:
        raise BadRequest(f"unknown outputs {sorted(unknown)}")
    return names


def _deadline(params: dict[str, Any], header: str | None, default: float | None) -> float | None:
    if "deadline_ms" in params:
        return parse_deadline_ms(str(params["deadline_ms"]), default)
    if "timeout" in params:
        try:
            micros = float(params["timeout"])
        except (TypeError, ValueError):
            raise BadRequest("timeout must be a number of microseconds") from None
        return parse_deadline_ms(str(micros / 1000.0), default)
    return parse_deadline_ms(header, default)


def _column(params: dict[str, Any]) -> int | None:
    value = params.get("column")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise BadRequest("column must be an integer")
    try:
        column = int(value)
    except ValueError:
        raise BadRequest("column must be an integer") from None
    if column < 1:
        raise BadRequest("column must be at least 1")
    return column


@router.post("/models/{name}/infer", openapi_extra=INFER_BODY)
async def infer(request: Request) -> Response:
    name = request.path_params["name"]  # only the request comes in (`DirectRoute`)
    engine, settings = await admit_inference(request)
    arrival = getattr(request.state, "arrival_s", engine.clock())
    model = _model(engine, name)
    body = await read_body(request, settings.max_body_bytes)
    payload, binary = _split_body(body, request.headers.get("inference-header-content-length"))
    params = payload.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("parameters must be an object")
    images = _images(payload, binary, model, settings.max_images_per_request)
    wanted = _outputs(payload)
    deadline = _deadline(params, request.headers.get("x-deadline-ms"), settings.default_deadline_ms)
    threshold = parse_confidence(params.get("min_confidence"), "min_confidence")
    transit = stamped_transit_ms(request, settings)
    request.state.deadline_ms = deadline
    req = EngineRequest(
        images, arrival, deadline, _column(params), "fp32", threshold, transit_ms=transit
    )
    try:
        answer = await engine.classify(req)
    except ServiceError as exc:
        request.state.outcome = getattr(exc, "reason", "error")
        raise
    final = answer.final
    request.state.column = final.variant.column
    request.state.outcome = "met" if answer.deadline_met else "missed"
    n, classes = final.probabilities.shape
    outputs = [
        {
            "name": "probabilities",
            "datatype": "FP32",
            "shape": [n, classes],
            "data": final.probabilities.reshape(-1).tolist(),
        },
        {"name": "column", "datatype": "INT32", "shape": [n], "data": [final.variant.column] * n},
    ]
    outputs = [o for o in outputs if o["name"] in wanted]
    result: dict[str, Any] = {
        "model_name": model.name,
        "model_version": model.manifest.version,
        "outputs": outputs,
        "parameters": {
            "column": final.variant.column,
            "precision": final.variant.precision,
            "views": final.variant.views,
            "elapsed_ms": round(answer.elapsed_ms, 3),
            "deadline_met": answer.deadline_met,
        },
    }
    if "id" in payload:
        result["id"] = str(payload["id"])
    return JSONResponse(result, headers={"X-Fractal-Column": str(final.variant.column)})
