"""X-Request-Start: when the client or a proxy took the request; the deadline counts from
then. Parsing and the time on the way, as pure functions (the live server: test_server)."""

from __future__ import annotations

import numpy as np
import pytest
from starlette.requests import Request

from service.engine import Request as EngineRequest
from service.errors import BadRequest
from service.requests import parse_request_start_s, stamped_transit_ms, transit_ms
from service.settings import Settings

NOW_S = 1_796_659_200.25
"""A Unix time (2026-12-07) with a fraction exact in binary."""


@pytest.mark.parametrize(
    "value",
    [
        "t=1796659200.25",  # nginx: t=${msec}, seconds
        "t=1796659200250",  # milliseconds
        "t=1796659200250000",  # Apache: %t, microseconds
        "1796659200.25",  # no t=
        " t=1796659200.25 ",
    ],
)
def test_seconds_milliseconds_and_microseconds_are_told_apart(value: str) -> None:
    assert parse_request_start_s(value) == pytest.approx(NOW_S, abs=1e-6)


def test_no_header_is_none() -> None:
    assert parse_request_start_s(None) is None
    assert transit_ms(None, NOW_S) is None


@pytest.mark.parametrize("value", ["", "t=", "t=soon", "t=0", "t=-3", "t=inf", "t=nan", "x=5"])
def test_a_bad_stamp_is_a_400(value: str) -> None:
    with pytest.raises(BadRequest, match="X-Request-Start"):
        parse_request_start_s(value)


def test_the_time_on_the_way_is_the_arrival_less_the_stamp() -> None:
    assert transit_ms("t=1796659200.25", NOW_S + 0.0125) == pytest.approx(12.5, abs=1e-3)
    # A stamp after the arrival: the clocks disagree, nothing is counted.
    assert transit_ms("t=1796659200.25", NOW_S - 2.0) == 0.0


def test_the_deadline_and_the_elapsed_time_count_from_the_stamp() -> None:
    images = np.zeros((1, 2, 2, 3), np.uint8)
    plain = EngineRequest(images, 100.0, 50.0)
    stamped = EngineRequest(images, 100.0, 50.0, transit_ms=20.0)
    assert plain.start_s == 100.0 and plain.deadline_s == pytest.approx(100.05)
    assert stamped.start_s == pytest.approx(99.98)
    assert stamped.deadline_s == pytest.approx(100.03)


def _request(stamp: str | None, arrival_epoch_s: float) -> Request:
    headers = [] if stamp is None else [(b"x-request-start", stamp.encode())]
    scope = {"type": "http", "headers": headers, "state": {"arrival_epoch_s": arrival_epoch_s}}
    return Request(scope)


def test_the_server_notes_the_transit_only_when_it_honours_the_header() -> None:
    request = _request("t=1796659200.25", NOW_S + 0.004)
    assert stamped_transit_ms(request, Settings()) == pytest.approx(4.0, abs=1e-3)
    assert request.state.transit_ms == pytest.approx(4.0, abs=1e-3)  # for the metrics and the log
    ignoring = _request("t=not even parsed", NOW_S)
    assert stamped_transit_ms(ignoring, Settings(honor_request_start=False)) is None
    assert stamped_transit_ms(_request(None, NOW_S), Settings()) is None
