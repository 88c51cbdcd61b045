"""Online latency model of one variant: a start-up profile, corrected by observed runs."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass
class LatencyModel:
    """Predicts the milliseconds of one run of `n` images.

    The base is the measured profile, linear between profiled batch sizes (and beyond the
    largest, along the last segment). Observed runs move a multiplicative correction
    (EWMA of observed / base) and a spread (EWMA of the positive deviation), and the
    prediction is base x (correction + `tail_weight` x spread): deliberately above the
    median, since a deadline is missed by the slow runs, not the typical one.
    """

    profile_ms: dict[int, float]
    alpha: float = 0.05
    tail_weight: float = 2.0
    learning: bool = True
    correction: float = 1.0
    spread: float = 0.0
    observations: int = 0
    _sizes: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.profile_ms:
            raise ValueError("a latency profile needs at least one batch size")
        self._sizes = sorted(self.profile_ms)

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

    def predict_ms(self, n: int) -> float:
        return self.base_ms(n) * (self.correction + self.tail_weight * self.spread)

    def observe(self, n: int, ms: float) -> None:
        if not self.learning or n < 1:
            return
        ratio = min(max(ms / self.base_ms(n), 0.2), 5.0)
        self.observations += 1
        self.correction += self.alpha * (ratio - self.correction)
        self.spread += self.alpha * (max(ratio - self.correction, 0.0) - self.spread)

    def snapshot(self, sizes: tuple[int, ...] = (1, 8, 32)) -> dict[int, float]:
        return {n: round(self.predict_ms(n), 4) for n in sizes}
