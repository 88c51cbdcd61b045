"""Answers from one or two views: an image, or an image and its mirror image.

A two-view answer averages the logits of each image and of its horizontally mirrored copy,
run as one doubled batch. The export's two-view variants trace `viewed_logits` into their
ONNX graphs; distillation's teacher answers with two views the same way.
"""

from __future__ import annotations

from typing import Any

import torch

from model.data import to_tensor
from model.network import FractalNet


def viewed_logits(net: FractalNet, x: torch.Tensor, column: int | None, views: int) -> torch.Tensor:
    """The logits of path `column` (None: the whole network) for normalised NCHW images;
    with two views, the mean of the logits of each image and of its mirror image."""
    if views == 1:
        return net(x, column=column)
    both = net(torch.cat([x, x.flip(3)]), column=column)
    return both.reshape(2, -1, both.shape[1]).mean(0)


@torch.no_grad()
def batched_logits(
    net: FractalNet,
    column: int | None,
    images: torch.Tensor,
    norm: Any,
    views: int = 1,
    device: torch.device | None = None,
    batch_size: int = 500,
) -> torch.Tensor:
    """`viewed_logits` for uint8 NHWC `images`, `batch_size` at a time on `device`;
    float32 [N, classes] on the CPU."""
    device = device or torch.device("cpu")
    parts = [
        viewed_logits(net, to_tensor(images[i : i + batch_size], *norm).to(device), column, views)
        .float()
        .cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, net.config.num_classes)
