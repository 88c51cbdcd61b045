"""Drop-path as pure functions: the join layout and the sampling frequencies."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from model.droppath import (
    DropPlan,
    column_keep,
    full_keep,
    join_layout,
    needed_depths,
    sample_local_keep,
    sample_plan,
    stride,
)

SAMPLES = 20_000
"""Plans per frequency check: the binomial standard error is below 0.004."""


def expanded_layout(columns: int) -> list[tuple[int, ...]]:
    """The join members at each depth, built by the paper's expansion rule.

    f1 = conv; f(C+1)(z) = join(fC(fC(z)), conv(z)). The new conv is column 1 and the
    columns of fC become 2..C+1; the outer join merges with the second fC's last join.
    """
    if columns == 1:
        return [(1,)]
    inner = [tuple(k + 1 for k in members) for members in expanded_layout(columns - 1)]
    layout = inner + inner
    layout[-1] = (1, *layout[-1])
    return layout


@pytest.mark.parametrize("columns", [1, 2, 3, 4, 5])
def test_join_layout_follows_the_expansion_rule(columns: int) -> None:
    assert list(join_layout(columns)) == expanded_layout(columns)


@pytest.mark.parametrize("columns", [1, 2, 3, 4])
def test_each_column_has_its_number_of_convolutions(columns: int) -> None:
    counts = Counter(k for members in join_layout(columns) for k in members)
    assert counts == {k: 2 ** (k - 1) for k in range(1, columns + 1)}
    assert all(stride(columns, k) * counts[k] == 2 ** (columns - 1) for k in counts)


def test_column_keep_is_one_chain() -> None:
    keep = column_keep(4, 3)
    assert [d for d, kept in enumerate(keep, start=1) if kept] == [2, 4, 6, 8]
    assert all(kept in ((), (3,)) for kept in keep)
    with pytest.raises(ValueError):
        column_keep(4, 5)


def test_needed_depths() -> None:
    assert needed_depths(4, full_keep(4)) == frozenset(range(9))
    assert needed_depths(4, column_keep(4, 1)) == {0, 8}
    assert needed_depths(4, column_keep(4, 2)) == {0, 4, 8}
    # Only column 1 kept at the last join: nothing inside the block is needed.
    keep = (*full_keep(4)[:-1], (1,))
    assert needed_depths(4, keep) == {0, 8}


@pytest.mark.parametrize(("columns", "local_drop"), [(3, 0.15), (4, 0.15), (4, 0.5), (2, 0.9)])
def test_local_sampling_never_empties_a_join(columns: int, local_drop: float) -> None:
    rng = random.Random(0)
    layout = join_layout(columns)
    for _ in range(2_000):
        keep = sample_local_keep(rng, columns, local_drop)
        assert len(keep) == len(layout)
        for kept, members in zip(keep, layout, strict=True):
            assert kept, "a join lost every input"
            assert set(kept) <= set(members)
            assert list(kept) == sorted(set(kept))


@pytest.mark.parametrize(("columns", "local_drop"), [(3, 0.15), (4, 0.15), (4, 0.5)])
def test_local_drop_rate_per_input(columns: int, local_drop: float) -> None:
    """Each input is dropped with probability p, except that an emptied join gets one
    input back: P(dropped) = p - p**m / m for a join of m inputs."""
    rng = random.Random(1)
    dropped: Counter[int] = Counter()
    seen: Counter[int] = Counter()
    for _ in range(SAMPLES // 4):
        for kept, members in zip(
            sample_local_keep(rng, columns, local_drop), join_layout(columns), strict=True
        ):
            if len(members) == 1:
                assert kept == members  # a lone input is never a join
                continue
            m = len(members)
            seen[m] += m
            dropped[m] += m - len(kept)
    for m in seen:
        expected = local_drop - local_drop**m / m
        assert dropped[m] / seen[m] == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("global_ratio", [0.0, 0.5, 0.8, 1.0])
def test_global_ratio_and_uniform_column_choice(global_ratio: float) -> None:
    rng = random.Random(2)
    columns, blocks = 4, 3
    plans = [sample_plan(rng, columns, blocks, 0.15, global_ratio) for _ in range(SAMPLES)]
    chosen = Counter(p.global_column for p in plans if p.global_column is not None)
    share = sum(chosen.values()) / SAMPLES
    assert share == pytest.approx(global_ratio, abs=0.02)
    if global_ratio > 0:
        total = sum(chosen.values())
        assert set(chosen) == set(range(1, columns + 1))
        for k in chosen:
            assert chosen[k] / total == pytest.approx(1 / columns, abs=0.02)
    local = [p for p in plans if p.global_column is None]
    assert all(len(p.local_keep) == blocks for p in local)


def test_global_plan_keeps_its_column_in_every_block() -> None:
    plan = DropPlan(global_column=2)
    assert all(plan.keep_for_block(b, 3) == column_keep(3, 2) for b in range(5))


def test_same_seed_same_plans() -> None:
    """What keeps DDP ranks on one sub-network: the plan is a function of the seed."""
    a, b = random.Random(7), random.Random(7)
    assert [sample_plan(a, 4, 4, 0.15, 0.5) for _ in range(200)] == [
        sample_plan(b, 4, 4, 0.15, 0.5) for _ in range(200)
    ]
