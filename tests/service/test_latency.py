"""The online latency model."""

from __future__ import annotations

import pytest

from service.latency import LatencyModel


def test_interpolates_and_extrapolates() -> None:
    m = LatencyModel({1: 2.0, 8: 9.0, 32: 33.0})
    assert m.base_ms(1) == 2.0
    assert m.base_ms(4) == pytest.approx(5.0)
    assert m.base_ms(20) == pytest.approx(21.0)
    assert m.base_ms(64) == pytest.approx(65.0)


def test_single_point_scales_linearly() -> None:
    assert LatencyModel({4: 8.0}).base_ms(8) == pytest.approx(16.0)


def test_learns_a_slower_machine_and_leans_to_the_tail() -> None:
    m = LatencyModel({1: 1.0, 32: 10.0})
    for _ in range(300):
        m.observe(1, 2.0)
    assert m.correction == pytest.approx(2.0, rel=0.01)
    # Noisy runs raise the prediction above the mean.
    for i in range(300):
        m.observe(1, 1.0 if i % 2 else 3.0)
    assert m.predict_ms(1) > 2.0 * m.base_ms(1)


def test_learning_off_keeps_the_profile() -> None:
    m = LatencyModel({1: 1.0}, learning=False)
    m.observe(1, 50.0)
    assert m.predict_ms(1) == 1.0


def test_empty_profile_is_refused() -> None:
    with pytest.raises(ValueError):
        LatencyModel({})
