"""The open-loop schedule: a seeded Poisson process at the offered rate, and its split."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loadtest.deadlines import Fixed
from loadtest.generator import build_plan
from loadtest.schedule import deal, poisson_arrivals, split_bound


def test_mean_rate_matches_the_offered_rate() -> None:
    rate, duration = 200.0, 50.0
    times = poisson_arrivals(rate, duration, seed=1)
    expected = rate * duration
    # The count of a Poisson process has standard deviation sqrt(expected).
    assert abs(len(times) - expected) < 5 * math.sqrt(expected)
    assert times.min() >= 0 and times.max() < duration
    assert np.all(np.diff(times) >= 0)


def test_gaps_are_exponential_and_counts_poisson() -> None:
    rate = 100.0
    times = poisson_arrivals(rate, 100.0, seed=2)
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
    # Exponential gaps: standard deviation equals the mean; memoryless tail P(gap > m) = e^-1.
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)
    assert (gaps > gaps.mean()).mean() == pytest.approx(math.exp(-1), abs=0.02)
    # Poisson counts per second: variance equals the mean (dispersion index 1).
    counts = np.bincount(times.astype(int), minlength=100)
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.35)


def test_seeded_and_reproducible() -> None:
    a = poisson_arrivals(50.0, 10.0, seed=7)
    assert np.array_equal(a, poisson_arrivals(50.0, 10.0, seed=7))
    assert not np.array_equal(a, poisson_arrivals(50.0, 10.0, seed=8))


def test_sparse_and_dense_schedules() -> None:
    assert all(t < 4.0 for t in poisson_arrivals(0.5, 4.0, seed=3))
    assert len(poisson_arrivals(1000.0, 5.0, seed=4)) == pytest.approx(5000, abs=350)


@pytest.mark.parametrize(("rate", "duration"), [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0)])
def test_rejects_non_positive_inputs(rate: float, duration: float) -> None:
    with pytest.raises(ValueError):
        poisson_arrivals(rate, duration, seed=0)


def test_deal_gives_every_index_once_in_order() -> None:
    shares = deal(10, 3)
    assert [s.tolist() for s in shares] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(np.concatenate(shares).tolist()) == list(range(10))


def test_split_bound_shares_the_total() -> None:
    assert split_bound(10, 3) == [4, 3, 3]
    assert sum(split_bound(256, 2)) == 256
    assert split_bound(1, 2) == [1, 1]


def test_plan_is_a_pure_function_of_its_inputs() -> None:
    a = build_plan(40.0, 5.0, Fixed(30.0), samples=200, seed=11)
    b = build_plan(40.0, 5.0, Fixed(30.0), samples=200, seed=11)
    assert a == b
    assert [x.index for x in a.arrivals] == list(range(len(a.arrivals)))
    assert all(0 <= x.sample < 200 and x.deadline_ms == 30.0 for x in a.arrivals)
    assert len({x.sample for x in a.arrivals}) > 100
    assert a.deadline_spec == "fixed:30"
