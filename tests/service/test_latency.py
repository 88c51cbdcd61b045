"""The online latency model."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.latency import LatencyModel
from service.settings import Settings


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


def test_runs_after_idle_are_learned_apart() -> None:
    """Back-to-back runs keep their correction while runs after idle teach their own
    span, which is right after a few runs (a plain mean to start)."""
    m = LatencyModel({1: 1.0}, idle_edges_ms=(1.0, 10.0, 100.0))
    for _ in range(3):
        m.observe(1, 3.0, idle_ms=50.0)
    assert m.corrections[0].observations == 0 and m.correction == 1.0
    assert m.predict_ms(1) == 1.0  # back to back: the profile
    assert m.predict_ms(1, idle_ms=20.0) == pytest.approx(3.0)  # 10-100 ms: learned
    assert m.predict_ms(1, idle_ms=5.0) == 1.0  # 1-10 ms: nothing learned, as 0-1 ms
    # A longer idle span never predicts faster than a shorter one, learned or not.
    assert m.predict_ms(1, idle_ms=5000.0) == pytest.approx(3.0)
    m.observe(1, 2.0, idle_ms=500.0)
    assert m.predict_ms(1, idle_ms=500.0) == pytest.approx(3.0)
    assert m.idle_snapshot() == {"0": 1.0, "1": 1.0, "10": 3.0, "100": 3.0}


def test_without_idle_edges_every_run_teaches_one_correction() -> None:
    m = LatencyModel({1: 1.0}, idle_edges_ms=())
    for _ in range(300):
        m.observe(1, 2.0, idle_ms=500.0)
    assert m.predict_ms(1) == pytest.approx(2.0, rel=0.01)
    assert list(m.idle_snapshot()) == ["0"]


def test_idle_edges_must_increase() -> None:
    with pytest.raises(ValueError):
        LatencyModel({1: 1.0}, idle_edges_ms=(10.0, 1.0))
    with pytest.raises(ValidationError, match="positive and increasing"):
        Settings(latency_idle_edges_ms=(10.0, 1.0))
    with pytest.raises(ValidationError, match="positive and increasing"):
        Settings(latency_idle_edges_ms=(0.0, 1.0))
    assert Settings().latency_idle_edges_ms == ()  # by default: one correction
