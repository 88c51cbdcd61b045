"""Whether one column beats another on the same test images: McNemar's exact test.

Two classifiers scored on the same images are paired: an image both get right (or both
wrong) says nothing about which is better. Under "equally accurate", each image that
exactly one of them gets right is a fair coin toss between them, so the count of such
images that go to the first is binomial(n, 1/2). Pure functions over boolean vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Paired:
    """The second classifier against the first, on the same images."""

    images: int
    only_first: int
    """Images only the first gets right."""
    only_second: int
    """Images only the second gets right."""
    p_value: float
    """Two-sided exact p-value of McNemar's test."""

    @property
    def difference(self) -> float:
        """Accuracy of the second less that of the first (a fraction)."""
        return (self.only_second - self.only_first) / max(self.images, 1)


def mcnemar_p(only_first: int, only_second: int) -> float:
    """Two-sided exact p-value: twice the binomial(n, 1/2) tail at the smaller count."""
    n = only_first + only_second
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_first, only_second) + 1))
    return min(1.0, 2 * tail / 2**n)


def compare(first_correct: np.ndarray, second_correct: np.ndarray) -> Paired:
    """Pair two per-image right/wrong vectors over the same images."""
    if first_correct.shape != second_correct.shape:
        raise ValueError("the two classifiers were scored on different images")
    first, second = first_correct.astype(bool), second_correct.astype(bool)
    only_first = int((first & ~second).sum())
    only_second = int((second & ~first).sum())
    return Paired(len(first), only_first, only_second, mcnemar_p(only_first, only_second))
