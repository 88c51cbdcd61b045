"""Dynamic batching: per-variant deadline-ordered queues, workers, and result fan-out.

The decisions (which queue, how many items, whether to wait) are the pure functions of
`service.scheduling`; this module owns the asyncio side: queues, wake-ups, running a batch
off the event loop, and handing every waiting request its slice of the result or the
exception. The clock is injected (monotonic seconds) so tests can drive time.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from service.errors import Unavailable
from service.scheduling import Queued, Waiting, pick_queue, plan_batch, run_on_loop

log = logging.getLogger(__name__)


class Runnable(Protocol):
    key: str

    def run(self, images: np.ndarray) -> np.ndarray: ...

    def predict_ms(self, n: int) -> float: ...


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
    def __init__(
        self,
        clock: Callable[[], float],
        max_batch: int,
        max_wait_ms: float,
        workers: int = 1,
        on_queue_change: Callable[[Runnable, int], None] | None = None,
        on_batch: Callable[[Runnable, int, float], None] | None = None,
        inline_max_ms: float = 0.0,
        on_inline_run: Callable[[float], None] | None = None,
        load: Callable[[], tuple[int, float]] = lambda: (1, 0.0),
        retry_after_s: int = 1,
        on_handoff: Callable[[float, float], None] | None = None,
    ) -> None:
        self.clock = clock
        self.retry_after_s = retry_after_s
        """Retry-After of the 503 for a job dropped as late, or left when stopping."""
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.workers = workers
        self._queues: dict[Runnable, list[QueueEntry]] = {}
        self._images: dict[Runnable, int] = {}
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inference")
        self._running_until: dict[int, float] = {}
        self._on_queue_change = on_queue_change or (lambda v, n: None)
        self._on_batch = on_batch or (lambda v, n, ms: None)
        self.inline_max_ms = inline_max_ms
        self._on_inline_run = on_inline_run or (lambda ms: None)
        self._load = load
        """(requests in the server, event-loop lag in ms) for `run_on_loop`."""
        self.running_batches = 0
        self._on_handoff = on_handoff or (lambda to_ms, back_ms: None)
        """Told, for every run on the thread, the ms from the batch's start until the thread
        began it and from its end until the event loop took the result back."""

    # -- submission and snapshots -------------------------------------------------------
    def submit(self, job: Job) -> asyncio.Future[JobResult]:
        queue = self._queues.setdefault(job.variant, [])
        order = job.deadline_s if job.order_s is None else job.order_s
        bisect.insort(queue, (order, next(self._seq), job))
        self._images[job.variant] = self._images.get(job.variant, 0) + job.size
        self._on_queue_change(job.variant, self._images[job.variant])
        self._wake.set()
        return job.future

    @property
    def queued_images(self) -> int:
        return sum(self._images.values())

    def queued_for(self, variant: Runnable) -> int:
        return self._images.get(variant, 0)

    def ahead_of(self, order_s: float) -> list[Waiting]:
        """Queued images at or before `order_s` in EDF order, per variant."""
        ahead = []
        for variant, queue in self._queues.items():
            images = sum(e[2].size for e in queue if e[0] <= order_s and not e[2].future.done())
            if images:
                ahead.append(Waiting(variant.key, images))
        return ahead

    def running_remaining_ms(self) -> float:
        """Predicted ms until a worker frees up (0 when one is idle)."""
        if len(self._running_until) < self.workers:
            return 0.0
        return max(min(self._running_until.values()) - self.clock(), 0.0) * 1000.0

    def idle(self) -> bool:
        return self.queued_images == 0 and self.running_batches == 0

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._worker(i), name=f"batcher-{i}") for i in range(self.workers)
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for variant in list(self._queues):
            for _, _, job in self._queues.pop(variant):
                if not job.future.done():
                    job.future.set_exception(
                        Unavailable("server stopping", "draining", self.retry_after_s)
                    )
        self._pool.shutdown(wait=False, cancel_futures=True)

    def run_now(self, job: Job) -> bool:
        """Run `job` at once, on the event loop, when the server has nothing else to do
        and batches do not wait for company (`run_on_loop`): no queue, no wake-up of the
        worker, no thread hand-off. Returns whether it ran; its future then holds the
        result or the exception. Otherwise the caller submits it."""
        n = job.size
        if self.max_wait_ms > 0 or not self.idle() or n > self.max_batch:
            return False
        predicted_ms = job.variant.predict_ms(n)
        if not run_on_loop(n, predicted_ms, 0, 0, self.inline_max_ms, *self._load()):
            return False
        start = self.clock()
        try:
            probs = job.variant.run(job.images)
        except Exception as exc:
            log.exception("inference failed for %s (batch %d)", job.variant.key, n)
            job.future.set_exception(exc)
            return True
        ms = (self.clock() - start) * 1000.0
        self._on_inline_run(ms)
        self._complete([job], probs, start, ms)
        return True

    # -- the worker loop ----------------------------------------------------------------
    async def _worker(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            variant = batch[0].variant
            images = (
                batch[0].images
                if len(batch) == 1
                else np.concatenate([job.images for job in batch])
            )
            n = int(images.shape[0])
            predicted_ms = variant.predict_ms(n)
            inline = run_on_loop(
                n,
                predicted_ms,
                self.queued_images,
                self.running_batches,
                self.inline_max_ms,
                *self._load(),
            )
            start = self.clock()
            self._running_until[index] = start + predicted_ms / 1000.0
            self.running_batches += 1
            try:
                if inline:
                    probs = variant.run(images)
                    self._on_inline_run((self.clock() - start) * 1000.0)
                else:
                    probs, began, ended = await loop.run_in_executor(
                        self._pool, _timed_run, variant, images, self.clock
                    )
                    now = self.clock()
                    self._on_handoff((began - start) * 1000.0, (now - ended) * 1000.0)
            except Exception as exc:  # fan the failure out; the worker lives on
                log.exception("inference failed for %s (batch %d)", variant.key, n)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            finally:
                self.running_batches -= 1
                self._running_until.pop(index, None)
            self._complete(batch, probs, start, (self.clock() - start) * 1000.0)

    def _complete(self, batch: list[Job], probs: np.ndarray, start: float, ms: float) -> None:
        """Account for a finished run and hand every job its slice of the result."""
        variant, n = batch[0].variant, int(probs.shape[0])
        self._on_batch(variant, n, ms)
        offset = 0
        for job in batch:
            part = probs[offset : offset + job.size]
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

    async def _next_batch(self) -> list[Job]:
        while True:
            now = self.clock()
            self._drop_dead(now)
            variant = pick_queue({v: q[0][0] for v, q in self._queues.items() if q})
            if variant is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            queue = self._queues[variant]
            plan = plan_batch(
                [Queued(job.deadline_s, job.size, job.enqueued_s) for _, _, job in queue],
                now,
                variant.predict_ms,
                self.max_batch,
                self.max_wait_ms,
            )
            if plan.wait_until_s is not None:
                self._wake.clear()
                await _wait_event(self._wake, plan.wait_until_s - now)
                continue
            taken = [entry[2] for entry in queue[: plan.count]]
            del queue[: plan.count]
            self._images[variant] -= sum(job.size for job in taken)
            self._on_queue_change(variant, self._images[variant])
            return taken

    def _drop_dead(self, now: float) -> None:
        """Remove cancelled jobs (client gone) and late ones that asked to be dropped."""
        for variant, queue in self._queues.items():
            keep = []
            for entry in queue:
                job = entry[2]
                if job.future.done():
                    continue
                if job.drop_when_late and job.deadline_s < now:
                    job.future.set_exception(
                        Unavailable("deadline passed while queued", "deadline", self.retry_after_s)
                    )
                    continue
                keep.append(entry)
            if len(keep) != len(queue):
                queue[:] = keep
                self._images[variant] = sum(e[2].size for e in keep)
                self._on_queue_change(variant, self._images[variant])


def _timed_run(
    variant: Runnable, images: np.ndarray, clock: Callable[[], float]
) -> tuple[np.ndarray, float, float]:
    """On the inference thread: the run, and when it began and ended by `clock`."""
    began = clock()
    probs = variant.run(images)
    return probs, began, clock()


async def _wait_event(event: asyncio.Event, timeout_s: float) -> Any:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=max(timeout_s, 0.0))
