"""Per-column BatchNorm statistics.

During training a conv unit sees different inputs depending on the drop-path plan: the
mean of several columns after a local join, or one column alone under global drop-path.
Its running statistics mix both, and along a deep column the mismatch compounds: on
digits, column 4 scored 32% with the training-time statistics and 85% once its
statistics were recomputed with the column alone. So every column (and the whole network)
is evaluated and exported with statistics re-estimated on training images for exactly
that path. The weights are untouched; only BatchNorm buffers change.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from model.network import FractalNet


@torch.no_grad()
def recalibrate_batchnorm(
    net: FractalNet, column: int | None, batches: Iterable[torch.Tensor]
) -> FractalNet:
    """A copy of `net` whose BatchNorm statistics are the exact averages over `batches`
    for the path `column` (None: the whole network without drop-path)."""
    clone = copy.deepcopy(net)
    clone.eval()  # dropout off; only BatchNorm layers collect statistics
    norms = [m for m in clone.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches
        bn.train()
    for x in batches:
        clone(x, column=column)
    for bn in norms:
        bn.eval()
    return clone
