"""Pure scheduling decisions: which variant, which next column, when to run a batch.

Nothing here reads a clock or touches a queue: callers pass `now` and snapshots, so every
decision is unit-tested with plain numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

K = TypeVar("K")

CostFn = Callable[[str, int], float]
"""(variant key, images in one run) -> predicted milliseconds."""


@dataclass(frozen=True)
class Candidate:
    key: str
    column: int
    precision: str
    accuracy: float | None
    views: int = 1

    def score(self) -> float:
        """The manifest accuracy; -1 where the manifest has none."""
        return self.accuracy if self.accuracy is not None else -1.0

    def tiebreak(self) -> tuple[int, int, int]:
        """Between equally accurate answers, higher is better: depth, then fp32 over int8,
        then one view over two (the cheaper of otherwise equal answers)."""
        return (self.column, int(self.precision == "fp32"), -self.views)

    def cheapness(self) -> tuple[int, bool, int]:
        """Lower is cheaper: the order best effort falls back in (column 1, fp32, one
        view first)."""
        return (self.column, self.precision != "fp32", self.views)


@dataclass(frozen=True)
class Waiting:
    """Images of one variant already queued with a deadline at or before ours."""

    key: str
    images: int


def predict_completion_ms(
    key: str,
    images: int,
    ahead: Sequence[Waiting],
    running_remaining_ms: float,
    cost: CostFn,
    max_batch: int,
    workers: int = 1,
) -> float:
    """Predicted ms until a request of `images` for `key` completes.

    Work ahead (earliest deadline first) costs its amortised share of the batches it will
    form; work of the same variant rides in our batch, up to `max_batch` images.
    """
    same = sum(w.images for w in ahead if w.key == key)
    other = 0.0
    for w in ahead:
        if w.key != key and w.images > 0:
            batch = min(w.images, max_batch)
            other += cost(w.key, batch) * w.images / batch
    full_batches, rest = divmod(same, max_batch)
    if rest + images > max_batch:
        full_batches, rest = full_batches + 1, 0
    own = full_batches * cost(key, max_batch) + cost(key, rest + images)
    return running_remaining_ms + other / max(workers, 1) + own


def choose_variant(
    candidates: Sequence[Candidate],
    budget_ms: float,
    completion_ms: Callable[[Candidate], float],
    thrifty_within_ms: float | None = None,
    accuracy_tie: float = 0.0,
) -> Candidate | None:
    """The candidate with the highest manifest accuracy predicted to finish in budget.

    Accuracies within `accuracy_tie` (a fraction: 0.001 is 0.1 percentage points) of the
    best one that fits count as equal, and equals go by `Candidate.tiebreak` (the deeper
    column, fp32, one view): an int8 variant one test image more accurate
    than its fp32 column is not a better answer.

    Thrifty (`thrifty_within_ms` given: the server is crowded), only candidates predicted to
    finish within that many ms of the quickest one compete, so that a loaded server gives
    up accuracy before it gives up answers, but not for a saving too small to matter
    (0: the quickest; ties go to the more accurate)."""
    fitting = [(ms, c) for c in candidates if (ms := completion_ms(c)) <= budget_ms]
    if not fitting:
        return None
    if thrifty_within_ms is not None:
        by = min(ms for ms, _ in fitting) + thrifty_within_ms
        fitting = [(ms, c) for ms, c in fitting if ms <= by]
    return most_accurate([c for _, c in fitting], accuracy_tie)


def quickest_within(
    candidates: Sequence[Candidate],
    budget_ms: float,
    completion_ms: Callable[[Candidate], float],
) -> Candidate | None:
    """The candidate predicted to finish first (ties: the cheaper) if it finishes within
    `budget_ms`, else None: the last chance of a request that no choice fits."""
    timed = [(completion_ms(c), c) for c in candidates]
    if not timed:
        return None
    ms, quickest = min(timed, key=lambda t: (t[0], t[1].cheapness()))
    return quickest if ms <= budget_ms else None


def most_accurate(candidates: Sequence[Candidate], accuracy_tie: float = 0.0) -> Candidate:
    """The most accurate of `candidates`, accuracies within `accuracy_tie` of the best
    counting as equal (then `Candidate.tiebreak`, then accuracy)."""
    best = max(c.score() for c in candidates)
    equal = [c for c in candidates if c.score() >= best - accuracy_tie]
    return max(equal, key=lambda c: (c.tiebreak(), c.score()))


def spare_for(extra_ms: float, arrival_gap_ms: float, max_arrivals: float) -> bool:
    """Whether a choice that runs `extra_ms` longer than the alternative leaves the
    requests behind it alone: at most `max_arrivals` of them expected to arrive meanwhile,
    at the mean gap between arrivals. Each request's own fit cannot see them; they would
    find the server busy and get shallower answers."""
    return extra_ms <= max_arrivals * arrival_gap_ms


def next_stream_column(
    candidates: Sequence[Candidate],
    last_column: int,
    remaining_ms: float,
    completion_ms: Callable[[Candidate], float],
) -> Candidate | None:
    """The next column of a progressive answer, or None when nothing deeper fits.

    Aim at the deepest column that still fits; on the way, run a shallower one only when
    it and the target both fit one after the other (a middle column never costs the deeper
    answer its place).
    """
    deeper = sorted((c for c in candidates if c.column > last_column), key=lambda c: c.column)
    fits = [c for c in deeper if completion_ms(c) <= remaining_ms]
    if not fits:
        return None
    target = fits[-1]
    for c in fits:
        if c is target or completion_ms(c) + completion_ms(target) <= remaining_ms:
            return c
    return target


@dataclass(frozen=True)
class Queued:
    deadline_s: float
    images: int
    enqueued_s: float


@dataclass(frozen=True)
class Dispatch:
    """Run the first `count` queued items now, or wait until `wait_until_s`."""

    count: int
    wait_until_s: float | None = None


def plan_batch(
    queue: Sequence[Queued],
    now_s: float,
    cost_ms: Callable[[int], float],
    max_batch: int,
    max_wait_ms: float,
    max_run_ms: float = math.inf,
) -> Dispatch:
    """Which queued items (in deadline order) form the next batch, and whether to wait.

    Take items in earliest-deadline order while they fit in `max_batch` images and in a
    predicted `max_run_ms` (the first item always goes). A full batch runs at once;
    otherwise it may wait for company up to `max_wait_ms` after its oldest member arrived,
    but never past the latest start of its most urgent member (deadline minus the
    predicted run time).
    """
    capped = not math.isinf(max_run_ms)  # predictions only when a cap asks for them

    def over_cap(n: int) -> bool:
        return capped and cost_ms(n) > max_run_ms

    count, images = 0, 0
    for item in queue:
        more = images + item.images
        if count and (more > max_batch or over_cap(more)):
            break
        count, images = count + 1, more
    if count == 0:
        return Dispatch(0)
    if images >= max_batch or max_wait_ms <= 0 or over_cap(images + 1):
        return Dispatch(count)
    oldest = min(item.enqueued_s for item in queue[:count])
    urgent = min(item.deadline_s for item in queue[:count])
    latest_start = urgent - cost_ms(min(images + 1, max_batch)) / 1000.0
    wait_until = min(oldest + max_wait_ms / 1000.0, latest_start)
    if now_s >= wait_until or math.isnan(wait_until):
        return Dispatch(count)
    return Dispatch(count, wait_until_s=wait_until)


INLINE_MAX_LAG_MS = 2.0
"""Event-loop lag (smoothed, inline runs excused) above which runs stay on the thread."""


def run_on_loop(
    images: int,
    predicted_ms: float,
    waiting_images: int,
    running_batches: int,
    limit_ms: float,
    active_requests: int = 1,
    loop_lag_ms: float = 0.0,
) -> bool:
    """Whether a batch runs on the event loop itself rather than on the inference thread.

    Handing a run to a thread and back costs two thread switches, and the run itself goes
    slower on a thread whose caches went cold while it slept (measured on 2 CPUs: about
    0.2 ms for column 1 and 1 ms for column 4 at batch 1; docs/serving.md). That matters
    only when the server is idle otherwise: nothing else queued or running, no other
    request being served (`active_requests` counts this one), and a run short enough
    (`limit_ms`) that a request arriving meanwhile waits no longer than it would for the
    busy worker. Under load the thread runs the batches while the loop parses, on
    another core. A loop that runs late (`loop_lag_ms` over `INLINE_MAX_LAG_MS`) has
    connections waiting to be read or refused: an overloaded server that spent its loop
    on inference stopped refusing in time (tested in tests/reliability/test_overload.py).
    """
    return (
        limit_ms > 0
        and images > 0
        and active_requests <= 1
        and loop_lag_ms <= INLINE_MAX_LAG_MS
        and waiting_images == 0
        and running_batches == 0
        and predicted_ms <= limit_ms
    )


def backlog_ms(
    running_ms: float,
    waiting: Sequence[Waiting],
    cost_ms: Callable[[str, int], float],
    workers: int,
) -> float:
    """Predicted ms before the inference workers are free: the running batch's remainder
    and every queued image at its batch-1 cost, spread over the workers (an upper bound,
    since queued work batches)."""
    queued = sum(cost_ms(w.key, 1) * w.images for w in waiting)
    return running_ms + queued / max(workers, 1)


def pick_queue(heads: Mapping[K, float]) -> K | None:
    """Earliest deadline first across variants: the key whose head is most urgent."""
    return min(heads, key=lambda k: heads[k]) if heads else None
