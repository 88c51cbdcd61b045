"""Online latency model of one variant: a start-up profile, corrected by observed runs."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


def check_idle_edges(edges: tuple[float, ...]) -> tuple[float, ...]:
    """`edges` if they are positive and increasing, else ValueError."""
    if any(e <= 0 for e in edges) or list(edges) != sorted(set(edges)):
        raise ValueError("idle edges must be positive and increasing")
    return edges


@dataclass
class Correction:
    """What runs after one span of idle time taught: an EWMA of observed / profile and
    one of its positive deviation."""

    ratio: float = 1.0
    spread: float = 0.0
    observations: int = 0

    def learn(self, ratio: float, alpha: float) -> None:
        self.observations += 1
        self.ratio += alpha * (ratio - self.ratio)
        self.spread += alpha * (max(ratio - self.ratio, 0.0) - self.spread)

    def factor(self, tail_weight: float) -> float:
        return self.ratio + tail_weight * self.spread


@dataclass
class LatencyModel:
    """Predicts the milliseconds of one run of `n` images after `idle_ms` of idle time.

    The base is the measured profile, linear between profiled batch sizes (and beyond the
    largest, along the last segment). Observed runs move a multiplicative correction
    (EWMA of observed / base) and a spread (EWMA of the positive deviation), and the
    prediction is base x (correction + `tail_weight` x spread): deliberately above the
    median, since a deadline is missed by the slow runs, not the typical one.

    With `idle_edges_ms` (by default none), runs are learned apart by the idle time before
    them: the profile is measured back to back, and a run on a thread (and CPUs) that sat
    idle is slower (docs/serving.md: measured, and not kept as the default). The
    back-to-back correction starts from the profile and learns at `alpha`; a longer span
    is predicted as the span before it until it has runs of its own, then averages its
    first 1/alpha runs plainly, so it is right after a few. A span is never predicted
    faster than a shorter one.
    """

    profile_ms: dict[int, float]
    alpha: float = 0.05
    tail_weight: float = 2.0
    learning: bool = True
    idle_edges_ms: tuple[float, ...] = ()
    corrections: list[Correction] = field(init=False)
    _sizes: list[int] = field(init=False, repr=False)
    _factors: list[float] = field(init=False, repr=False)
    """The prediction's factor by idle span: the running maximum of the learned ones."""

    def __post_init__(self) -> None:
        if not self.profile_ms:
            raise ValueError("a latency profile needs at least one batch size")
        check_idle_edges(self.idle_edges_ms)
        self._sizes = sorted(self.profile_ms)
        self.corrections = [Correction() for _ in range(len(self.idle_edges_ms) + 1)]
        self._factors = [1.0] * len(self.corrections)

    @property
    def correction(self) -> float:
        """The back-to-back runs' correction."""
        return self.corrections[0].ratio

    @property
    def observations(self) -> int:
        return sum(c.observations for c in self.corrections)

    def base_ms(self, n: int) -> float:
        sizes, prof = self._sizes, self.profile_ms
        if len(sizes) == 1:
            return prof[sizes[0]] * max(n, 1) / sizes[0]
        i = bisect.bisect_left(sizes, n)
        if i < len(sizes) and sizes[i] == n:
            return prof[n]
        lo, hi = (
            (sizes[0], sizes[1])
            if i == 0
            else ((sizes[-2], sizes[-1]) if i >= len(sizes) else (sizes[i - 1], sizes[i]))
        )
        slope = (prof[hi] - prof[lo]) / (hi - lo)
        return max(prof[lo] + slope * (n - lo), 0.01)

    def span(self, idle_ms: float) -> int:
        """The index of the idle span `idle_ms` falls in."""
        edges = self.idle_edges_ms
        if not edges or idle_ms < edges[0]:
            return 0
        return bisect.bisect_right(edges, idle_ms)

    def predict_ms(self, n: int, idle_ms: float = 0.0) -> float:
        return self.base_ms(n) * self._factors[self.span(idle_ms)]

    def observe(self, n: int, ms: float, idle_ms: float = 0.0) -> None:
        if not self.learning or n < 1:
            return
        ratio = min(max(ms / self.base_ms(n), 0.2), 5.0)
        index = self.span(idle_ms)
        learned = self.corrections[index]
        alpha = self.alpha if index == 0 else max(self.alpha, 1.0 / (learned.observations + 1))
        learned.learn(ratio, alpha)
        self._refresh()

    def _refresh(self) -> None:
        factor, previous = 0.0, self.corrections[0]
        for i, c in enumerate(self.corrections):
            if c.observations or i == 0:
                previous = c
            factor = max(factor, previous.factor(self.tail_weight))
            self._factors[i] = factor

    def snapshot(self, sizes: tuple[int, ...] = (1, 8, 32)) -> dict[int, float]:
        return {n: round(self.predict_ms(n), 4) for n in sizes}

    def idle_snapshot(self, n: int = 1) -> dict[str, float]:
        """The predicted ms of a run of `n` after each learned idle span, by its lower
        edge ("0" is back to back)."""
        lows = (0.0, *self.idle_edges_ms)
        return {f"{low:g}": round(self.predict_ms(n, low), 4) for low in lows}
