"""Access: optional bearer tokens on the inference endpoints (from FRACTAL_API_TOKENS, a
JSON list, and FRACTAL_API_TOKENS_FILE), and the optional per-client rate limit."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from service.app import read_tokens
from service.settings import Settings
from tests.support import (
    ThreadServer,
    image_bytes,
    serve_in_thread,
)

ENV_TOKENS = ["token-from-env", "another-env-token"]
FILE_TOKEN = "token-from-file"


@pytest.fixture(scope="module")
def secured(
    make_settings: Callable[..., Settings], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ThreadServer]:
    tokens_file = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    tokens_file.write_text(f"# inference clients\n{FILE_TOKEN}\n\n")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FRACTAL_API_TOKENS", '["token-from-env", "another-env-token"]')
        env.setenv("FRACTAL_API_TOKENS_FILE", str(tokens_file))
        settings = make_settings()
    assert [t.get_secret_value() for t in settings.api_tokens] == ENV_TOKENS
    with serve_in_thread(settings) as server:
        yield server


def classify(c: httpx.Client, token: str | None = None, scheme: str = "Bearer") -> httpx.Response:
    headers = {"Content-Type": "image/png"}
    if token is not None:
        headers["Authorization"] = f"{scheme} {token}"
    return c.post("/v1/classify", content=image_bytes(), headers=headers)


def infer(c: httpx.Client, token: str | None = None) -> httpx.Response:
    body = {
        "inputs": [
            {"name": "images", "shape": [1, 16, 16, 3], "datatype": "UINT8", "data": [0] * 768}
        ]
    }
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return c.post("/v2/models/tiny/infer", json=body, headers=headers)


@pytest.mark.parametrize("send", [classify, infer])
@pytest.mark.parametrize("token", [None, "wrong", ENV_TOKENS[0] + "x", ENV_TOKENS[0][:-1]])
def test_missing_or_wrong_token_is_401(
    secured: ThreadServer, send: Callable[..., httpx.Response], token: str | None
) -> None:
    with secured.client() as c:
        r = send(c, token)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert r.json() == {"error": "missing or invalid bearer token"}


def test_a_request_without_access_learns_that_before_it_is_shed(secured: ThreadServer) -> None:
    """A deadline no column can meet is refused at arrival (503), but only for a client
    with access: one without a valid token gets 401, whatever the server's load."""
    with secured.client() as c:
        for token, status in ((None, 401), ("wrong", 401), (ENV_TOKENS[0], 503)):
            headers = {"Content-Type": "image/png", "X-Deadline-Ms": "0.001"}
            if token is not None:
                headers["Authorization"] = f"Bearer {token}"
            r = c.post("/v1/classify", content=image_bytes(), headers=headers)
            assert r.status_code == status, (token, r.text)


def test_token_in_another_scheme_is_401(secured: ThreadServer) -> None:
    with secured.client() as c:
        assert classify(c, ENV_TOKENS[0], scheme="Basic").status_code == 401


@pytest.mark.parametrize("send", [classify, infer])
@pytest.mark.parametrize("token", [*ENV_TOKENS, FILE_TOKEN])
def test_right_token_is_served(
    secured: ThreadServer, send: Callable[..., httpx.Response], token: str
) -> None:
    with secured.client() as c:
        assert send(c, token).status_code == 200


@pytest.mark.parametrize(
    "path", ["/v2/health/live", "/v2/health/ready", "/metrics", "/v1/models", "/v2/models/tiny"]
)
def test_health_metrics_and_metadata_stay_open(secured: ThreadServer, path: str) -> None:
    with secured.client() as c:
        assert c.get(path).status_code == 200


def test_unauthenticated_body_is_never_read(secured: ThreadServer) -> None:
    """Without a token, a request declaring a terabyte body is refused at once."""
    host, port = secured.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 1000000000000\r\n\r\n"
        )
        assert s.recv(65536).startswith(b"HTTP/1.1 401")


# -- rate limit --------------------------------------------------------------------------------
RATE_PER_S = 2.0  # a burst of two seconds' worth: 4 requests


@pytest.fixture(scope="module")
def limited(make_settings: Callable[..., Settings]) -> Iterator[ThreadServer]:
    tokens = tuple(SecretStr(name) for name in ("alice", "bob", "carol", "dave"))
    settings = make_settings(rate_limit_per_s=RATE_PER_S, api_tokens=tokens)
    with serve_in_thread(settings) as server:
        yield server


def test_rate_limit_is_429_with_retry_after(limited: ThreadServer) -> None:
    with limited.client() as c:
        statuses = [classify(c, "alice").status_code for _ in range(8)]
        r = classify(c, "alice")
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert r.json() == {"error": "rate limit exceeded"}
        # Another client has a bucket of its own.
        assert classify(c, "bob").status_code == 200
        # Honouring Retry-After gets through again.
        time.sleep(float(r.headers["Retry-After"]))
        assert classify(c, "alice").status_code == 200
        # Health and metrics are not limited.
        assert all(c.get("/v2/health/ready").status_code == 200 for _ in range(10))
    assert statuses[:4] == [200] * 4 and statuses[-1] == 429, statuses
    text = httpx.get(f"{limited.url}/metrics").text
    assert 'fractal_requests_total{endpoint="/v1/classify",status="429"}' in text


def test_rate_limit_counts_a_request_once_and_comes_before_shedding(
    limited: ThreadServer,
) -> None:
    """A `/v1/classify` request judged at arrival (it names a deadline) spends one token of
    its client's bucket, not one there and one in the route; a client over its rate learns
    that (429) even when its deadline could not be met (503 for a client within its rate)."""

    def send(c: httpx.Client, token: str, deadline_ms: str) -> int:
        headers = {
            "Content-Type": "image/png",
            "Authorization": f"Bearer {token}",
            "X-Deadline-Ms": deadline_ms,
        }
        return c.post("/v1/classify", content=image_bytes(), headers=headers).status_code

    with limited.client() as c:
        statuses = [send(c, "carol", "10000") for _ in range(4)]
        over = send(c, "carol", "0.001")
        within = send(c, "dave", "0.001")
    assert statuses == [200] * 4 and over == 429 and within == 503


def test_rate_limit_is_off_by_default(live: ThreadServer) -> None:
    with live.client() as c:
        assert all(classify(c).status_code == 200 for _ in range(30))


def test_tokens_file_skips_comments_and_blanks(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# comment\n  spaced-token  \n\nplain\n")
    settings = Settings(api_tokens=(SecretStr("env"),), api_tokens_file=path)
    assert read_tokens(settings) == ("env", "spaced-token", "plain")
