"""The Open Inference Protocol front end, driven by the real tritonclient."""

from __future__ import annotations

import io
import time
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.service.tests_support import png_bytes


def pixels(seed: int) -> np.ndarray:
    """The 16x16 RGB image the server would make of png_bytes(seed)."""
    img = Image.open(io.BytesIO(png_bytes(seed=seed))).convert("RGB")
    return np.asarray(img.resize((16, 16), Image.Resampling.BILINEAR), dtype=np.uint8)


@pytest.fixture(scope="module")
def client(live: Any) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(live.url.removeprefix("http://"))


def test_metadata_and_readiness(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny")
    server = client.get_server_metadata()
    assert server["name"] == "fractal-anytime"
    meta = client.get_model_metadata("tiny")
    assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 16, 16, 3]}]
    assert {o["name"] for o in meta["outputs"]} == {"probabilities", "column"}


@pytest.mark.parametrize("binary", [True, False])
def test_infer_matches_v1(live: Any, client: triton.InferenceServerClient, binary: bool) -> None:
    batch = np.stack([pixels(s) for s in range(3)])
    inp = triton.InferInput("images", list(batch.shape), "UINT8")
    inp.set_data_from_numpy(batch, binary_data=binary)
    result = client.infer("tiny", [inp], parameters={"column": 2})
    probs = result.as_numpy("probabilities")
    assert probs.shape == (3, 10)
    assert result.as_numpy("column").tolist() == [2, 2, 2]
    with httpx.Client(base_url=live.url) as c:
        for i in range(3):
            v1 = c.post(
                "/v1/classify",
                content=png_bytes(seed=i),
                headers={"Content-Type": "image/png", "X-Column": "2"},
            ).json()
            assert int(probs[i].argmax()) == v1["class_index"]
            assert float(probs[i].max()) == pytest.approx(v1["confidence"], abs=1e-5)


def test_fp32_input_on_the_0_255_scale(client: triton.InferenceServerClient) -> None:
    batch = pixels(0)[None]
    a = triton.InferInput("images", list(batch.shape), "UINT8")
    a.set_data_from_numpy(batch)
    b = triton.InferInput("images", list(batch.shape), "FP32")
    b.set_data_from_numpy(batch.astype(np.float32))
    pa = client.infer("tiny", [a]).as_numpy("probabilities")
    pb = client.infer("tiny", [b]).as_numpy("probabilities")
    assert np.allclose(pa, pb)


def test_deadline_parameters(client: triton.InferenceServerClient, live: Any) -> None:
    batch = pixels(0)[None]
    inp = triton.InferInput("images", list(batch.shape), "UINT8")
    inp.set_data_from_numpy(batch)
    # 60 ms (as Triton's microsecond timeout): column 1 only.
    assert client.infer("tiny", [inp], timeout=60000).as_numpy("column").tolist() == [1]
    assert client.infer("tiny", [inp], parameters={"deadline_ms": 200}).as_numpy(
        "column"
    ).tolist() == [2]
    # A parameter wins over the header.
    assert client.infer(
        "tiny", [inp], parameters={"deadline_ms": 60}, headers={"X-Deadline-Ms": "2000"}
    ).as_numpy("column").tolist() == [1]
    assert client.infer("tiny", [inp], headers={"X-Deadline-Ms": "200"}).as_numpy(
        "column"
    ).tolist() == [2]
    with pytest.raises(InferenceServerException, match="deadline"):
        client.infer("tiny", [inp], parameters={"deadline_ms": 1})
    # The budget counts from X-Request-Start: 140 ms of 200 gone on the way leave column 1.
    stamp = f"t={time.time() - 0.140:.6f}"
    assert client.infer(
        "tiny", [inp], parameters={"deadline_ms": 200}, headers={"X-Request-Start": stamp}
    ).as_numpy("column").tolist() == [1]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"inputs": []}, 400),
        (
            {"inputs": [{"name": "x", "shape": [1, 16, 16, 3], "datatype": "UINT8", "data": [0]}]},
            400,
        ),
        (
            {
                "inputs": [
                    {
                        "name": "images",
                        "shape": [1, 8, 8, 3],
                        "datatype": "UINT8",
                        "data": [0] * 192,
                    }
                ]
            },
            400,
        ),
        (
            {
                "inputs": [
                    {
                        "name": "images",
                        "shape": [1, 16, 16, 3],
                        "datatype": "INT64",
                        "data": [0] * 768,
                    }
                ]
            },
            400,
        ),
        (
            {
                "inputs": [
                    {
                        "name": "images",
                        "shape": [1, 16, 16, 3],
                        "datatype": "UINT8",
                        "data": [0] * 10,
                    }
                ]
            },
            400,
        ),
        (
            {
                "inputs": [
                    {
                        "name": "images",
                        "shape": [1, 16, 16, 3],
                        "datatype": "UINT8",
                        "data": [300] * 768,
                    }
                ]
            },
            400,
        ),
        (
            {
                "inputs": [
                    {
                        "name": "images",
                        "shape": [64, 16, 16, 3],
                        "datatype": "UINT8",
                        "data": [0] * (768 * 64),
                    }
                ]
            },
            413,
        ),
    ],
)
def test_bad_tensors_are_4xx(live: Any, body: dict[str, Any], status: int) -> None:
    with httpx.Client(base_url=live.url) as c:
        r = c.post("/v2/models/tiny/infer", json=body)
    assert r.status_code == status and "error" in r.json()


def test_unknown_model_is_404(live: Any) -> None:
    with httpx.Client(base_url=live.url) as c:
        assert c.get("/v2/models/nope").status_code == 404
        assert c.post("/v2/models/nope/infer", json={}).status_code == 404
