"""Dynamic batching: per-variant deadline-ordered queues, inference threads, fan-out.

The decisions (which queue, how many items, whether to wait) are the pure functions of
`service.scheduling`; this module owns the rest: the queues, shared by the event loop
(which submits) and the inference threads (which take batches and run them), and handing
every waiting request its slice of the result or the exception on the event loop. The
clock is injected (monotonic seconds) so tests can drive time.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from service.errors import Unavailable
from service.scheduling import Queued, Waiting, pick_queue, plan_batch, run_on_loop

log = logging.getLogger(__name__)


class Runnable(Protocol):
    key: str

    def run(self, images: np.ndarray) -> np.ndarray: ...

    def predict_ms(self, n: int, idle_ms: float = 0.0) -> float: ...


@dataclass(frozen=True)
class JobResult:
    probabilities: np.ndarray
    queue_ms: float
    inference_ms: float
    batch_size: int


@dataclass(eq=False)
class Job:
    variant: Runnable
    images: np.ndarray
    deadline_s: float
    enqueued_s: float
    drop_when_late: bool
    order_s: float | None = None
    """Its place in earliest-deadline-first order when not its deadline: a stream's first
    answer goes by its arrival, ahead of deeper work (docs/serving.md)."""
    future: asyncio.Future[JobResult] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def size(self) -> int:
        return int(self.images.shape[0])


QueueEntry = tuple[float, int, Job]


class Batcher:
    """Per-variant queues in earliest-deadline-first order, served by inference threads.

    Each thread picks its own next batch the moment it is free (`pick_queue`,
    `plan_batch`), so back-to-back batches never wait for the event loop: a loaded event
    loop delays only the hand-back of results, not the next run. The queues are shared
    with the event loop under a lock; futures are resolved on the loop."""

    def __init__(
        self,
        clock: Callable[[], float],
        max_batch: int,
        max_wait_ms: float,
        workers: int = 1,
        on_queue_change: Callable[[Runnable, int], None] | None = None,
        on_batch: Callable[[Runnable, int, float, float], None] | None = None,
        inline_max_ms: float = 0.0,
        on_inline_run: Callable[[float], None] | None = None,
        load: Callable[[], tuple[int, float]] = lambda: (1, 0.0),
        retry_after_s: int = 1,
        on_handoff: Callable[[str, float], None] | None = None,
        max_run_ms: float = math.inf,
    ) -> None:
        self.clock = clock
        self.retry_after_s = retry_after_s
        """Retry-After of the 503 for a job dropped as late, or left when stopping."""
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.max_run_ms = max_run_ms
        self.workers = workers
        self._queues: dict[Runnable, list[QueueEntry]] = {}
        self._images: dict[Runnable, int] = {}
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        """Notified when work is queued, and at stop."""
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running_until: dict[int, float] = {}
        self._ended_s: dict[int, float] = {}
        """When each thread's last run ended (from its start): the idle time before a run."""
        self._last_end_s = clock()
        """When the last run on any thread (or on the loop) ended."""
        self._on_queue_change = on_queue_change or (lambda v, n: None)
        self._on_batch = on_batch or (lambda v, n, ms, idle_ms: None)
        """Told of every run: its variant, images, ms and the ms its thread sat idle before."""
        self.inline_max_ms = inline_max_ms
        self._on_inline_run = on_inline_run or (lambda ms: None)
        self._load = load
        """(requests in the server, event-loop lag in ms) for `run_on_loop`."""
        self.running_batches = 0
        """Batches taken and not yet handed back (on the event loop)."""
        self._on_handoff = on_handoff or (lambda direction, ms: None)
        """Told ("to_thread", ms) when an idle thread took a batch (from the newest job's
        arrival in the queue), and ("back", ms) for every batch (from the run's end until
        the event loop handed its results out)."""

    # -- submission and snapshots -------------------------------------------------------
    def submit(self, job: Job) -> asyncio.Future[JobResult]:
        order = job.deadline_s if job.order_s is None else job.order_s
        with self._work:
            queue = self._queues.setdefault(job.variant, [])
            bisect.insort(queue, (order, next(self._seq), job))
            images = self._images[job.variant] = self._images.get(job.variant, 0) + job.size
            self._work.notify()
        self._on_queue_change(job.variant, images)
        return job.future

    @property
    def queued_images(self) -> int:
        return sum(self._images.values())

    def queued_for(self, variant: Runnable) -> int:
        return self._images.get(variant, 0)

    def ahead_of(self, order_s: float) -> list[Waiting]:
        """Queued images at or before `order_s` in EDF order, per variant."""
        ahead = []
        with self._lock:
            for variant, queue in self._queues.items():
                images = sum(e[2].size for e in queue if e[0] <= order_s and not e[2].future.done())
                if images:
                    ahead.append(Waiting(variant.key, images))
        return ahead

    def running_remaining_ms(self) -> float:
        """Predicted ms until a worker frees up (0 when one is idle)."""
        running = list(self._running_until.values())
        if len(running) < self.workers:
            return 0.0
        return max(min(running) - self.clock(), 0.0) * 1000.0

    def idle(self) -> bool:
        return self.queued_images == 0 and self.running_batches == 0

    def idle_ms(self) -> float:
        """How long the next run would follow the last one: 0 while work is queued or
        every thread is busy (it runs back to back), else the ms since the latest end of a
        run on a free thread (the least idle: the prediction errs fast, not slow)."""
        if self.queued_images:
            return 0.0
        with self._lock:
            free = [end for i, end in self._ended_s.items() if i not in self._running_until]
        if not free:
            return 0.0
        return max(self.clock() - max(free), 0.0) * 1000.0

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._ended_s = {i: self.clock() for i in range(self.workers)}
        self._threads = [
            threading.Thread(target=self._worker, args=(i,), name=f"inference-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()

    async def stop(self) -> None:
        with self._work:
            self._stopping = True
            self._work.notify_all()
        for thread in self._threads:
            await asyncio.to_thread(thread.join)
        self._threads = []
        with self._lock:
            left = [entry[2] for queue in self._queues.values() for entry in queue]
            self._queues.clear()
            self._images.clear()
        refusal = Unavailable("server stopping", "draining", self.retry_after_s)
        _fail([job for job in left if not job.future.done()], refusal)

    def run_now(self, job: Job) -> bool:
        """Run `job` at once, on the event loop, when the server has nothing else to do
        and batches do not wait for company (`run_on_loop`): no queue, no wake-up of the
        worker, no thread hand-off. Returns whether it ran; its future then holds the
        result or the exception. Otherwise the caller submits it."""
        n = job.size
        if self.max_wait_ms > 0 or not self.idle() or n > self.max_batch:
            return False
        idle_ms = max(self.clock() - self._last_end_s, 0.0) * 1000.0
        predicted_ms = job.variant.predict_ms(n, idle_ms)
        if not run_on_loop(n, predicted_ms, 0, 0, self.inline_max_ms, *self._load()):
            return False
        start = self.clock()
        try:
            probs = job.variant.run(job.images)
        except Exception as exc:
            log.exception("inference failed for %s (batch %d)", job.variant.key, n)
            job.future.set_exception(exc)
            return True
        self._last_end_s = self.clock()
        ms = (self._last_end_s - start) * 1000.0
        self._on_inline_run(ms)
        self._complete([job], probs, start, ms, None, idle_ms)
        return True

    # -- the inference threads ----------------------------------------------------------
    def _worker(self, index: int) -> None:
        while True:
            try:
                taken = self._take(index)
            except Exception:  # a bug in planning must not stop the thread for good
                log.exception("inference thread %d could not take a batch", index)
                time.sleep(0.01)
                continue
            if taken is None:
                return
            batch, woke = taken
            variant = batch[0].variant
            images = (
                batch[0].images
                if len(batch) == 1
                else np.concatenate([job.images for job in batch])
            )
            began = self.clock()
            idle_ms = max(began - self._ended_s.get(index, began), 0.0) * 1000.0
            if woke:
                newest = max(job.enqueued_s for job in batch)
                self._on_handoff("to_thread", max(began - newest, 0.0) * 1000.0)
            try:
                outcome: np.ndarray | BaseException = variant.run(images)
            except Exception as exc:  # fan the failure out; the thread lives on
                log.exception("inference failed for %s (batch %d)", variant.key, len(images))
                outcome = exc
            ended = self.clock()
            with self._lock:
                self._running_until.pop(index, None)
                self._ended_s[index] = self._last_end_s = ended
            ms = (ended - began) * 1000.0
            self._post(self._complete, batch, outcome, began, ms, ended, idle_ms)

    def _take(self, index: int) -> tuple[list[Job], bool] | None:
        """The next batch for thread `index`, and whether the thread slept idle first;
        None at stop. Blocks while there is nothing to run."""
        woke = False
        changes: list[tuple[Runnable, int]] = []
        try:
            with self._work:
                while not self._stopping:
                    now = self.clock()
                    changes += self._drop_dead(now)
                    heads = {v: q[0][0] for v, q in self._queues.items() if q}
                    variant = pick_queue(heads)
                    if variant is None:
                        self._work.wait()
                        woke = True
                        continue
                    queue = self._queues[variant]
                    plan = plan_batch(
                        [Queued(job.deadline_s, job.size, job.enqueued_s) for _, _, job in queue],
                        now,
                        variant.predict_ms,
                        self.max_batch,
                        self.max_wait_ms,
                        self.max_run_ms,
                    )
                    if plan.wait_until_s is not None:
                        self._work.wait(max(plan.wait_until_s - now, 0.0))
                        woke = False  # waited for company on purpose
                        continue
                    taken = [entry[2] for entry in queue[: plan.count]]
                    del queue[: plan.count]
                    size = sum(job.size for job in taken)
                    self._images[variant] -= size
                    changes.append((variant, self._images[variant]))
                    idle_ms = max(now - self._ended_s.get(index, now), 0.0) * 1000.0
                    predicted_ms = variant.predict_ms(size, idle_ms)
                    self._running_until[index] = now + predicted_ms / 1000.0
                    self.running_batches += 1
                    return taken, woke
                return None
        finally:
            for variant, images in changes:
                self._on_queue_change(variant, images)

    def _drop_dead(self, now: float) -> list[tuple[Runnable, int]]:
        """Remove cancelled jobs (client gone) and late ones that asked to be dropped
        (refused on the event loop); under the lock. Returns the queues that changed."""
        changed = []
        for variant, queue in self._queues.items():
            keep, late = [], []
            for entry in queue:
                job = entry[2]
                if job.future.done():
                    continue
                if job.drop_when_late and job.deadline_s < now:
                    late.append(job)
                    continue
                keep.append(entry)
            if len(keep) != len(queue):
                queue[:] = keep
                self._images[variant] = sum(e[2].size for e in keep)
                changed.append((variant, self._images[variant]))
            if late:
                why = "deadline passed while queued"
                self._post(_fail, late, Unavailable(why, "deadline", self.retry_after_s))
        return changed

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        """Run `callback(*args)` on the event loop (from an inference thread)."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            self._loop.call_soon_threadsafe(callback, *args)

    # -- on the event loop --------------------------------------------------------------
    def _complete(
        self,
        batch: list[Job],
        outcome: np.ndarray | BaseException,
        start: float,
        ms: float,
        ended: float | None,
        idle_ms: float,
    ) -> None:
        """Account for a finished run and hand every job its slice of the result, or the
        exception. `ended`: when a thread's run ended (None for a run on the loop);
        `idle_ms`: how long its thread sat idle before it."""
        if ended is not None:
            with self._lock:  # the threads count up under it
                self.running_batches -= 1
            self._on_handoff("back", max(self.clock() - ended, 0.0) * 1000.0)
        if isinstance(outcome, BaseException):
            _fail(batch, outcome)
            return
        variant, n = batch[0].variant, int(outcome.shape[0])
        self._on_batch(variant, n, ms, idle_ms)
        offset = 0
        for job in batch:
            part = outcome[offset : offset + job.size]
            offset += job.size
            if not job.future.done():
                job.future.set_result(
                    JobResult(
                        part,
                        queue_ms=(start - job.enqueued_s) * 1000.0,
                        inference_ms=ms,
                        batch_size=n,
                    )
                )


def _fail(jobs: list[Job], exc: BaseException) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(exc)
