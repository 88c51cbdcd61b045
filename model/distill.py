"""Knowledge distillation from a trained checkpoint (`fractal train --distill-from`).

The teacher is a finished network's answer for the path being trained (the tuned column,
or the whole network), taken once before training on every un-augmented training image
and its mirror image, with the logits of the two views averaged (`model.views`, as the
export's two-view variants do: about a point more accurate than one view). The student
then learns from a mix of the labels and the teacher's softened distribution (Hinton,
Vinyals and Dean 2015, "Distilling the Knowledge in a Neural Network"): a teacher of the
student's own architecture can still teach it (Furlanello et al. 2018, "Born-Again
Neural Networks").

The teacher's answer is for the whole image; the student sees it shifted by up to 4 px
and perhaps mirrored. The two-view average makes the target the same for both mirror
states; the shift is small enough to ignore.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.network import FractalNet
from model.recalibrate import recalibrate_batchnorm
from model.views import batched_logits


@torch.no_grad()
def teacher_logits(
    teacher: FractalNet,
    column: int | None,
    images: torch.Tensor,
    norm: tuple[torch.Tensor, torch.Tensor],
    calibration: list[torch.Tensor],
    device: torch.device,
    batch_size: int = 500,
) -> torch.Tensor:
    """Per image (uint8 NHWC), the teacher's logits for path `column`, averaged over the
    image and its mirror image; float32 [N, classes] on the CPU. BatchNorm statistics are
    re-estimated for that path first (see `model.recalibrate`)."""
    net = recalibrate_batchnorm(teacher.to(device), column, calibration)
    return batched_logits(net, column, images, norm, views=2, device=device, batch_size=batch_size)


def distillation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher: torch.Tensor,
    weight: float,
    temperature: float,
) -> torch.Tensor:
    """(1 - weight) x cross-entropy with the labels + weight x T^2 x KL(teacher || student)
    at temperature T (the T^2 keeps the soft term's gradients on the hard term's scale)."""
    hard = F.cross_entropy(logits, labels)
    if weight == 0:
        return hard
    soft = F.kl_div(
        F.log_softmax(logits / temperature, dim=1),
        F.log_softmax(teacher / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1 - weight) * hard + weight * temperature**2 * soft
