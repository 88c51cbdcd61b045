"""Admission under overload: how many requests with a deadline the server takes on at once,
and how far behind its event loop runs. Knows no HTTP; the engine decides with it.

A server that is offered more than it can do must refuse the excess before spending work on
it, and must refuse enough that what it admits is still answered in time. The latency
profile alone cannot tell how much is enough: past saturation the time goes to the event
loop and to hand-offs between threads, not to inference. So the number admitted at once is
a limit learned from outcomes, the way TCP learns its window (additive increase,
multiplicative decrease), and the loop's lag is kept from every budget at arrival.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class ConcurrencyLimit:
    """Requests with a deadline admitted at once, adapted to how in time they are answered.

    An answer with room to spare (under `early` of its deadline) raises the limit by
    1/limit, about one per round of requests; an answer late or nearly so (over `late`)
    cuts it by the factor `cut`, but only if its request arrived after the last cut: the
    requests in flight at a cut were admitted under the old limit and are late together,
    and one cut is the answer to all of them (TCP cuts its window once per round trip for
    the same reason). Cutting again for each of them would, after one stall of the
    machine, leave a limit far below what the load needs, and refuse requests that would
    have been in time. Aiming under 80% of the deadline leaves the rest for what the
    server cannot see: the time a request waits in the network and the kernel on either
    side.

    The limit moves only while it is engaged: while at least `engaged` of it is in
    flight. A late answer with few requests in says the lateness came from elsewhere (a
    burst of arrivals, the machine, the network), not from admitting too many, and cutting
    a limit that does not bind only makes it bind later, refusing requests that would have
    been in time. Likewise an early answer with few in says nothing about room for more
    (TCP grows its window only while the window is used, RFC 7661, for the same reason),
    except below where the limit started: after an overload it grows back there freely.
    And it is cut only while late answers are common (over `late_share_max` of recent
    ones): under a moderate Poisson load a few answers in a hundred run late, in bursts
    that fill the server for a moment and pass, and a cut for each burst ratchets the
    limit down until it refuses every burst; under overload most answers are late.
    """

    limit: float
    ceiling: float
    floor: float = 1.0
    cut: float = 0.7
    early: float = 0.5
    late: float = 0.8
    engaged: float = 0.5
    late_share_max: float = 0.2
    late_share: float = 0.0
    """Running mean (by `smoothing`) of the share of answers over `late`."""
    start: float = field(init=False)
    """Where the limit started: it may grow back to here whether engaged or not, so that
    it recovers after an overload."""
    by_deadline: bool = False
    """Scale the limit by each request's deadline against the typical one (below)."""
    reference_ms: float | None = None
    """The deadline the limit was learnt for: a running mean of answered requests' ones."""
    smoothing: float = 0.05
    in_flight: int = 0
    last_cut_s: float = -math.inf

    def __post_init__(self) -> None:
        self.start = self.limit

    @property
    def full(self) -> bool:
        return self.in_flight >= int(self.limit)

    def full_for(self, deadline_ms: float) -> bool:
        """Whether a request with this deadline is refused. With `by_deadline`, the limit
        counts as requests per typical deadline (Little's law: what a server can hold and
        still answer in time grows with the time it is given), so a request with twice the
        typical deadline may find twice as many in, and one with half of it half as many.
        With one deadline for all, that is the plain limit."""
        if not self.by_deadline or self.reference_ms is None:
            return self.full
        allowed = int(self.limit * deadline_ms / self.reference_ms)
        return self.in_flight >= max(allowed, 1)

    @contextlib.contextmanager
    def admitted(self) -> Iterator[Callable[[], None]]:
        """Counts one request in while the block runs. It yields a function that lets the
        slot go earlier (at most once): a stream whose first answer is out runs its deeper
        columns on spare capacity only, so it should not hold a slot until its deadline."""
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1

        self.in_flight += 1
        try:
            yield release
        finally:
            release()

    def outcome(self, seen_ms: float, deadline_ms: float, now_s: float, arrived_s: float) -> None:
        """An answer seen `seen_ms` after its request arrived (at `arrived_s`)."""
        if self.by_deadline:
            ref = self.reference_ms if self.reference_ms is not None else deadline_ms
            self.reference_ms = ref + self.smoothing * (deadline_ms - ref)
        late = seen_ms > self.late * deadline_ms
        self.late_share += self.smoothing * (float(late) - self.late_share)
        engaged = self.in_flight >= self.engaged * self.limit
        if late:
            if engaged and self.late_share > self.late_share_max and arrived_s > self.last_cut_s:
                self.limit = max(self.floor, self.limit * self.cut)
                self.last_cut_s = now_s
        elif seen_ms < self.early * deadline_ms and (engaged or self.limit < self.start):
            self.limit = min(self.ceiling, self.limit + 1.0 / self.limit)


@dataclass
class ArrivalGap:
    """The mean gap between requests reaching the engine, in ms (smoothed by
    `smoothing`; infinite until two have arrived): how soon the next one is due.

    A gap counts at most `clip` times the mean so far: with Poisson arrivals one gap in
    55 is longer (the mean reads 1.8% short), but a pause before a burst (one gap of
    seconds) would otherwise read as a quiet spell for the burst's first ~80 arrivals,
    and deeper columns would crowd it; with the clip the mean still grows 15% an
    arrival (at smoothing 0.05) when the traffic really thins out."""

    smoothing: float = 0.05
    clip: float = 4.0
    gap_ms: float = math.inf
    last_s: float | None = None

    def observe(self, arrival_s: float) -> None:
        if self.last_s is not None:
            gap = max(arrival_s - self.last_s, 0.0) * 1000.0
            if math.isinf(self.gap_ms):
                self.gap_ms = gap
            else:
                gap = min(gap, self.clip * self.gap_ms)
                self.gap_ms += self.smoothing * (gap - self.gap_ms)
        self.last_s = arrival_s if self.last_s is None else max(self.last_s, arrival_s)


@dataclass
class Headroom:
    """How often recent requests came close to missing their deadlines: a running mean
    (by `smoothing`) of the share refused, or answered with under `margin_ms` of their
    deadline left. Starts at 1 (close), so that a new server is careful until its answers
    show room to spare."""

    margin_ms: float
    smoothing: float = 0.02
    close_share: float = 1.0

    def observe(self, left_ms: float) -> None:
        """An answer with `left_ms` of its deadline to spare (negative: late; -inf: refused)."""
        close = left_ms < self.margin_ms
        self.close_share += self.smoothing * (float(close) - self.close_share)


@dataclass
class LoopLag:
    """How late the event loop runs a timer, in ms (smoothed). A request waits about this
    long before the server reads it, and again before its answer leaves."""

    clock: Callable[[], float] = time.monotonic
    period_s: float = 0.005
    smoothing: float = 0.3
    lag_ms: float = 0.0
    excused_ms: float = 0.0
    on_sample: Callable[[float], None] | None = None
    """Told every raw sample (ms late, inference run on the loop excused): a metric."""
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            start, excused = self.clock(), self.excused_ms
            await asyncio.sleep(self.period_s)
            self.observe((self.clock() - start - self.period_s) * 1000.0, self.excused_ms - excused)

    def observe(self, late_ms: float, excused_ms: float = 0.0) -> None:
        """One timer `late_ms` behind, of which `excused_ms` went to inference run on the
        loop on purpose (a run the batch would have waited for anyway, not a backlog)."""
        late_ms = max(late_ms - excused_ms, 0.0)
        self.lag_ms += self.smoothing * (late_ms - self.lag_ms)
        if self.on_sample is not None:
            self.on_sample(late_ms)

    def excuse(self, ms: float) -> None:
        """The loop was busy `ms` running inference itself (`run_on_loop`)."""
        self.excused_ms += ms

    def allowance_ms(self, stamped: bool = False) -> float:
        """Kept from a request's budget at arrival: one lag on the way in, one out; one
        only for a request whose way in its deadline counts already (`stamped`:
        X-Request-Start)."""
        return (1.0 if stamped else 2.0) * self.lag_ms
