"""The batcher with an injected clock and fake variants (no onnxruntime)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from service.batching import Batcher, Job
from service.errors import Unavailable
from service.settings import Settings


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass(eq=False)
class FakeVariant:
    key: str
    runs: list[tuple[str, int]] = field(default_factory=list)
    log: list[tuple[str, int]] | None = None
    fail: bool = False
    cost_ms: float = 1.0
    threads: list[int] = field(default_factory=list)

    def run(self, images: np.ndarray) -> np.ndarray:
        self.threads.append(threading.get_ident())
        if self.fail:
            raise RuntimeError("boom")
        entry = (self.key, int(images.shape[0]))
        self.runs.append(entry)
        if self.log is not None:
            self.log.append(entry)
        # "Probabilities" that identify each image: its first pixel, twice.
        return np.repeat(images[:, :1, 0, 0].astype(np.float32), 2, axis=1)

    def predict_ms(self, n: int, idle_ms: float = 0.0) -> float:
        return self.cost_ms * n


def job(
    variant: FakeVariant,
    pixel: int,
    deadline: float,
    clock: FakeClock,
    n: int = 1,
    drop: bool = False,
) -> Job:
    images = np.full((n, 2, 2, 3), pixel, dtype=np.uint8)
    return Job(variant, images, deadline, clock(), drop_when_late=drop)


async def test_queued_work_is_batched_and_fanned_out() -> None:
    clock = FakeClock()
    b = Batcher(clock, max_batch=32, max_wait_ms=0)
    v = FakeVariant("a")
    jobs = [job(v, pixel=i, deadline=1.0 + i, clock=clock) for i in range(5)]
    futures = [b.submit(j) for j in jobs]
    b.start()
    results = await asyncio.gather(*futures)
    await b.stop()
    assert v.runs == [("a", 5)]
    assert [int(r.probabilities[0, 0]) for r in results] == [0, 1, 2, 3, 4]
    assert all(r.batch_size == 5 for r in results)


async def test_max_batch_and_multi_image_jobs() -> None:
    clock = FakeClock()
    b = Batcher(clock, max_batch=4, max_wait_ms=0)
    v = FakeVariant("a")
    futures = [b.submit(job(v, i, 1.0 + i, clock, n=3)) for i in range(3)]
    b.start()
    results = await asyncio.gather(*futures)
    await b.stop()
    assert v.runs == [("a", 3), ("a", 3), ("a", 3)]
    assert [r.probabilities.shape[0] for r in results] == [3, 3, 3]


async def test_earliest_deadline_first_across_variants() -> None:
    clock = FakeClock()
    log: list[tuple[str, int]] = []
    b = Batcher(clock, max_batch=1, max_wait_ms=0)
    a, c = FakeVariant("a", log=log), FakeVariant("c", log=log)
    futures = [
        b.submit(job(a, 0, 3.0, clock)),
        b.submit(job(c, 0, 1.0, clock)),
        b.submit(job(a, 0, 2.0, clock)),
        b.submit(job(c, 0, 4.0, clock)),
    ]
    b.start()
    await asyncio.gather(*futures)
    await b.stop()
    assert [k for k, _ in log] == ["c", "a", "a", "c"]


async def test_cancelled_jobs_do_no_work() -> None:
    clock = FakeClock()
    b = Batcher(clock, max_batch=32, max_wait_ms=0)
    v = FakeVariant("a")
    keep, gone = job(v, 1, 2.0, clock), job(v, 2, 1.0, clock)
    b.submit(keep)
    b.submit(gone).cancel()
    b.start()
    await keep.future
    await b.stop()
    assert v.runs == [("a", 1)]


async def test_late_jobs_are_dropped_when_asked() -> None:
    clock = FakeClock()
    b = Batcher(clock, max_batch=32, max_wait_ms=0, retry_after_s=7)
    v = FakeVariant("a")
    late = job(v, 1, deadline=0.5, clock=clock, drop=True)
    late_ok = job(v, 2, deadline=0.5, clock=clock, drop=False)
    b.submit(late)
    b.submit(late_ok)
    clock.now = 1.0
    b.start()
    with pytest.raises(Unavailable) as refused:
        await late.future
    assert refused.value.retry_headers == {"Retry-After": "7"}  # the server's setting
    assert (await late_ok.future).batch_size == 1
    await b.stop()


async def test_work_left_at_stop_is_refused_with_the_retry_setting() -> None:
    clock = FakeClock()
    b = Batcher(clock, max_batch=32, max_wait_ms=0, retry_after_s=3)
    left = job(FakeVariant("a"), 1, deadline=5.0, clock=clock)
    b.submit(left)  # never started: stays queued
    await b.stop()
    with pytest.raises(Unavailable) as refused:
        await left.future
    assert refused.value.reason == "draining"
    assert refused.value.retry_headers == {"Retry-After": "3"}


async def test_failures_reach_every_waiting_request() -> None:
    clock = FakeClock()
    b = Batcher(clock, max_batch=32, max_wait_ms=0)
    v = FakeVariant("a", fail=True)
    futures = [b.submit(job(v, i, 1.0, clock)) for i in range(3)]
    b.start()
    results = await asyncio.gather(*futures, return_exceptions=True)
    await b.stop()
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_a_batch_waits_for_company_until_its_wait_ends() -> None:
    clock = FakeClock()
    b = Batcher(clock, max_batch=32, max_wait_ms=50)
    v = FakeVariant("a")
    b.start()
    first = b.submit(job(v, 1, 10.0, clock))
    await asyncio.sleep(0.01)
    assert v.runs == []  # still waiting: the fake clock has not moved
    second = b.submit(job(v, 2, 10.0, clock))
    clock.now = 0.06  # past the wait
    await asyncio.gather(first, second)
    await b.stop()
    assert v.runs == [("a", 2)]


async def test_snapshots_for_admission() -> None:
    clock = FakeClock()
    b = Batcher(clock, max_batch=32, max_wait_ms=0)
    a, c = FakeVariant("a"), FakeVariant("c")
    b.submit(job(a, 0, 1.0, clock, n=2))
    b.submit(job(c, 0, 5.0, clock))
    assert b.queued_images == 3
    assert {(w.key, w.images) for w in b.ahead_of(2.0)} == {("a", 2)}
    assert b.running_remaining_ms() == 0.0
    await b.stop()


async def test_an_idle_server_runs_a_short_job_at_once_on_the_loop() -> None:
    clock = FakeClock()
    inline: list[float] = []
    b = Batcher(clock, max_batch=32, max_wait_ms=0, inline_max_ms=3.0, on_inline_run=inline.append)
    v = FakeVariant("a")
    j = job(v, pixel=7, deadline=1.0, clock=clock)
    assert b.run_now(j)  # no worker started: it ran here
    assert j.future.done() and int(j.future.result().probabilities[0, 0]) == 7
    assert v.threads == [threading.get_ident()] and len(inline) == 1
    assert b.idle()


async def test_run_now_declines_when_busy_long_or_batches_wait() -> None:
    clock = FakeClock()
    b = Batcher(clock, max_batch=32, max_wait_ms=0, inline_max_ms=3.0)
    v = FakeVariant("a")
    b.submit(job(v, 1, 1.0, clock))
    assert not b.run_now(job(v, 2, 1.0, clock))  # something is queued: join the queue
    slow = FakeVariant("slow", cost_ms=5.0)
    assert not Batcher(clock, 32, 0, inline_max_ms=3.0).run_now(job(slow, 1, 1.0, clock))
    waiting = Batcher(clock, 32, max_wait_ms=2.0, inline_max_ms=3.0)
    assert not waiting.run_now(job(v, 1, 1.0, clock))  # batches wait for company
    assert not Batcher(clock, 32, 0).run_now(job(v, 1, 1.0, clock))  # switched off
    assert v.runs == [] and slow.runs == []
    await b.stop()


async def test_by_default_onnxruntime_runs_off_the_event_loop() -> None:
    """Inline runs are opt-in: with the default settings even a lone request on an idle
    server is run by the inference thread."""
    clock = FakeClock()
    b = Batcher(clock, max_batch=32, max_wait_ms=0, inline_max_ms=Settings().inline_run_max_ms)
    v = FakeVariant("a")
    lone = job(v, 1, 1.0, clock)
    assert not b.run_now(lone)
    b.submit(lone)
    b.start()
    await lone.future
    await b.stop()
    assert v.threads and v.threads[0] != threading.get_ident()


async def test_run_now_failure_reaches_the_request() -> None:
    clock = FakeClock()
    b = Batcher(clock, max_batch=32, max_wait_ms=0, inline_max_ms=3.0)
    j = job(FakeVariant("a", fail=True), 1, 1.0, clock)
    assert b.run_now(j)
    with pytest.raises(RuntimeError, match="boom"):
        await j.future


async def test_the_thread_runs_back_to_back_batches_while_the_event_loop_is_busy() -> None:
    """The inference thread takes its next batch itself: a busy event loop delays only the
    hand-back of results, never the next run."""
    clock = FakeClock()
    b = Batcher(clock, max_batch=1, max_wait_ms=0, inline_max_ms=3.0)
    v = FakeVariant("a")
    futures = [b.submit(job(v, i, 1.0 + i, clock)) for i in range(3)]
    b.start()
    give_up = time.monotonic() + 5.0
    while len(v.runs) < 3 and time.monotonic() < give_up:
        time.sleep(0.005)  # the event loop is blocked all along
    assert v.runs == [("a", 1)] * 3
    assert all(t != threading.get_ident() for t in v.threads)
    assert not any(f.done() for f in futures)  # handed back only once the loop runs
    results = await asyncio.gather(*futures)
    await b.stop()
    assert [int(r.probabilities[0, 0]) for r in results] == [0, 1, 2]
    assert b.idle()


async def test_order_key_places_a_job_but_its_deadline_drops_it() -> None:
    """A stream's first answer is ordered by its arrival, ahead of deeper work with an
    earlier deadline; lateness is still judged by its own deadline."""
    clock = FakeClock()
    log: list[tuple[str, int]] = []
    b = Batcher(clock, max_batch=1, max_wait_ms=0)
    deep, first = FakeVariant("deep", log=log), FakeVariant("first", log=log)
    b.submit(job(deep, 1, deadline=0.5, clock=clock))
    urgent = job(first, 2, deadline=0.9, clock=clock)
    urgent = Job(urgent.variant, urgent.images, 0.9, clock(), drop_when_late=True, order_s=0.0)
    b.submit(urgent)
    assert [w.key for w in b.ahead_of(0.0)] == ["first"]
    late = Job(first, np.zeros((1, 2, 2, 3), np.uint8), 0.2, 0.0, drop_when_late=True, order_s=0.0)
    f_late = b.submit(late)
    clock.now = 0.3  # past the late job's deadline, not past the others'
    b.start()
    await asyncio.gather(urgent.future, return_exceptions=True)
    with pytest.raises(Unavailable):
        await f_late
    await asyncio.sleep(0.01)
    await b.stop()
    assert log[0] == ("first", 1) and ("deep", 1) in log


async def test_many_jobs_submitted_while_the_thread_runs_all_come_back() -> None:
    """The event loop submits while the thread takes batches: every job gets its own
    answer, and the batcher ends idle (its counts shared across threads stay right)."""
    clock = FakeClock()
    b = Batcher(clock, max_batch=8, max_wait_ms=0)
    variants = [FakeVariant("a"), FakeVariant("c")]
    b.start()
    futures = []
    for i in range(400):
        futures.append(b.submit(job(variants[i % 2], i % 250, 1.0 + i, clock)))
        if i % 7 == 0:
            await asyncio.sleep(0)
    results = await asyncio.gather(*futures)
    await b.stop()
    assert [int(r.probabilities[0, 0]) for r in results] == [i % 250 for i in range(400)]
    assert sum(n for v in variants for _, n in v.runs) == 400
    assert b.idle() and b.queued_images == 0


async def test_each_run_reports_how_long_its_thread_sat_idle() -> None:
    """The latency model learns runs after idle apart: the batcher tells how long the
    thread sat idle before each run, and how long a run now would follow the last one."""
    clock = FakeClock()
    told: list[float] = []
    b = Batcher(clock, 1, 0, on_batch=lambda variant, n, ms, idle_ms: told.append(idle_ms))
    v = FakeVariant("a")
    b.start()
    clock.now = 0.05
    assert b.idle_ms() == pytest.approx(50.0)  # since the thread started
    await asyncio.gather(*(b.submit(job(v, i, 9.0, clock)) for i in range(3)))
    assert told == [pytest.approx(50.0), 0.0, 0.0]  # the clock stood still while they ran
    clock.now = 0.25
    assert b.idle_ms() == pytest.approx(200.0)
    late = b.submit(job(v, 1, 9.0, clock))
    assert b.idle_ms() == 0.0  # work is queued (or running): the next run follows it
    await late
    assert told[-1] == pytest.approx(200.0)
    await b.stop()
