"""McNemar's exact test on paired right/wrong vectors."""

from __future__ import annotations

import numpy as np
import pytest

from model.significance import compare, mcnemar_p


def test_exact_p_values() -> None:
    assert mcnemar_p(0, 0) == 1.0  # nothing tells them apart
    assert mcnemar_p(5, 5) == 1.0
    assert mcnemar_p(0, 10) == pytest.approx(2 / 2**10)
    # One of ten discordant images goes to the first: 2 * (C(10,0) + C(10,1)) / 2^10.
    assert mcnemar_p(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_p(9, 1) == mcnemar_p(1, 9)
    # Thousands of images: no overflow, and a clear difference is tiny.
    assert 0 < mcnemar_p(840, 916) < 1
    assert mcnemar_p(624, 1580) < 1e-50


def test_compare_counts_only_the_discordant_images() -> None:
    first = np.array([1, 1, 0, 0, 1, 0], dtype=bool)
    second = np.array([1, 0, 1, 1, 1, 0], dtype=bool)
    paired = compare(first, second)
    assert (paired.images, paired.only_first, paired.only_second) == (6, 1, 2)
    assert paired.difference == pytest.approx(1 / 6)
    assert paired.p_value == mcnemar_p(1, 2)
    with pytest.raises(ValueError):
        compare(first, second[:3])
