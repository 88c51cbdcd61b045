"""The data plane: deadline-aware classification over a loaded model. Knows no HTTP.

Both front ends (`/v1` and the Open Inference Protocol under `/v2`) call `classify` or
`stream`; admission (shedding), variant choice, batching and outcome accounting happen
here once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.admission import ArrivalGap, ConcurrencyLimit, Headroom, LoopLag
from service.batching import Batcher, Job, JobResult, Runnable
from service.errors import BadRequest, Unavailable
from service.metrics import Metrics
from service.model import LoadedModel, VariantRuntime, load_model
from service.scheduling import (
    Candidate,
    backlog_ms,
    choose_variant,
    next_stream_column,
    predict_completion_ms,
    quickest_within,
    spare_for,
)
from service.settings import Settings

log = logging.getLogger(__name__)

TIMER_GRANULARITY_MS = 1.0
"""How late an event loop timer may fire (epoll waits in whole milliseconds)."""


def budget_start_s(arrival_s: float, transit_ms: float | None) -> float:
    """When a request's budget started: its arrival, less its time on the way when it was
    stamped (X-Request-Start)."""
    return arrival_s - (transit_ms or 0.0) / 1000.0


@dataclass(frozen=True)
class Request:
    images: np.ndarray
    arrival_s: float
    deadline_ms: float | None
    column: int | None = None
    precision: str = "fp32"
    min_confidence: float | None = None
    views: int = 1
    transit_ms: float | None = None
    """Time on the way before arrival (X-Request-Start), which the deadline counts."""

    @property
    def start_s(self) -> float:
        return budget_start_s(self.arrival_s, self.transit_ms)

    @property
    def deadline_s(self) -> float:
        return math.inf if self.deadline_ms is None else self.start_s + self.deadline_ms / 1000

    @property
    def cascade_threshold(self) -> float | None:
        """The cascade's confidence threshold: a forced column runs no cascade."""
        return self.min_confidence if self.column is None else None


@dataclass(frozen=True)
class ColumnAnswer:
    variant: VariantRuntime
    probabilities: np.ndarray
    queue_ms: float
    inference_ms: float
    elapsed_ms: float

    @property
    def confidence(self) -> float:
        """The least confident image's top probability (a request is as sure as its worst)."""
        return float(self.probabilities.max(axis=1).min())


@dataclass
class Answer:
    model: LoadedModel
    final: ColumnAnswer
    deadline_ms: float | None
    elapsed_ms: float
    columns_run: list[int] = field(default_factory=list)
    reason: str = "deepest"

    @property
    def deadline_met(self) -> bool:
        return self.deadline_ms is None or self.elapsed_ms <= self.deadline_ms


StreamEvent = tuple[str, ColumnAnswer | Answer]


class Engine:
    def __init__(
        self, settings: Settings, metrics: Metrics, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.model: LoadedModel | None = None
        self.drain_started_s: float | None = None
        self.active_requests = 0
        """HTTP requests in the server now (counted by `EarlyShedding`)."""
        self.warming = False
        """Serving the start-up warm-up requests (`service.warmup`): answers, batches and
        their timings are not counted, nor learnt from."""
        # Enough at once to fill a batch on every worker, to begin with.
        self.admission = ConcurrencyLimit(
            limit=float(settings.max_batch_size * settings.inference_workers),
            ceiling=float(settings.queue_limit_images),
            by_deadline=settings.admission_by_deadline,
        )
        # Read at scrape time: nothing on the request path.
        metrics.admission_limit.set_function(lambda: self.admission.limit)
        metrics.admission_in_flight.set_function(lambda: self.admission.in_flight)
        self.loop_lag = LoopLag(clock, on_sample=lambda ms: metrics.loop_lag.observe(ms / 1e3))
        self.arrivals = ArrivalGap()
        self.headroom = Headroom(settings.tight_margin_ms)
        metrics.deadline_close_share.set_function(lambda: self.headroom.close_share)
        self._reload_lock = asyncio.Lock()
        self.batcher = Batcher(
            clock,
            settings.max_batch_size,
            settings.max_batch_wait_ms,
            settings.inference_workers,
            self._queue_changed,
            self._batch_done,
            inline_max_ms=settings.inline_run_max_ms,
            on_inline_run=self.loop_lag.excuse,
            load=lambda: (self.active_requests, self.loop_lag.lag_ms),
            retry_after_s=settings.retry_after_s,
            on_handoff=self._handoff,
            max_run_ms=settings.max_batch_ms,
        )

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def draining(self) -> bool:
        return self.drain_started_s is not None

    @property
    def ready(self) -> bool:
        return self.model is not None and not self.draining

    async def start(self) -> None:
        self.batcher.start()
        if self.settings.adaptive_admission:
            self.loop_lag.start()
        await self.load(self.settings.model_path)

    @contextlib.contextmanager
    def warming_up(self) -> Iterator[None]:
        """While the server sends itself its warm-up requests."""
        self.warming = True
        try:
            yield
        finally:
            self.warming = False

    async def stop(self) -> None:
        await self.loop_lag.stop()
        await self.batcher.stop()

    async def load(self, path: Path) -> LoadedModel:
        """Load, check and warm a bundle beside the current one, then swap atomically.
        In-flight work keeps the variants it was queued on; a failure leaves the old model."""
        async with self._reload_lock:
            new = await asyncio.to_thread(load_model, path, self.settings)
            # Out of the garbage collector's sight: a full collection scans every tracked
            # object (a loaded server has some 67,000: 47-50 ms on 2 idle CPUs), and the event
            # loop stands still meanwhile, every request in flight with it. The garbage of
            # start-up is collected first; a reload under traffic skips that stall.
            if self.model is None:
                gc.collect()
            gc.freeze()
            self.model = new
            self.metrics.model_info.info(
                {"name": new.name, "version": new.manifest.version, "columns": str(new.columns)}
            )
            self.metrics.ready.set(1)
            return new

    def begin_drain(self) -> None:
        """Readiness turns false, and requests arriving from now on are refused (503
        draining); those that arrived before are still served."""
        if self.drain_started_s is None:
            self.drain_started_s = self.clock()
        self.metrics.ready.set(0)

    async def drain(self, grace_s: float) -> None:
        """`begin_drain`, then wait (up to `grace_s`) for queued and running work."""
        self.begin_drain()
        end = self.clock() + grace_s
        while not self.batcher.idle() and self.clock() < end:
            await asyncio.sleep(0.01)

    # -- admission ----------------------------------------------------------------------
    def current_model(self, arrival_s: float) -> LoadedModel:
        """The model to serve a request arriving at `arrival_s`, or the 503 why not."""
        if self.drain_started_s is not None and arrival_s >= self.drain_started_s:
            raise Unavailable("server is shutting down", "draining", self.settings.retry_after_s)
        if self.model is None:
            raise Unavailable("model not loaded yet", "not_ready", self.settings.retry_after_s)
        return self.model

    def shed_early(
        self, arrival_s: float, deadline_ms: float, transit_ms: float | None = None
    ) -> None:
        """At arrival, before the body is read and decoded: 503 for a request with a
        deadline when as many as the concurrency limit are in already, or when not even
        column 1 of one image can meet its deadline, the event loop's lag counted
        (`transit_ms`: its time on the way, from X-Request-Start, which the budget counts).
        Refusing here costs a fraction of refusing after decoding, so an overloaded server
        spends its time on the requests it can still answer in time."""
        model = self.model
        if not self.settings.adaptive_admission or self.settings.best_effort:
            return
        if model is None or self.draining:
            return  # the route answers 503 not_ready or draining
        retry = self.settings.retry_after_s
        queue_full = self.batcher.queued_images >= self.settings.queue_limit_images
        if self.admission.full_for(deadline_ms) or queue_full:
            self._count_shed()
            raise Unavailable("server at capacity", "queue_full", retry)
        deadline_s = budget_start_s(arrival_s, transit_ms) + deadline_ms / 1000.0
        remaining = self._remaining_until(
            deadline_s, self._refuse_margin_ms
        ) - self.loop_lag.allowance_ms(stamped=transit_ms is not None)
        if self._completion_for(1, deadline_s, model)(model.fp32(1).candidate) > remaining:
            self._count_shed()
            raise Unavailable("no column can answer within the deadline", "deadline", retry)

    def _completion(
        self, request: Request, model: LoadedModel, order_s: float | None = None
    ) -> Callable[[Candidate], float]:
        """Predicted completion of the request's next run, queued at `order_s` in EDF order
        (by default its deadline)."""
        order = request.deadline_s if order_s is None else order_s
        return self._completion_for(int(request.images.shape[0]), order, model)

    def _completion_for(
        self, n: int, order_s: float, model: LoadedModel
    ) -> Callable[[Candidate], float]:
        ahead = self.batcher.ahead_of(order_s)
        running = self.batcher.running_remaining_ms()
        # With nothing ahead and a free thread, the run starts now, after the thread's idle
        # (which matters only where the latency model learns idle spans apart).
        idle = self.settings.latency_idle_edges_ms and not (ahead or running)
        cost = _cost_of(model, self.batcher.idle_ms() if idle else 0.0)

        def completion(c: Candidate) -> float:
            return predict_completion_ms(
                c.key,
                n,
                ahead,
                running,
                cost,
                self.settings.max_batch_size,
                self.settings.inference_workers,
            )

        return completion

    def _backlog_ms(self, model: LoadedModel) -> float:
        return backlog_ms(
            self.batcher.running_remaining_ms(),
            self.batcher.ahead_of(math.inf),
            _cost_of(model),
            self.settings.inference_workers,
        )

    def _crowded(self, request: Request, model: LoadedModel, choices: int) -> bool:
        """Whether the request should get the quickest variant that fits rather than the
        most accurate: one with a deadline and a choice to make, while the inference
        backlog is long. The backlog walks every queue, so it is measured only then."""
        threshold = self.settings.thrifty_backlog_ms
        if request.deadline_ms is None or choices < 2 or math.isinf(threshold):
            return False
        return self._tight() and self._backlog_ms(model) > threshold

    def _tight(self) -> bool:
        """Whether recent requests came close to their deadlines (`tight_margin_ms`):
        only then does the server give up accuracy for time."""
        return self.headroom.close_share >= self.settings.tight_share

    def _busy(self, model: LoadedModel) -> bool:
        """Too busy to refine a stream: inference work waiting, or an event loop running
        late (the CPU is taken, by requests or by other processes)."""
        return (
            self.loop_lag.lag_ms > self.settings.stream_refine_lag_ms
            or self._backlog_ms(model) > self.settings.stream_refine_backlog_ms
        )

    def _remaining_ms(self, request: Request, margin_ms: float | None = None) -> float:
        """The budget left, less `margin_ms` (by default the choice's margin)."""
        if request.deadline_ms is None:
            return math.inf
        return self._remaining_until(request.deadline_s, margin_ms)

    def _send_by_ms(self, request: Request) -> float:
        """How long an answer may still take and leave in time: the budget left, less the
        event loop's lag on the way out and a timer's granularity (a wait wakes up to a
        millisecond late)."""
        return self._remaining_ms(request) - self.loop_lag.lag_ms - TIMER_GRANULARITY_MS

    def _remaining_until(self, deadline_s: float, margin_ms: float | None = None) -> float:
        margin = self.settings.deadline_margin_ms if margin_ms is None else margin_ms
        return (deadline_s - self.clock()) * 1000.0 - margin

    @property
    def _refuse_margin_ms(self) -> float:
        """The margin a refusal is judged with: never more than the choice's."""
        return min(self.settings.refuse_margin_ms, self.settings.deadline_margin_ms)

    def _candidates(self, request: Request, model: LoadedModel) -> list[Candidate]:
        if request.column is None:
            variants = model.variants.values()
            bounding = self._bounding_deeper()
            if not bounding and not self.settings.two_views:  # nothing to judge
                return [v.candidate for v in variants]
            n = int(request.images.shape[0])
            # Column 1's run is predicted once, not once a variant.
            column_1_ms = model.fp32(1).predict_ms(n) if bounding else None
            return [v.candidate for v in variants if self._may_serve(v, n, column_1_ms, model)]
        variant = model.find(request.column, request.precision, request.views)
        if variant is None:
            raise BadRequest(
                f"no variant column={request.column} precision={request.precision} "
                f"views={request.views}; the model has columns 1..{model.columns} "
                f"and serves variants {', '.join(model.variants)}"
                + ("" if self.settings.two_views else " (two-view variants: FRACTAL_TWO_VIEWS)")
            )
        return [variant.candidate]

    def _judging_arrivals(self) -> bool:
        """Whether some variants compete only while the arrivals leave room for them."""
        return self.settings.two_views or not math.isinf(self.settings.deeper_max_arrivals)

    def _bounding_deeper(self) -> bool:
        """Whether deeper columns are judged by the arrivals now: a bound is set, and
        deadlines are tight."""
        return not math.isinf(self.settings.deeper_max_arrivals) and self._tight()

    def _may_serve(
        self, variant: VariantRuntime, n: int, column_1_ms: float | None, model: LoadedModel
    ) -> bool:
        """Whether the arrivals leave room for the variant's extra run time on `n` images:
        a column deeper than 1 for its time beyond column 1's `column_1_ms`
        (`deeper_max_arrivals`; not judged when None), a two-view variant (loaded with
        `FRACTAL_TWO_VIEWS` on) also for its time beyond its single view
        (`two_views_max_arrivals`)."""
        if variant.views == 1 and (variant.column == 1 or column_1_ms is None):
            return True  # nothing to judge: no lookups on the hot path
        gap_ms = self.arrivals.gap_ms
        single = model.find(variant.column, variant.precision)
        single_ms = single.predict_ms(n) if single is not None else None
        if variant.column > 1 and column_1_ms is not None:
            own_ms = single_ms if single_ms is not None else variant.predict_ms(n)
            deeper_ms = own_ms - column_1_ms
            if not spare_for(deeper_ms, gap_ms, self.settings.deeper_max_arrivals):
                return False
        if variant.views == 1:
            return True
        extra_ms = variant.predict_ms(n) - (single_ms or 0.0)
        return spare_for(extra_ms, gap_ms, self.settings.two_views_max_arrivals)

    def _count_shed(self) -> None:
        """A request refused: counted, and as a close call (it had no room at all)."""
        self.metrics.child(self.metrics.deadline_outcomes, "shed").inc()
        if not self.warming:
            self.headroom.observe(-math.inf)

    def _shed(self, request: Request, why: str) -> Unavailable:
        self._count_shed()
        return Unavailable(why, "deadline", self.settings.retry_after_s)

    def _check_queue(self, request: Request) -> None:
        if self.batcher.queued_images + request.images.shape[0] > self.settings.queue_limit_images:
            self._count_shed()
            raise Unavailable("queue full", "queue_full", self.settings.retry_after_s)

    async def _run(
        self,
        request: Request,
        variant: VariantRuntime,
        late_ok: bool,
        order_s: float | None = None,
        first: bool = False,
        wait_ms: float = math.inf,
    ) -> ColumnAnswer:
        """One run of `variant` for the request. For a request's `first` run, being
        dropped as late while queued counts as shed. A run not done within `wait_ms` is
        given up (Unavailable; its job is cancelled, or its result ignored if it runs)."""
        job = Job(
            variant,
            request.images,
            request.deadline_s,
            self.clock(),
            drop_when_late=not late_ok,
            order_s=order_s,
        )
        if not self.batcher.run_now(job):
            self.batcher.submit(job)
        try:
            timeout_s = None if math.isinf(wait_ms) else max(wait_ms, 0.0) / 1000.0
            result: JobResult = await asyncio.wait_for(job.future, timeout_s)
        except TimeoutError:
            raise Unavailable(
                "not done by the deadline", "deadline", self.settings.retry_after_s
            ) from None
        except Unavailable:
            if first:
                self._count_shed()
            raise
        return ColumnAnswer(
            variant,
            result.probabilities,
            result.queue_ms,
            result.inference_ms,
            (self.clock() - request.start_s) * 1000.0,
        )

    # -- single answer ------------------------------------------------------------------
    async def classify(self, request: Request) -> Answer:
        """One answer: the most accurate variant predicted to finish in time."""
        self._arrived(request)
        return await self._classify(request)

    def _arrived(self, request: Request) -> None:
        """Only `_may_serve` reads the arrival gap."""
        if self._judging_arrivals() and not self.warming:
            self.arrivals.observe(request.arrival_s)

    async def _classify(self, request: Request) -> Answer:
        model = self.current_model(request.arrival_s)
        self._check_queue(request)
        if request.cascade_threshold is not None:
            return await self._cascade(request, model)
        candidates = self._candidates(request, model)
        if request.deadline_ms is None and request.column is None:
            # No deadline: the deepest column, whatever the manifest says of accuracy.
            candidates = [model.fp32(model.columns).candidate]
        completion = self._completion(request, model)
        remaining = self._remaining_ms(request)
        crowded = self._crowded(request, model, len(candidates))
        within = self.settings.thrifty_within_ms if crowded else None
        choice = choose_variant(
            candidates, remaining, completion, within, self.settings.accuracy_tie
        )
        late_ok = self.settings.best_effort
        if choice is None and late_ok:
            choice = min(candidates, key=Candidate.cheapness)
        elif choice is None:
            # A refusal is a sure miss: judged with the smaller margin.
            budget = self._remaining_ms(request, self._refuse_margin_ms)
            choice = quickest_within(candidates, budget, completion)
            if choice is None:
                raise self._shed(request, "no column can answer within the deadline")
        variant = model.variants[choice.key]
        answer = await self._run(
            request, variant, late_ok or request.deadline_ms is None, first=True
        )
        return self._finish(model, request, answer, [variant.column], "deepest")

    async def _cascade(self, request: Request, model: LoadedModel) -> Answer:
        """The progressive plan without the intermediate events: its `done` answer."""
        async for kind, item in self._progressive(request, model):
            if kind == "done":
                assert isinstance(item, Answer)
                return item
        raise RuntimeError("progressive answer ended without `done`")

    # -- progressive answers ------------------------------------------------------------
    async def stream(self, request: Request) -> AsyncGenerator[StreamEvent, None]:
        """`prediction` events (column 1 first, then deeper ones that fit), then `done`.

        Raises Unavailable before yielding anything when column 1 cannot answer in time.
        With a forced column (`X-Column`) the stream is that one answer, then `done`."""
        self._arrived(request)
        model = self.current_model(request.arrival_s)
        self._check_queue(request)
        if request.column is not None:
            answer = await self._classify(request)
            answer.reason = "forced"
            yield "prediction", answer.final
            yield "done", answer
            return
        async for event in self._progressive(request, model, urgent_first=True):
            yield event

    async def _progressive(
        self, request: Request, model: LoadedModel, urgent_first: bool = False
    ) -> AsyncIterator[StreamEvent]:
        """Column 1, then deeper columns while they fit. With `urgent_first` (a stream,
        whose client sees the first answer) column 1 is queued by the request's arrival
        instead of its deadline: ahead of the deeper runs of earlier streams, so a first
        answer waits for at most the batch that is running."""
        columns = [model.fp32(k).candidate for k in range(1, model.columns + 1)]
        first = columns[0]
        first_order = request.arrival_s if urgent_first else None
        completion = self._completion(request, model, first_order)
        if (
            completion(first) > self._remaining_ms(request, self._refuse_margin_ms)
            and not self.settings.best_effort
        ):
            raise self._shed(request, "column 1 cannot answer within the deadline")
        late_ok = self.settings.best_effort or request.deadline_ms is None
        answer = await self._run(
            request, model.variants[first.key], late_ok, first_order, first=True
        )
        run, first_ms = [1], answer.elapsed_ms
        yield "prediction", answer
        reason = "deepest"
        deeper = columns
        if urgent_first and request.deadline_ms is not None and self._bounding_deeper():
            # A stream's deeper runs are extra work, all of each run: while deadlines are
            # tight, the arrivals must leave room for it as for a deeper single answer.
            n = int(request.images.shape[0])
            deeper = [c for c in columns if self._may_serve(model.variants[c.key], n, 0.0, model)]
        while True:
            threshold = request.cascade_threshold
            if threshold is not None and answer.confidence >= threshold:
                reason = "confident" if answer.variant.column < model.columns else "deepest"
                if reason == "confident":
                    self.metrics.child(self.metrics.cascade_exits, str(answer.variant.column)).inc()
                break
            if answer.variant.column == model.columns:
                break
            if urgent_first and request.deadline_ms is not None and self._busy(model):
                # Refinement uses spare capacity only: under load, deeper runs would
                # delay other streams' first answers and single answers.
                reason = "load"
                break
            remaining, completion = self._remaining_ms(request), self._completion(request, model)
            nxt = next_stream_column(deeper, answer.variant.column, remaining, completion)
            if nxt is None:
                # Stopped by the deadline, or by the arrivals when a column they left no
                # room for would have fitted.
                bounded = deeper is not columns and next_stream_column(
                    columns, answer.variant.column, remaining, completion
                )
                reason = "load" if bounded else "deadline"
                break
            try:
                # A deeper answer is worth waiting for only until the deadline: the last
                # one stands if it falls behind, and the client has it in time.
                wait = math.inf if late_ok else self._send_by_ms(request)
                answer = await self._run(request, model.variants[nxt.key], late_ok, wait_ms=wait)
            except Unavailable:
                reason = "deadline"
                break
            run.append(nxt.column)
            yield "prediction", answer
        yield "done", self._finish(model, request, answer, run, reason, first_ms)

    # -- accounting ---------------------------------------------------------------------
    def _finish(
        self,
        model: LoadedModel,
        request: Request,
        final: ColumnAnswer,
        run: list[int],
        reason: str,
        first_ms: float | None = None,
    ) -> Answer:
        """Count the answer; teach the concurrency limit how in time it was. A progressive
        answer (`first_ms`: its first column's elapsed time) spends its budget on deeper
        columns by design, so when it met its deadline its first answer is what tells how
        congested the server is; a late one counts as late."""
        elapsed = (self.clock() - request.start_s) * 1000.0
        answer = Answer(model, final, request.deadline_ms, elapsed, run, reason)
        if self.warming:
            return answer
        v = final.variant
        self.metrics.child(self.metrics.column_served, *v.labels).inc()
        if v.spec.accuracy is not None:
            self.metrics.served_accuracy.observe(v.spec.accuracy)
        if request.deadline_ms is not None:
            self.metrics.deadline_ratio.observe(elapsed / request.deadline_ms)
            self.metrics.child(
                self.metrics.deadline_outcomes, "met" if answer.deadline_met else "missed"
            ).inc()
            timed = first_ms if first_ms is not None and answer.deadline_met else elapsed
            # About what the client sees (a stamped request's time counts its way in).
            seen = timed + self.loop_lag.allowance_ms(request.transit_ms is not None)
            self.admission.outcome(seen, request.deadline_ms, self.clock(), request.arrival_s)
            self.headroom.observe(request.deadline_ms - seen)
        return answer

    def _queue_changed(self, variant: Runnable, images: int) -> None:
        assert isinstance(variant, VariantRuntime)
        self.metrics.child(self.metrics.queue_depth, *variant.labels).set(images)

    def _batch_done(self, variant: Runnable, n: int, ms: float, idle_ms: float) -> None:
        """A finished run teaches its variant's latency model, and is counted."""
        assert isinstance(variant, VariantRuntime)
        if self.warming:
            return
        variant.observe(n, ms, idle_ms)
        labels = variant.labels
        self.metrics.child(self.metrics.batch_size, *labels).observe(n)
        self.metrics.child(self.metrics.inference_duration, *labels, str(n)).observe(ms / 1000.0)

    def _handoff(self, direction: str, ms: float) -> None:
        """Called from the inference threads too (the metric takes its own lock)."""
        if not self.warming:
            self.metrics.child(self.metrics.inference_handoff, direction).observe(ms / 1e3)


def _cost_of(model: LoadedModel, idle_ms: float = 0.0) -> Callable[[str, int], float]:
    """Predicted ms of a run of `size` images of the variant `key` after `idle_ms` of
    idle time (0 for a variant the model no longer has: work queued before a reload)."""

    def cost(key: str, size: int) -> float:
        variant = model.variants.get(key)
        return variant.predict_ms(size, idle_ms) if variant is not None else 0.0

    return cost
