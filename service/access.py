"""Who may use the inference endpoints: optional bearer tokens and a per-client rate
limit, checked once a request.

`EarlyShedding` checks a `/v1/classify` request it judges at arrival (so a client without
access, or over its rate, learns that rather than that the server is busy) and marks it
checked; the routes check every other inference request (`service.deps.inference_access`).
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from service.errors import TooManyRequests, Unauthorized
from service.warmup import WARMUP_STATE_KEY

ACCESS_CHECKED_KEY = "access_checked"
"""Set in the ASGI scope's state once a request's access was checked."""


def parse_bearer(header: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, else None."""
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def token_matches(token: str | None, accepted: tuple[str, ...]) -> bool:
    """Constant-time comparison against every accepted token."""
    if token is None:
        return False
    given = token.encode()
    found = False
    for candidate in accepted:
        found |= hmac.compare_digest(given, candidate.encode())
    return found


class TokenBucket:
    """Per-client token buckets (rate per second, burst of two seconds), LRU-bounded."""

    def __init__(self, rate_per_s: float, clients: int = 10_000) -> None:
        self.rate = rate_per_s
        self.burst = max(2.0 * rate_per_s, 1.0)
        self.clients = clients
        self.state: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, client: str, now: float) -> bool:
        tokens, last = self.state.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        self.state[client] = (tokens - 1.0 if allowed else tokens, now)
        if len(self.state) > self.clients:
            self.state.popitem(last=False)
        return allowed


class Access:
    """The inference endpoints' access rule: with tokens configured, a bearer token among
    them (else 401); with a rate limit, at most that many requests a second per client, a
    client being its token, or its address without one (else 429 with Retry-After)."""

    def __init__(
        self,
        tokens: tuple[str, ...],
        rate_limit_per_s: float | None,
        retry_after_s: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tokens = tokens
        self.limiter = TokenBucket(rate_limit_per_s) if rate_limit_per_s else None
        self.retry_after_s = retry_after_s
        self.clock = clock

    def check_once(
        self, state: dict[str, Any], authorization: str, client_host: str | None
    ) -> None:
        """`check`, unless the request (its ASGI scope's `state`) needs none: the server's
        own warm-up (marked in the scope, which no client can set), or a request already
        checked; then marks it checked."""
        if not (state.get(WARMUP_STATE_KEY, False) or state.get(ACCESS_CHECKED_KEY, False)):
            self.check(authorization, client_host)
            state[ACCESS_CHECKED_KEY] = True

    def check(self, authorization: str, client_host: str | None) -> None:
        token = parse_bearer(authorization)
        if self.tokens and not token_matches(token, self.tokens):
            raise Unauthorized("missing or invalid bearer token")
        client = token or client_host or "unknown"
        if self.limiter is not None and not self.limiter.allow(client, self.clock()):
            raise TooManyRequests("rate limit exceeded", self.retry_after_s)
