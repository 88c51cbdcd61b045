"""Admission under overload (service.admission), and the refusal at arrival that it drives
(`/v1/classify` with a deadline is refused before its body is read)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from service.admission import ArrivalGap, ConcurrencyLimit, Headroom, LoopLag
from tests.support import ThreadServer, image_bytes, metric_value


def test_arrival_gap_follows_the_mean_gap() -> None:
    a = ArrivalGap(smoothing=0.5)
    a.observe(1.0)
    assert a.gap_ms == float("inf")  # one arrival: no gap yet
    a.observe(1.010)
    assert a.gap_ms == pytest.approx(10.0)  # the first gap is taken whole
    a.observe(1.040)
    assert a.gap_ms == pytest.approx(20.0)  # then smoothed
    a.observe(1.030)  # out of order (another connection's clock read): a gap of 0
    assert a.gap_ms == pytest.approx(10.0) and a.last_s == 1.040


def test_arrival_gap_clips_a_pause_before_a_burst() -> None:
    a = ArrivalGap(smoothing=0.5)
    a.observe(0.0)
    a.observe(0.002)
    a.observe(3.002)  # a pause of 3 s counts as 4 x 2 ms
    assert a.gap_ms == pytest.approx(5.0)
    for i in range(1, 4):
        a.observe(3.002 + 0.002 * i)  # the burst: back to the mean within a few arrivals
    assert a.gap_ms == pytest.approx(2.375)
    a.observe(4.0)  # traffic thins out: the mean follows at up to 2.5x an arrival
    assert a.gap_ms == pytest.approx(2.375 * 2.5)


def test_headroom_counts_refusals_and_answers_close_to_their_deadlines() -> None:
    h = Headroom(margin_ms=3.0, smoothing=0.5)
    assert h.close_share == 1.0  # a new server is careful
    h.observe(10.0)
    h.observe(3.0)  # at the margin: room enough
    assert h.close_share == pytest.approx(0.25)
    h.observe(2.9)
    assert h.close_share == pytest.approx(0.625)
    h.observe(10.0)
    h.observe(-float("inf"))  # refused
    assert h.close_share == pytest.approx(0.65625)


def test_limit_grows_by_one_per_round_of_timely_answers() -> None:
    c = ConcurrencyLimit(limit=4.0, ceiling=100.0, engaged=0.0, late_share_max=0.0)
    for _ in range(4):
        c.outcome(seen_ms=10.0, deadline_ms=100.0, now_s=0.0, arrived_s=0.0)
    assert c.limit == pytest.approx(5.0, abs=0.1)
    c.outcome(seen_ms=70.0, deadline_ms=100.0, now_s=0.0, arrived_s=0.0)  # neither: hold
    assert c.limit == pytest.approx(5.0, abs=0.1)


def test_limit_is_cut_once_for_the_requests_in_flight_at_a_cut() -> None:
    """After a stall every request in flight is late together: the first late answer cuts
    the limit; the others arrived before that cut and say nothing new. A late answer to a
    request admitted after the cut does cut again (the overload goes on)."""
    c = ConcurrencyLimit(limit=10.0, ceiling=100.0, engaged=0.0, late_share_max=0.0)
    c.outcome(seen_ms=90.0, deadline_ms=100.0, now_s=1.0, arrived_s=0.95)
    assert c.limit == pytest.approx(7.0)
    for k in range(10):  # in flight at the cut, answered over the next 100 ms
        c.outcome(seen_ms=150.0, deadline_ms=100.0, now_s=1.0 + 0.01 * k, arrived_s=0.96)
    assert c.limit == pytest.approx(7.0)
    c.outcome(seen_ms=150.0, deadline_ms=100.0, now_s=1.2, arrived_s=1.05)
    assert c.limit == pytest.approx(4.9)


def test_limit_stays_within_its_bounds() -> None:
    c = ConcurrencyLimit(limit=2.0, ceiling=3.0, engaged=0.0, late_share_max=0.0)
    for i in range(20):
        c.outcome(seen_ms=500.0, deadline_ms=100.0, now_s=float(i), arrived_s=i - 0.5)
    assert c.limit == 1.0
    for _ in range(100):
        c.outcome(seen_ms=1.0, deadline_ms=100.0, now_s=100.0, arrived_s=100.0)
    assert c.limit == 3.0


def test_limit_moves_only_while_it_is_engaged() -> None:
    """With fewer than half the limit in flight, a late answer was not late for having
    admitted too many, and an early one shows no need for more: the limit holds. With half
    or more in, it is cut and grown as before."""
    c = ConcurrencyLimit(limit=10.0, ceiling=100.0, late_share_max=0.0)
    c.in_flight = 4
    c.outcome(seen_ms=150.0, deadline_ms=100.0, now_s=1.0, arrived_s=0.9)
    c.outcome(seen_ms=1.0, deadline_ms=100.0, now_s=1.0, arrived_s=0.9)
    assert c.limit == 10.0
    c.in_flight = 5
    c.outcome(seen_ms=1.0, deadline_ms=100.0, now_s=1.0, arrived_s=0.9)
    assert c.limit == pytest.approx(10.1)
    c.in_flight = 6
    c.outcome(seen_ms=150.0, deadline_ms=100.0, now_s=1.0, arrived_s=0.9)
    assert c.limit == pytest.approx(7.07)


def test_limit_recovers_to_where_it_started_with_few_in_flight() -> None:
    """After an overload cut it to its floor, answers in time grow it back to its start
    even with one request in at a time; past the start it grows only while engaged."""
    c = ConcurrencyLimit(limit=8.0, ceiling=100.0, floor=1.0, late_share_max=0.0)
    c.in_flight = 8
    for i in range(12):
        c.outcome(150.0, 100.0, now_s=float(i), arrived_s=i - 0.05)
    assert c.limit == 1.0
    c.in_flight = 1
    for i in range(200):
        c.outcome(10.0, 100.0, now_s=20.0 + i, arrived_s=20.0 + i)
    assert 8.0 <= c.limit < 8.2


def test_limit_is_cut_only_while_late_answers_are_common() -> None:
    """A few late answers among many in time (a burst under moderate load) leave the
    limit alone; a run of late ones (overload) cuts it."""
    c = ConcurrencyLimit(limit=10.0, ceiling=10.0, in_flight=10)
    for i in range(100):
        late = i % 20 == 0  # 5% late
        c.outcome(150.0 if late else 60.0, 100.0, now_s=float(i), arrived_s=i - 0.05)
    assert c.limit == 10.0
    for i in range(100, 110):
        c.outcome(150.0, 100.0, now_s=float(i), arrived_s=i - 0.05)
    assert c.limit < 10.0 * 0.7


def test_admitted_counts_in_flight() -> None:
    c = ConcurrencyLimit(limit=2.0, ceiling=10.0)
    with c.admitted():
        assert not c.full
        with c.admitted():
            assert c.full and c.in_flight == 2
    assert c.in_flight == 0 and not c.full


def test_limit_by_deadline_follows_littles_law() -> None:
    """Scaled by deadline, the limit is requests per typical deadline: twice the typical
    deadline finds room for twice as many, half of it for half as many (at least one)."""
    c = ConcurrencyLimit(limit=4.0, ceiling=100.0, by_deadline=True)
    assert not c.full_for(1.0)  # nothing learnt yet: the plain limit
    for _ in range(200):  # timely answers to 20 ms and 40 ms requests: typical 30 ms
        for deadline in (20.0, 40.0):
            c.outcome(seen_ms=0.6 * deadline, deadline_ms=deadline, now_s=0.0, arrived_s=0.0)
    assert c.reference_ms == pytest.approx(30.0, abs=1.0) and c.limit == 4.0
    c.in_flight = 4
    assert c.full and c.full_for(30.0) and not c.full_for(60.0)
    c.in_flight = 2
    assert c.full_for(15.0) and not c.full_for(30.0)
    c.in_flight = 0
    assert not c.full_for(0.5)
    plain = ConcurrencyLimit(limit=4.0, ceiling=100.0, reference_ms=30.0, in_flight=4)
    assert plain.full_for(60.0)  # not scaled unless asked


def test_an_admitted_request_can_let_its_slot_go_early() -> None:
    """A stream releases its slot once its first answer is out; the release counts once,
    however often it is called, and leaving the block does not count it again."""
    c = ConcurrencyLimit(limit=1.0, ceiling=10.0)
    with c.admitted() as release:
        assert c.full
        release()
        release()
        assert c.in_flight == 0 and not c.full
        with c.admitted():
            assert c.in_flight == 1
    assert c.in_flight == 0


def test_loop_lag_sees_a_blocked_loop() -> None:
    async def main() -> tuple[float, float]:
        lag = LoopLag(period_s=0.01, smoothing=1.0)
        lag.start()
        await asyncio.sleep(0.05)
        calm = lag.lag_ms
        time.sleep(0.1)  # the loop is blocked: the timer runs late
        await asyncio.sleep(0.001)  # the late tick runs, not the next one
        blocked = lag.lag_ms
        await lag.stop()
        return calm, blocked

    calm, blocked = asyncio.run(main())
    assert blocked >= 50.0 and blocked > calm


def test_loop_lag_excuses_inference_run_on_the_loop() -> None:
    samples: list[float] = []
    lag = LoopLag(smoothing=1.0, on_sample=samples.append)
    lag.observe(late_ms=4.0, excused_ms=3.5)
    assert lag.lag_ms == pytest.approx(0.5)
    lag.observe(late_ms=2.0, excused_ms=3.0)  # never below zero
    assert lag.lag_ms == 0.0
    lag.observe(late_ms=6.0)
    assert lag.lag_ms == 6.0
    assert samples == pytest.approx([0.5, 0.0, 6.0])  # what the metric is told


def test_a_stamped_request_keeps_one_lag_for_the_way_out_only() -> None:
    lag = LoopLag(smoothing=1.0)
    lag.observe(late_ms=1.5)
    assert lag.allowance_ms() == 3.0  # one lag on the way in, one out
    assert lag.allowance_ms(stamped=True) == 1.5  # its deadline counts the way in already


# -- refusal at arrival, on the live server ------------------------------------------------------
@pytest.fixture
def at_capacity(live: ThreadServer) -> Iterator[None]:
    """The concurrency limit reached (one admitted, a limit of one) until the test ends."""
    limit = live.engine.admission
    saved = limit.limit
    limit.limit = 1.0
    limit.in_flight += 1
    try:
        yield
    finally:
        limit.in_flight -= 1
        limit.limit = saved


@pytest.mark.usefixtures("at_capacity")
def test_at_capacity_a_request_with_a_deadline_is_refused_at_arrival(live: ThreadServer) -> None:
    with live.client() as c:
        before = c.get("/metrics").text
        started = time.monotonic()
        r = c.post(
            "/v1/classify",
            content=image_bytes(),
            headers={"Content-Type": "image/png", "X-Deadline-Ms": "1000", "X-Request-ID": "cap"},
        )
        elapsed = time.monotonic() - started
        after = c.get("/metrics").text
        # Without a deadline there is nothing to promise: the limit does not apply.
        assert (
            c.post(
                "/v1/classify", content=image_bytes(), headers={"Content-Type": "image/png"}
            ).status_code
            == 200
        )
        # Nor does it to a bad deadline header: the route explains that one.
        assert (
            c.post(
                "/v1/classify",
                content=image_bytes(),
                headers={"Content-Type": "image/png", "X-Deadline-Ms": "soon"},
            ).status_code
            == 400
        )
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert r.json() == {"error": "server at capacity", "reason": "queue_full"}
    assert r.headers["X-Request-ID"] == "cap" and elapsed < 1.0
    name = "fractal_deadline_outcomes_total"
    assert (
        metric_value(after, name, 'outcome="shed"')
        == metric_value(before, name, 'outcome="shed"') + 1
    )
    refused = 'endpoint="/v1/classify",status="503"'
    assert metric_value(after, "fractal_requests_total", refused) >= 1


def test_a_deadline_the_loop_cannot_meet_is_refused_at_arrival(live: ThreadServer) -> None:
    lag = live.engine.loop_lag
    saved = lag.lag_ms, lag.smoothing
    try:
        lag.lag_ms, lag.smoothing = 400.0, 0.0  # pinned: a loop running 400 ms late
        with live.client() as c:
            r = c.post(
                "/v1/classify",
                content=image_bytes(),
                headers={"Content-Type": "image/png", "X-Deadline-Ms": "500"},
            )
    finally:
        lag.lag_ms, lag.smoothing = saved
    assert r.status_code == 503 and r.json()["reason"] == "deadline"
