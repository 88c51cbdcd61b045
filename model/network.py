"""FractalNet (Larsson, Maire, Shakhnarovich, 2016: "FractalNet: Ultra-Deep Neural
Networks without Residuals"), with per-column inference for anytime serving.

Each block follows f1(z) = conv(z), f(C+1)(z) = join(fC(fC(z)), conv(z)) with the paper's
merged joins (one join at each depth where columns meet, averaging every column that ends
there), then 2x2 max-pooling; a linear classifier follows the last block.

What we do differently, and why:
- conv unit = 3x3 conv (no bias) + BatchNorm + ReLU + Dropout(block rate). Dropout sits
  after the ReLU of every unit, as in the public PyTorch port; the paper only says "per
  block".
- When the last block's output is larger than 1x1 (small layouts, small images) it is
  average-pooled to 1x1 before the classifier. For the paper's layout it is already 1x1.
- Dropped paths are not computed (see `droppath.needed_depths`): a globally sampled batch
  costs only its column. `drop_mode="mask"` computes every path and discards dropped ones,
  for benchmarking the difference.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from model.config import FractalConfig
from model.droppath import (
    DropPlan,
    KeepMap,
    column_keep,
    full_keep,
    join_layout,
    needed_depths,
    sample_plan,
    stride,
)

DropMode = Literal["skip", "mask"]


class ConvUnit(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class FractalBlock(nn.Module):
    """One fractal block: `columns[k-1]` holds column k's 2**(k-1) conv units."""

    def __init__(self, in_channels: int, out_channels: int, columns: int, dropout: float):
        super().__init__()
        self.num_columns = columns
        self.columns = nn.ModuleList(
            nn.ModuleList(
                ConvUnit(in_channels if j == 0 else out_channels, out_channels, dropout)
                for j in range(2 ** (k - 1))
            )
            for k in range(1, columns + 1)
        )

    def unit(self, column: int, depth: int) -> nn.Module:
        """The conv unit of `column` that ends at `depth`."""
        units = self.columns[column - 1]
        assert isinstance(units, nn.ModuleList)
        return units[depth // stride(self.num_columns, column) - 1]

    def forward(self, x: torch.Tensor, keep: KeepMap, mode: DropMode = "skip") -> torch.Tensor:
        if mode == "mask":
            return self._forward_masked(x, keep)
        needed = needed_depths(self.num_columns, keep)
        states: dict[int, torch.Tensor] = {0: x}
        for d in range(1, len(keep) + 1):
            if d not in needed:
                continue
            outs = [self.unit(k, d)(states[d - stride(self.num_columns, k)]) for k in keep[d - 1]]
            states[d] = outs[0] if len(outs) == 1 else torch.stack(outs).mean(dim=0)
        return states[len(keep)]

    def _forward_masked(self, x: torch.Tensor, keep: KeepMap) -> torch.Tensor:
        """Every path computed, dropped ones discarded (the naive way; benchmarks only)."""
        states: dict[int, torch.Tensor] = {0: x}
        for d, members in enumerate(join_layout(self.num_columns), start=1):
            outs = {k: self.unit(k, d)(states[d - stride(self.num_columns, k)]) for k in members}
            kept = keep[d - 1] or members
            states[d] = torch.stack([outs[k] for k in kept]).mean(dim=0)
        return states[len(keep)]


class FractalNet(nn.Module):
    def __init__(self, config: FractalConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        blocks: list[nn.Module] = []
        in_channels = config.in_channels
        for out_channels, rate in zip(config.channels, config.block_dropout, strict=True):
            blocks.append(FractalBlock(in_channels, out_channels, config.columns, rate))
            in_channels = out_channels
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(in_channels, config.num_classes)
        self.drop_rng = random.Random(seed)
        self.drop_mode: DropMode = "skip"
        if config.init == "xavier":
            self._init_xavier()

    def _init_xavier(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def drop_path_enabled(self) -> bool:
        return self.config.global_ratio > 0 or self.config.local_drop > 0

    def sample_plan(self) -> DropPlan:
        c = self.config
        return sample_plan(self.drop_rng, c.columns, c.num_blocks, c.local_drop, c.global_ratio)

    def forward(
        self, x: torch.Tensor, column: int | None = None, plan: DropPlan | None = None
    ) -> torch.Tensor:
        """Logits. `column=k` runs only column k; otherwise the whole network, with a
        fresh drop-path plan per call in training mode (or the given `plan`)."""
        c = self.config
        if column is not None:
            plan = DropPlan(global_column=column)
        elif plan is None and self.training and self.drop_path_enabled:
            plan = self.sample_plan()
        for i, block in enumerate(self.blocks):
            if plan is None:
                keep = full_keep(c.columns)
            elif plan.global_column is not None:
                keep = column_keep(c.columns, plan.global_column)
            else:
                keep = plan.keep_for_block(i, c.columns)
            x = self.pool(block(x, keep, self.drop_mode))
        x = x.mean(dim=(2, 3)) if x.shape[-1] > 1 or x.shape[-2] > 1 else x.flatten(1)
        return self.head(x)


class ColumnNet(nn.Module):
    """One column of a trained FractalNet as a plain module (what gets exported)."""

    def __init__(self, net: FractalNet, column: int) -> None:
        super().__init__()
        self.net = net
        self.column = column

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, column=self.column)


def _column_unit_parameters(net: FractalNet, column: int) -> Iterator[nn.Parameter]:
    """The parameters of `column`'s conv units (their BatchNorm included), in every block."""
    for block in net.blocks:
        assert isinstance(block, FractalBlock)
        yield from block.columns[column - 1].parameters()


def tune_only(net: FractalNet, column: int) -> int:
    """Leave only `column`'s conv units trainable (their BatchNorm included) and return how
    many parameters that is. Columns share no weights, so with the shared classifier
    frozen too, training column k alone leaves every other column's answers as they were.
    """
    if not 1 <= column <= net.config.columns:
        raise ValueError(f"column must lie in 1..{net.config.columns}, got {column}")
    net.requires_grad_(False)
    trainable = 0
    for p in _column_unit_parameters(net, column):
        p.requires_grad_(True)
        trainable += p.numel()
    return trainable


def column_parameters(net: FractalNet, column: int) -> int:
    """Parameters used by `column` alone (its conv units, their BN, and the head)."""
    head = sum(p.numel() for p in net.head.parameters())
    return head + sum(p.numel() for p in _column_unit_parameters(net, column))
