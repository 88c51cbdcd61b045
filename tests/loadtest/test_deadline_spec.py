"""Deadline specs: parsing, errors, round trips and seeded sampling."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.deadlines import (
    Fixed,
    Mixture,
    NoDeadline,
    Uniform,
    parse_deadline,
    sample_deadlines,
)


def test_parses_each_kind() -> None:
    assert parse_deadline("none") == NoDeadline()
    assert parse_deadline("fixed:50") == Fixed(50.0)
    assert parse_deadline(" uniform:10:80 ") == Uniform(10.0, 80.0)
    mix = parse_deadline("mixture:0.7*fixed:20,0.3*uniform:50:200")
    assert mix == Mixture((0.7, 0.3), (Fixed(20.0), Uniform(50.0, 200.0)))


def test_mixture_weights_are_normalised() -> None:
    mix = parse_deadline("mixture:3*fixed:5,1*fixed:10")
    assert isinstance(mix, Mixture)
    assert mix.weights == pytest.approx((0.75, 0.25))


@pytest.mark.parametrize(
    "spec",
    ["none", "fixed:50", "uniform:10:80", "mixture:0.7*fixed:20,0.3*uniform:50:200"],
)
def test_spec_round_trips(spec: str) -> None:
    assert parse_deadline(parse_deadline(spec).spec()) == parse_deadline(spec)


@pytest.mark.parametrize(
    "spec",
    [
        "", "fixed", "fixed:", "fixed:abc", "fixed:-5", "fixed:0", "fixed:inf", "fixed:1:2",
        "uniform:80:10", "uniform:10", "normal:5:1", "mixture:fixed:20",
        "mixture:0.5*fixed:20,0.5*mixture:1*fixed:5", "mixture:0*fixed:1", "none:5",
    ],
)  # fmt: skip
def test_rejects_malformed_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_deadline(spec)


def test_sampling_is_seeded() -> None:
    dist = parse_deadline("mixture:0.5*fixed:20,0.5*uniform:50:200")
    a = sample_deadlines(dist, 1000, seed=3)
    assert np.array_equal(a, sample_deadlines(dist, 1000, seed=3))
    assert not np.array_equal(a, sample_deadlines(dist, 1000, seed=4))


def test_sampled_values_follow_the_spec() -> None:
    assert np.all(sample_deadlines(Fixed(50.0), 10, seed=0) == 50.0)
    assert np.all(np.isnan(sample_deadlines(NoDeadline(), 10, seed=0)))
    u = sample_deadlines(Uniform(10.0, 80.0), 20000, seed=1)
    assert u.min() >= 10.0 and u.max() <= 80.0
    assert u.mean() == pytest.approx(45.0, abs=0.5)
    mix = sample_deadlines(parse_deadline("mixture:0.7*fixed:20,0.3*uniform:50:200"), 20000, 2)
    fixed = mix == 20.0
    assert fixed.mean() == pytest.approx(0.7, abs=0.02)
    assert np.all((mix[~fixed] >= 50.0) & (mix[~fixed] <= 200.0))
