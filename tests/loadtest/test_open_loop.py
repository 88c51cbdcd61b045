"""The generator against a stub server: open-loop sending, drops at the bound, streams,
and several worker processes. Each test runs a second or two of traffic on 127.0.0.1."""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest

from loadtest.deadlines import Fixed, NoDeadline, Uniform
from loadtest.generator import TIMER_SLACK_S, Result, Target, budget_at_send, build_plan, run_load
from loadtest.report import summarize
from loadtest.samples import load_samples
from tests.loadtest.loadtest_stub import WRONG, StubServer

SAMPLES = load_samples()
LABELS = {s.data: s.label for s in SAMPLES}
LAG_S = 0.25
"""Median send lag tolerated: generous, as the test machine may be busy with other work."""


def slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of y against x: 1.0 when y tracks x."""
    return float(np.polyfit(np.asarray(x), np.asarray(y), 1)[0])


def assert_on_schedule(results: list[Result]) -> None:
    sent = [r for r in results if r.send_s is not None]
    lags = [r.send_s - r.scheduled_s for r in sent if r.send_s is not None]
    # Never earlier than the timer's slack: a worker wakes that much early and sends.
    assert min(lags) >= -TIMER_SLACK_S - 1e-6 and float(np.median(lags)) < LAG_S
    assert slope([r.scheduled_s for r in sent], [r.send_s or 0 for r in sent]) > 0.8


def server_view(stub: StubServer, results: list[Result]) -> tuple[list[float], list[float]]:
    """(scheduled times, times the stub saw each request) of the requests it saw."""
    seen = [(r.scheduled_s, stub.arrivals.get(f"loadtest-{r.index}")) for r in results]
    pairs = [(s, a) for s, a in seen if a is not None]
    return [s for s, _ in pairs], [a for _, a in pairs]


def max_overlap(results: list[Result]) -> int:
    """Most requests in flight at once, from their send and completion times."""
    edges = []
    for r in results:
        if r.send_s is not None and r.latency_ms is not None:
            edges += [(r.send_s, 1), (r.origin_s + r.latency_ms / 1000.0, -1)]
    depth = best = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
        depth += step
        best = max(best, depth)
    return best


def test_sends_follow_the_schedule_when_the_server_is_slow() -> None:
    """A server taking 300 ms per answer does not slow the sender: every arrival is sent
    on time (a closed loop with few users would send a fraction of them)."""
    with StubServer(fixed_delay_s=0.3, labels=LABELS) as stub:
        plan = build_plan(60.0, 1.5, NoDeadline(), len(SAMPLES), seed=1)
        t0 = time.monotonic()
        results = run_load(Target(stub.url), plan, SAMPLES, concurrency=200)
        assert time.monotonic() - t0 < 1.5 + 0.3 + 2.0
    assert len(results) == len(plan.arrivals) > 50
    assert not any(r.dropped for r in results)
    assert all(r.ok for r in results), {r.error for r in results}
    assert_on_schedule(results)
    # Workers wake a timer's slack early, so some requests leave at or before their time;
    # each is timed from whichever came first, and never faster than the server.
    assert any(r.send_s is not None and r.send_s <= r.scheduled_s for r in results)
    assert min(r.latency_ms or 0 for r in results) >= 300.0
    # The server saw the requests arrive at the scheduled pace, many at once.
    scheduled, seen = server_view(stub, results)
    assert len(seen) == len(results) and slope(scheduled, seen) > 0.8
    assert stub.max_in_flight > 10


def test_arrivals_at_the_bound_are_dropped_not_queued() -> None:
    bound, delay = 4, 0.5
    with StubServer(fixed_delay_s=delay, labels=LABELS) as stub:
        plan = build_plan(80.0, 1.6, NoDeadline(), len(SAMPLES), seed=2)
        results = run_load(Target(stub.url), plan, SAMPLES, concurrency=bound)
    sent = [r for r in results if not r.dropped]
    dropped = [r for r in results if r.dropped]
    assert len(sent) + len(dropped) == len(plan.arrivals) > 80
    # Slots free up every `delay` seconds: at most bound * (duration / delay + 1) sends.
    assert bound <= len(sent) <= bound * 5
    assert all(r.send_s is None and r.status == 0 and not r.deadline_met for r in dropped)
    assert max_overlap(results) <= bound and stub.max_in_flight <= bound
    # Sends that did go out went out on schedule, and kept going through the whole run.
    assert_on_schedule(results)
    assert max(r.scheduled_s for r in sent) > 1.6 - delay - 0.2
    summary = summarize(results, 80.0, 1.6)
    assert summary["counts"]["dropped"] == len(dropped)
    assert summary["deadline_hit_rate"] == pytest.approx(len(sent) / len(results), abs=1e-6)


def test_deadlines_shedding_and_correctness() -> None:
    with StubServer(column_ms=(2.0, 30.0), labels=LABELS) as stub:
        plan = build_plan(40.0, 1.5, Uniform(1.0, 60.0), len(SAMPLES), seed=3)
        results = run_load(Target(stub.url), plan, SAMPLES, concurrency=64)
    by_deadline = {r.index: plan.arrivals[r.index].deadline_ms for r in results}
    for r in results:
        assert r.deadline_ms == by_deadline[r.index]
        # The header carries what is left of the deadline when the request leaves.
        budget = stub.budgets[f"loadtest-{r.index}"]
        assert r.send_s is not None and budget == pytest.approx(
            max(r.deadline_ms - max(r.send_s - r.scheduled_s, 0.0) * 1000.0, 0.001), abs=2e-3
        )
        assert budget <= r.deadline_ms + 1e-3  # the header has 3 decimals
        if budget < 2.0:
            assert r.shed and r.error == "shed:deadline" and not r.deadline_met
        elif budget < 30.0:
            assert r.column == 1 and r.predicted == WRONG and r.correct is (r.label == WRONG)
        else:
            assert r.column == 2 and r.correct is True
        if r.ok:
            assert r.deadline_met == (r.latency_ms is not None and r.latency_ms <= r.deadline_ms)
    assert {r.column for r in results if r.ok} == {1, 2}


def test_forced_column_and_stream() -> None:
    with StubServer(column_ms=(5.0, 40.0), labels=LABELS) as stub:
        plan = build_plan(30.0, 1.0, Fixed(500.0), len(SAMPLES), seed=4)
        results = run_load(Target(stub.url, column=2, stream=True), plan, SAMPLES, 32)
    assert results and all(r.ok and r.column == 2 and r.correct for r in results)
    for r in results:
        assert r.first_answer_ms is not None and r.latency_ms is not None
        assert 5.0 <= r.first_answer_ms < r.latency_ms
        assert r.latency_ms >= 45.0
    summary = summarize(results, 30.0, 1.0)
    assert summary["stream_first_answer_ms"]["p50"] < summary["latency_ms"]["p50"]


def test_connection_refused_counts_as_errors() -> None:
    with StubServer() as stub:
        url = stub.url
    plan = build_plan(20.0, 0.5, Fixed(50.0), len(SAMPLES), seed=5)
    results = run_load(Target(url, timeout_s=2.0), plan, SAMPLES, concurrency=8)
    assert results and all(r.status == 0 and r.error and not r.deadline_met for r in results)
    counts = summarize(results, 20.0, 0.5)["counts"]
    assert counts["errors"] + counts["dropped"] == len(results)


def test_worker_processes_share_the_schedule() -> None:
    with StubServer(column_ms=(2.0, 10.0), labels=LABELS) as stub:
        plan = build_plan(100.0, 1.5, Fixed(50.0), len(SAMPLES), seed=6)
        results = run_load(Target(stub.url), plan, SAMPLES, concurrency=1000, workers=2)
    assert [r.index for r in results] == list(range(len(plan.arrivals)))
    assert {r.worker for r in results} == {0, 1}
    assert all(r.ok and r.column == 2 for r in results), {r.error for r in results}
    for worker in (0, 1):
        assert_on_schedule([r for r in results if r.worker == worker])
    assert len(stub.arrivals) == len(results)


def test_the_heap_is_settled_before_the_schedule_starts() -> None:
    """What exists before the run is frozen out of the collector's sight, so a full
    collection during the run scans only the run's own objects; the collector stays on."""
    before = [object()]  # a container the collector tracks
    with StubServer(labels=LABELS) as stub:
        plan = build_plan(20.0, 0.3, NoDeadline(), len(SAMPLES), seed=7)
        results = run_load(Target(stub.url), plan, SAMPLES, concurrency=8)
    assert results and gc.isenabled()
    assert not any(o is before for o in gc.get_objects())


def test_a_request_sent_early_is_timed_from_its_send_and_keeps_its_deadline() -> None:
    early = Result(0, 0, scheduled_s=1.0, label="cat", deadline_ms=20.0, send_s=0.9996)
    late = Result(1, 0, scheduled_s=1.0, label="cat", deadline_ms=20.0, send_s=1.002)
    assert early.origin_s == 0.9996 and late.origin_s == 1.0
    assert budget_at_send(20.0, early.scheduled_s, 0.9996) == 20.0
    assert budget_at_send(20.0, late.scheduled_s, 1.002) == pytest.approx(18.0)
    assert Result(2, 0, 1.0, "cat", None).origin_s == 1.0  # not sent
