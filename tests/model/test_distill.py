"""Distillation: the loss mixes labels and teacher as documented, the teacher sees two
views, and `fractal train --distill-from` learns from the teacher (weight 0: exactly as
without it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.config import preset
from model.distill import distillation_loss, teacher_logits
from model.network import FractalNet
from model.recalibrate import recalibrate_batchnorm
from model.train import load_checkpoint, parse_args, train
from service.bundle import sha256_file
from tests.model.test_train import SYNTHETIC


def test_weight_zero_is_plain_cross_entropy() -> None:
    logits, teacher = torch.randn(6, 10), torch.randn(6, 10)
    labels = torch.randint(0, 10, (6,))
    loss = distillation_loss(logits, labels, teacher, 0.0, 4.0)
    assert torch.equal(loss, F.cross_entropy(logits, labels))


def test_a_student_that_matches_its_teacher_pays_only_for_the_labels() -> None:
    logits = torch.randn(6, 10)
    labels = torch.randint(0, 10, (6,))
    loss = distillation_loss(logits, labels, logits.clone(), 0.7, 3.0)
    assert loss.item() == pytest.approx(0.3 * F.cross_entropy(logits, labels).item(), abs=1e-6)


def test_the_soft_term_is_the_scaled_kl_divergence() -> None:
    logits, teacher = torch.randn(5, 4), torch.randn(5, 4)
    labels = torch.randint(0, 4, (5,))
    t = 2.0
    p = F.softmax(teacher / t, dim=1)
    kl = (p * (p.log() - F.log_softmax(logits / t, dim=1))).sum(1).mean()
    expected = 0.5 * F.cross_entropy(logits, labels) + 0.5 * t * t * kl
    assert distillation_loss(logits, labels, teacher, 0.5, t).item() == pytest.approx(
        expected.item(), rel=1e-5
    )


def test_teacher_logits_average_the_image_and_its_mirror() -> None:
    net = FractalNet(preset("tiny-c4", image_size=16), seed=1).eval()
    images = torch.randint(0, 256, (7, 16, 16, 3), dtype=torch.uint8)
    norm = (torch.full((3,), 0.5), torch.full((3,), 0.25))
    calibration = [torch.randn(8, 3, 16, 16)]
    got = teacher_logits(net, 3, images, norm, calibration, torch.device("cpu"), batch_size=3)
    ref = recalibrate_batchnorm(net, 3, calibration)
    x = (images.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        want = (ref(x, column=3) + ref(x.flip(-1), column=3)) / 2
    assert got.shape == (7, net.config.num_classes)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_train_learns_from_the_teacher(tmp_path: Path) -> None:
    """A column-tuning stage with a teacher: weight 0 gives bit for bit the run without
    one; weight 1 (the teacher alone) gives other weights; the checkpoint records the
    teacher."""
    first = tmp_path / "first"
    train(parse_args([*SYNTHETIC, "--eval-every", "9", "--epochs", "1", "--out", str(first)]))
    teacher = first / "checkpoint.pt"
    runs = {}
    for name, extra in {
        "plain": [],
        "zero": ["--distill-from", str(teacher), "--distill-weight", "0"],
        "teacher": ["--distill-from", str(teacher), "--distill-weight", "1"],
    }.items():
        out = tmp_path / name
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(teacher.read_bytes())
        common = ["--eval-every", "9", "--epochs", "2", "--resume", "--tune-column", "2"]
        train(parse_args([*SYNTHETIC, *common, "--out", str(out), *extra]))
        ckpt = load_checkpoint(out / "checkpoint.pt")
        runs[name] = ckpt["model"]
        weights = {"plain": [], "zero": [0.0], "teacher": [1.0]}[name]
        assert [t["weight"] for t in ckpt["teachers"]] == weights
    assert ckpt["teachers"][0]["sha256"] == sha256_file(teacher)
    assert ckpt["teachers"][0]["from_epoch"] == 1
    changed = [k for k in runs["plain"] if not torch.equal(runs["plain"][k], runs["teacher"][k])]
    assert all(torch.equal(runs["plain"][k], runs["zero"][k]) for k in runs["plain"])
    assert changed


def test_bad_distillation_settings_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "r"
    train(parse_args([*SYNTHETIC, "--eval-every", "9", "--epochs", "1", "--out", str(out)]))
    teacher = str(out / "checkpoint.pt")
    with pytest.raises(ValueError, match="distill-weight"):
        train(parse_args([*SYNTHETIC, "--epochs", "2", "--resume", "--out", str(out),
                          "--distill-from", teacher, "--distill-weight", "1.5"]))  # fmt: skip
