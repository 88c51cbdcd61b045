"""The start-up warm-up: every request kind answered before the server is ready, and no
trace of it in the metrics, the access log, the latency model or the rate limiter."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from service.settings import Settings
from service.warmup import warmup_requests
from tests.support import image_bytes, serve_in_thread


def test_one_request_of_each_kind() -> None:
    requests = warmup_requests("tiny", 16, 16)
    kinds = {
        (r.path, dict(r.headers).get("content-type"), dict(r.headers).get("accept"))
        for r in requests
    }
    assert ("/v1/classify", "image/jpeg", None) in kinds
    assert ("/v1/classify", "image/png", None) in kinds
    assert ("/v1/classify", "application/json", None) in kinds
    assert ("/v1/classify", "image/png", "text/event-stream") in kinds
    assert ("/v2/models/tiny/infer", "application/json", None) in kinds


def test_warm_up_answers_everything_and_leaves_no_trace(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = make_settings(
        api_tokens=("secret",), rate_limit_per_s=1.0, latency_learning=True, log_json=True
    )
    with serve_in_thread(settings) as server:
        messages = [r.getMessage() for r in caplog.records]
        assert any(m.startswith("request path warmed up") for m in messages)
        # Each warm-up request got its 200: none was refused by authentication, the
        # rate limit or a bad body.
        assert not [m for m in messages if m.startswith("warm-up request")]
        assert not [r for r in caplog.records if r.name == "service.access"]
        model = server.engine.model
        assert model is not None
        assert all(v.latency.observations == 0 for v in model.variants.values())

        with server.client(headers={"Authorization": "Bearer secret"}) as client:
            metrics = client.get("/metrics").text
            for name in (
                "fractal_requests_total",
                "fractal_column_served_total",
                "fractal_inference_duration_seconds_count",
            ):
                assert f"\n{name}{{" not in metrics, name
            # The rate limit's burst (2) is still whole: the warm-up used none of it.
            for _ in range(2):
                response = client.post(
                    "/v1/classify", content=image_bytes(), headers={"Content-Type": "image/png"}
                )
                assert response.status_code == 200, response.text
            metrics = client.get("/metrics").text
        assert '\nfractal_requests_total{endpoint="/v1/classify",status="200"} 2.0' in metrics
