"""The open-loop load generator: worker processes, each an asyncio loop with a lean
HTTP/1.1 client (`loadtest.http1`).

The plan (arrival time, image and deadline of every request) is computed up front by
`build_plan`, a pure seeded function. Each worker sleeps until an arrival is due and
starts the request as a task without waiting for earlier ones, so a slow server never
slows the sender. Each worker has its own concurrency bound: an arrival that finds the
bound reached is recorded as dropped, not queued. Several processes share one start
instant so that together they can offer more load than one Python process could.

Latency is measured from the *scheduled* time, not the send time, so any lag of the
generator itself counts against the answer instead of hiding (coordinated omission);
`send_s - scheduled_s` shows that lag. The event loop's timers fire up to a millisecond
late (epoll waits in whole milliseconds), so a worker wakes `TIMER_SLACK_S` before an
arrival and sends it then: that measured lag is the harness's, not the server's. A
request sent before its scheduled time is timed from when it was sent (`origin_s`), so
sending early never shortens a latency.

Not httpx, nor aiohttp: on the 2-CPU development machine an httpx client spent about
4.5 ms of CPU per request against a trivial endpoint and aiohttp 0.26 ms, and with real
requests aiohttp 0.6-0.93 ms against the server's own 0.8 ms (measured side by side,
docs/loadtest.md). A generator that shares the machine with the server must be cheap, or
it measures itself.
"""

from __future__ import annotations

import asyncio
import gc
import math
import multiprocessing as mp
import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import orjson

from loadtest.deadlines import Deadline, sample_deadlines
from loadtest.http1 import Client, Response
from loadtest.samples import Sample
from loadtest.schedule import deal, poisson_arrivals, split_bound
from service.protocol import (
    CLASSIFY_PATH,
    LIVE_PATH,
    NO_DONE,
    Answer,
    SseParser,
    after_event,
    answer_from_json,
    classify_headers,
    error_text,
    server_timing,
)

TIMER_SLACK_S = 0.001
"""How early a worker wakes for an arrival: the event loop's timer granularity."""
START_DELAY_S = 0.2
"""Time between the start signal and the first scheduled instant."""
READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Arrival:
    index: int
    at_s: float
    """Scheduled time, seconds after the run's start."""
    sample: int
    """Index into the sample list."""
    deadline_ms: float
    """NaN: no deadline header."""


@dataclass(frozen=True)
class Target:
    """Where requests go and how they are sent."""

    url: str
    """Base URL, e.g. http://127.0.0.1:8000."""
    column: int | None = None
    stream: bool = False
    timeout_s: float = 10.0
    ceiling: bool = False
    """GET /v2/health/live instead of classifying: measures the generator itself."""


@dataclass
class Result:
    """One scheduled request and what became of it (times in seconds after the start)."""

    index: int
    worker: int
    scheduled_s: float
    label: str
    deadline_ms: float | None
    image: int | None = None
    """Which image of the sample list it sent (the same index means the same image)."""
    send_s: float | None = None
    latency_ms: float | None = None
    server_ms: float | None = None
    """The server's elapsed time for it (arrival to answer, by its own clock, from the send
    when it honours `X-Request-Start`; answered requests only): `latency_ms - server_ms`
    is the time spent outside the server."""
    queue_ms: float | None = None
    """Of the server's time, waiting for its batch to start (its `Server-Timing` header;
    single answers only)."""
    inference_ms: float | None = None
    """Of the server's time, its batch's run, hand-back to the event loop included."""
    transit_ms: float | None = None
    """Of the server's time, the way from the send to the server reading the request
    (`X-Request-Start`, which the generator stamps; absent when the server ignores it)."""
    status: int = 0
    """HTTP status; 0 when there was none (dropped, connection error, timeout)."""
    column: int | None = None
    predicted: str | None = None
    correct: bool | None = None
    deadline_met: bool = False
    first_answer_ms: float | None = None
    """Streams: scheduled time to the first `prediction` event."""
    dropped: bool = False
    error: str | None = None

    @property
    def origin_s(self) -> float:
        """Where its latency counts from: the scheduled time, or the send time if it went
        out earlier (by at most `TIMER_SLACK_S`)."""
        return self.scheduled_s if self.send_s is None else min(self.scheduled_s, self.send_s)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300 and self.error is None

    @property
    def shed(self) -> bool:
        return self.status == 503


@dataclass(frozen=True)
class Plan:
    arrivals: tuple[Arrival, ...]
    rate_rps: float
    duration_s: float
    seed: int
    deadline_spec: str = "none"


def build_plan(
    rate_rps: float, duration_s: float, deadline: Deadline, samples: int, seed: int
) -> Plan:
    """Every request of a run, fixed in advance: the same seed gives the same plan."""
    times = poisson_arrivals(rate_rps, duration_s, seed)
    picks = np.random.default_rng(seed + 1).integers(0, max(samples, 1), len(times))
    deadlines = sample_deadlines(deadline, len(times), seed + 2)
    arrivals = tuple(
        Arrival(i, round(float(t), 6), int(s), float(d))
        for i, (t, s, d) in enumerate(zip(times, picks, deadlines, strict=True))
    )
    return Plan(arrivals, rate_rps, duration_s, seed, deadline.spec())


def split_warmup(results: Sequence[Result], warmup_s: float) -> tuple[list[Result], list[Result]]:
    """The results scheduled in a run's first `warmup_s`, and the rest re-timed from the
    end of the warm-up (scheduled and send times less `warmup_s`, indices from 0): a run
    measured from there, with the server already under the load."""
    if warmup_s <= 0:
        return [], list(results)
    warm = [r for r in results if r.scheduled_s < warmup_s]
    rest = [r for r in results if r.scheduled_s >= warmup_s]
    return warm, [
        replace(
            r,
            index=i,
            scheduled_s=round(r.scheduled_s - warmup_s, 6),
            send_s=None if r.send_s is None else r.send_s - warmup_s,
        )
        for i, r in enumerate(rest)
    ]


def _deadline(arrival: Arrival) -> float | None:
    return None if math.isnan(arrival.deadline_ms) else arrival.deadline_ms


def budget_at_send(deadline_ms: float | None, scheduled_s: float, send_s: float) -> float | None:
    """The `X-Deadline-Ms` a request carries: its deadline less what the generator already
    spent since the scheduled time (its send lag), as a client that propagates deadlines
    sends them (gRPC sends the time left, not the original timeout). The server counts the
    budget from arrival, so the full deadline would promise it time that is gone. At least
    1 us: a request that is already late is still sent, and answered or shed. One sent
    early carries its whole deadline."""
    if deadline_ms is None:
        return None
    return max(deadline_ms - max(send_s - scheduled_s, 0.0) * 1000.0, 0.001)


def _ms(seconds: float) -> float:
    """Milliseconds, to the microsecond (the clock is no finer in practice)."""
    return round(seconds * 1000.0, 3)


def _since(t0: float, instant_s: float) -> float:
    """A `time.monotonic()` instant in seconds from the schedule's start, to the microsecond."""
    return round(instant_s - t0, 6)


def _finish(result: Result, answer: Answer, done_s: float) -> Result:
    result.latency_ms = _ms(done_s - result.origin_s)
    result.column, result.predicted = answer.column, answer.class_name
    result.server_ms = answer.server_ms
    result.error = answer.error
    if answer.class_name is not None and result.label:
        result.correct = answer.class_name == result.label
    within = result.deadline_ms is None or result.latency_ms <= result.deadline_ms
    result.deadline_met = result.ok and within
    return result


async def _send(
    client: Client,
    target: Target,
    sample: Sample | None,
    result: Result,
    t0: float,
) -> Result:
    """Send one request and fill `result`; never raises."""

    def now() -> float:
        return _since(t0, time.monotonic())

    result.send_s = now()
    try:
        async with asyncio.timeout(target.timeout_s):
            if sample is None:
                response = await client.request("GET", LIVE_PATH)
                result.status = response.status
                ok = 200 <= result.status < 300
                answer = Answer() if ok else Answer(error=error_text(result.status, response.body))
                return _finish(result, answer, _since(t0, response.done_s))
            headers = classify_headers(
                sample.content_type,
                budget_at_send(result.deadline_ms, result.scheduled_s, result.send_s),
                target.column,
                target.stream,
                request_id=f"loadtest-{result.index}",
                request_start_s=time.time(),
            )
            if target.stream:
                return await _send_stream(client, headers, sample, result, t0)
            response = await client.request("POST", CLASSIFY_PATH, headers.items(), sample.data)
            done_s = _since(t0, response.done_s)
            result.status = response.status
            if not 200 <= response.status < 300:
                error = error_text(result.status, response.body)
                return _finish(result, Answer(error=error), done_s)
            answer = answer_from_json(orjson.loads(response.body))
            timing = server_timing(response.headers.get("server-timing"))
            result.queue_ms = timing.get("queue")
            result.inference_ms = timing.get("inference")
            result.transit_ms = timing.get("transit")
            return _finish(result, answer, done_s)
    except TimeoutError:
        return _finish(result, Answer(error="timeout"), now())
    except Exception as exc:  # every arrival must end as a result, whatever went wrong
        return _finish(result, Answer(error=f"{type(exc).__name__}: {exc}"[:160]), now())


async def _send_stream(
    client: Client,
    headers: dict[str, str],
    sample: Sample,
    result: Result,
    t0: float,
) -> Result:
    """A progressive request: its events parsed as their bytes arrive, so that the first
    answer is timed when it is read."""

    def now() -> float:
        return _since(t0, time.monotonic())

    answer, parser, pending = NO_DONE, SseParser(), b""
    error_body: list[bytes] = []

    def feed(raw: bytes) -> None:
        nonlocal answer
        for event in parser.feed(raw.decode("utf-8", "replace").rstrip("\r")):
            if event.name == "prediction" and result.first_answer_ms is None:
                result.first_answer_ms = _ms(now() - result.origin_s)
            answer = after_event(answer, event)

    def on_body(response: Response, chunk: bytes) -> None:
        nonlocal pending
        if not 200 <= response.status < 300:
            error_body.append(chunk)
            return
        *complete, pending = (pending + chunk).split(b"\n")
        for raw in complete:
            feed(raw)

    response = await client.request("POST", CLASSIFY_PATH, headers.items(), sample.data, on_body)
    result.status = response.status
    if not 200 <= response.status < 300:
        error = error_text(result.status, b"".join(error_body))
        return _finish(result, Answer(error=error), now())
    feed(pending)  # a last line without its ending
    feed(b"")  # a last event without its blank line
    return _finish(result, answer, _since(t0, response.done_s))


async def run_share(
    target: Target,
    arrivals: Sequence[Arrival],
    samples: Sequence[Sample],
    bound: int,
    start: Callable[[], float],
    worker: int = 0,
) -> list[Result]:
    """Send this worker's arrivals on schedule, at most `bound` in flight; all results.

    `start()` is called once the clients are built (which takes a while on a busy
    machine) and returns the time.monotonic() instant that the schedule counts from.
    """
    results: list[Result] = []
    in_flight: set[asyncio.Task[Result]] = set()
    client = Client(target.url)

    def collect(task: asyncio.Task[Result]) -> None:
        in_flight.discard(task)
        results.append(task.result())

    try:
        settle_heap()
        start_monotonic = start()
        for arrival in arrivals:
            delay = start_monotonic + arrival.at_s - time.monotonic()
            if delay > TIMER_SLACK_S:
                await asyncio.sleep(delay - TIMER_SLACK_S)
            sample = None if target.ceiling else samples[arrival.sample]
            result = Result(
                arrival.index,
                worker,
                arrival.at_s,
                label=sample.label if sample else "",
                deadline_ms=_deadline(arrival),
                image=arrival.sample if sample else None,
            )
            if len(in_flight) >= bound:
                result.dropped = True
                results.append(result)
                continue
            task = asyncio.create_task(_send(client, target, sample, result, start_monotonic))
            in_flight.add(task)
            task.add_done_callback(collect)
        while in_flight:
            await asyncio.wait(set(in_flight))
    finally:
        await client.close()
    return results


def settle_heap() -> None:
    """Collect, then freeze what is left (the imported modules, the clients) out of the
    garbage collector's sight. A full collection scans every tracked object: some 60,000
    in a worker, 20-45 ms here, during which the worker neither sends nor reads and every
    request in flight looks that much later. After the freeze it scans only what the run
    itself creates. (`timeit` disables the collector for the same reason; a run of
    unbounded length cannot.)"""
    gc.collect()
    gc.freeze()


def _worker_main(
    worker: int,
    target: Target,
    arrivals: Sequence[Arrival],
    samples: Sequence[Sample],
    bound: int,
    ready: Any,
    go: Any,
    start_wall: Any,
    out: Any,
) -> None:
    def start() -> float:
        ready.put(worker)
        if not go.wait(READY_TIMEOUT_S):
            raise RuntimeError("no start signal")
        return time.monotonic() + (start_wall.value - time.time())

    try:
        results = asyncio.run(run_share(target, arrivals, samples, bound, start, worker))
    except BaseException as exc:  # report, rather than leave the parent waiting
        out.put((worker, f"{type(exc).__name__}: {exc}"))
        raise
    out.put((worker, results))


def run_load(
    target: Target,
    plan: Plan,
    samples: Sequence[Sample],
    concurrency: int,
    workers: int = 1,
    on_start: Callable[[float], None] | None = None,
) -> list[Result]:
    """Run `plan` against `target`; one Result per arrival, in schedule order.
    `on_start` is told the time.monotonic() instant the schedule counts from."""
    shares = [[plan.arrivals[i] for i in idx] for idx in deal(len(plan.arrivals), workers)]
    bounds = split_bound(concurrency, workers)
    if workers == 1:

        def start() -> float:
            origin = time.monotonic() + START_DELAY_S
            if on_start is not None:
                on_start(origin)
            return origin

        results = asyncio.run(run_share(target, shares[0], samples, bounds[0], start))
        return sorted(results, key=lambda r: r.index)

    # spawn, not fork: the parent may hold threads (a test's stub server, an event loop).
    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    start_wall = ctx.Value("d", 0.0)
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(w, target, shares[w], samples, bounds[w], ready, go, start_wall, out),
            daemon=True,
        )
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=READY_TIMEOUT_S)
        start_wall.value = time.time() + START_DELAY_S
        go.set()
        if on_start is not None:
            on_start(time.monotonic() + (start_wall.value - time.time()))
        limit = START_DELAY_S + plan.duration_s + target.timeout_s + READY_TIMEOUT_S
        merged: list[Result] = []
        for _ in procs:
            worker, part = out.get(timeout=limit)
            if isinstance(part, str):
                raise RuntimeError(f"load-generator worker {worker} failed: {part}")
            merged.extend(part)
    except queue.Empty:
        raise RuntimeError("a load-generator worker did not report back") from None
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    return sorted(merged, key=lambda r: r.index)
