"""Drop-path as pure functions: the join layout of a block and the per-batch sampling.

A block with C columns is a grid of depth D = 2**(C-1). Column k (1 = shallowest) holds
2**(k-1) convolutions; its j-th convolution ends at depth (j+1) * 2**(C-k). At each depth
d the columns whose convolution ends there form K(d); where K(d) has two or more members
they meet in one join (the paper's merged joins), and every member of K(d) continues from
the join's output. So a block is a chain of states J(0)=input ... J(D)=output with

    J(d) = mean over kept k in K(d) of conv[k][d / 2**(C-k) - 1](J(d - 2**(C-k)))

A drop-path plan says, per block and depth, which members of K(d) are kept. Sampling is
a function of a `random.Random`, so a seed fixes it (and all DDP ranks agree on it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache


@cache
def join_layout(columns: int) -> tuple[tuple[int, ...], ...]:
    """K(d) for d = 1..D, each sorted shallow first; index 0 is depth 1."""
    depth = 2 ** (columns - 1)
    return tuple(
        tuple(k for k in range(1, columns + 1) if d % 2 ** (columns - k) == 0)
        for d in range(1, depth + 1)
    )


def stride(columns: int, column: int) -> int:
    """Depth covered by one convolution of `column`."""
    return 2 ** (columns - column)


KeepMap = tuple[tuple[int, ...], ...]
"""Kept columns at each depth 1..D of one block (index 0 is depth 1)."""


@dataclass(frozen=True)
class DropPlan:
    """What one mini-batch computes: a global column, or local keep maps per block."""

    global_column: int | None
    local_keep: tuple[KeepMap, ...] = ()

    def keep_for_block(self, block: int, columns: int) -> KeepMap:
        if self.global_column is not None:
            return column_keep(columns, self.global_column)
        return self.local_keep[block]


def full_keep(columns: int) -> KeepMap:
    """Every input of every join kept: the whole network, as at inference."""
    return join_layout(columns)


@cache
def column_keep(columns: int, column: int) -> KeepMap:
    """Only `column` kept: a plain chain of its convolutions."""
    if not 1 <= column <= columns:
        raise ValueError(f"column must lie in 1..{columns}, got {column}")
    return tuple((column,) if column in members else () for members in join_layout(columns))


def needed_depths(columns: int, keep: KeepMap) -> frozenset[int]:
    """Depths whose state J(d) feeds the block output under `keep` (0 = the input)."""
    depth = len(keep)
    needed = {depth}
    for d in range(depth, 0, -1):
        if d in needed:
            needed.update(d - stride(columns, k) for k in keep[d - 1])
    return frozenset(needed)


def sample_local_keep(rng: random.Random, columns: int, local_drop: float) -> KeepMap:
    """Drop each input of each join with probability `local_drop`, keeping at least one."""
    kept: list[tuple[int, ...]] = []
    for members in join_layout(columns):
        if len(members) == 1:
            kept.append(members)
            continue
        alive = tuple(k for k in members if rng.random() >= local_drop)
        kept.append(alive if alive else (rng.choice(members),))
    return tuple(kept)


def sample_plan(
    rng: random.Random, columns: int, num_blocks: int, local_drop: float, global_ratio: float
) -> DropPlan:
    """One mini-batch's plan: global with probability `global_ratio`, else local."""
    if rng.random() < global_ratio:
        return DropPlan(global_column=rng.randint(1, columns))
    return DropPlan(
        global_column=None,
        local_keep=tuple(sample_local_keep(rng, columns, local_drop) for _ in range(num_blocks)),
    )
