"""Training: the schedule and its warm restart, a falling loss, checkpoints, exact resume."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.config import FractalConfig, preset
from model.data import synthetic_split, to_tensor
from model.network import FractalNet
from model.recalibrate import recalibrate_batchnorm
from model.train import (
    build_config,
    kept_checkpoint_path,
    load_checkpoint,
    lr_at,
    model_from_checkpoint,
    parse_args,
    save_checkpoint,
    train,
)

SYNTHETIC = [
    "--dataset", "synthetic", "--preset", "tiny-c4", "--image-size", "16",
    "--train-limit", "100", "--eval-limit", "20", "--batch-size", "25",
    "--threads", "1", "--no-progress",
]  # fmt: skip


def test_lr_schedule_of_the_paper() -> None:
    """400 epochs: divided by 10 at epochs 200, 300, 350 and 375, and (read literally)
    on at every further halving of the remaining epochs."""
    drops = {0: 1.0, 199: 1.0, 200: 0.1, 299: 0.1, 300: 0.01, 349: 0.01, 350: 1e-3, 375: 1e-4}
    for epoch, factor in drops.items():
        assert lr_at(epoch, 400, 0.02) == pytest.approx(0.02 * factor)
    assert lr_at(399, 400, 0.02) == pytest.approx(0.02 * 1e-8)  # 1 of 400 left: 8 halvings
    assert [lr_at(e, 8, 1.0) for e in range(8)] == pytest.approx(
        [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.001]
    )
    assert lr_at(0, 1, 0.5) == 0.5


def test_lr_schedule_restarts_at_a_resumed_epoch() -> None:
    """A warm restart at epoch 20 of a 34-epoch run: epochs 20-33 follow a 14-epoch run."""
    restarted = [lr_at(e, 34, 1.0, schedule_start=20) for e in range(20, 34)]
    assert restarted == pytest.approx([lr_at(e, 14, 1.0) for e in range(14)])
    assert restarted[0] == 1.0


def test_restart_schedule_resumes_at_full_rate_and_keeps_it(tmp_path: Path) -> None:
    """`--restart-schedule` puts a finished run back at the base rate; the restart point is
    saved, so a further plain `--resume` stays on the restarted schedule."""
    out = tmp_path / "run"
    common = [*SYNTHETIC, "--eval-every", "9", "--out", str(out)]
    train(parse_args([*common, "--epochs", "1"]))
    train(parse_args([*common, "--epochs", "3", "--resume", "--restart-schedule"]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == pytest.approx([0.02, 0.02, 0.002])
    assert load_checkpoint(out / "checkpoint.pt")["schedule_start"] == 1
    train(parse_args([*common, "--epochs", "5", "--resume"]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # A longer run keeps the restart point: its steps span epochs 1-5.
    assert [r["lr"] for r in records[3:]] == pytest.approx(
        [lr_at(e, 5, 0.02, schedule_start=1) for e in (3, 4)]
    )


def test_constant_schedule_keeps_the_rate_and_every_epoch_end(tmp_path: Path) -> None:
    """Stochastic weight averaging's run: `--lr-schedule constant` stays at --lr, and
    `--keep-every 1` keeps each epoch's checkpoint beside checkpoint.pt."""
    out = tmp_path / "run"
    common = [*SYNTHETIC, "--eval-every", "9", "--out", str(out)]
    train(parse_args([*common, "--epochs", "1"]))
    swa = ["--lr", "0.01", "--lr-schedule", "constant", "--keep-every", "1"]
    train(parse_args([*common, "--epochs", "4", "--resume", *swa]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == pytest.approx([0.02, 0.01, 0.01, 0.01])
    kept = sorted(out.glob("checkpoint-e*.pt"))
    assert kept == [kept_checkpoint_path(out, e) for e in (2, 3, 4)]
    assert [load_checkpoint(k)["epoch"] for k in kept] == [2, 3, 4]
    last, final = (
        load_checkpoint(kept[-1])["model"],
        load_checkpoint(out / "checkpoint.pt")["model"],
    )
    assert all(torch.equal(last[k], final[k]) for k in final)
    assert not torch.equal(load_checkpoint(kept[0])["model"]["head.weight"], final["head.weight"])


def test_keep_every_must_not_be_negative(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--keep-every"):
        train(parse_args([*SYNTHETIC, "--keep-every", "-1", "--out", str(tmp_path / "run")]))


def test_restart_schedule_needs_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--restart-schedule"):
        train(parse_args([*SYNTHETIC, "--restart-schedule", "--out", str(tmp_path / "none")]))


def test_build_config_from_cli() -> None:
    args = parse_args(["--preset", "small-c4", "--channels", "8,16", "--columns", "3"])
    config = build_config(args, num_classes=7)
    assert config.channels == (8, 16) and config.columns == 3 and config.num_classes == 7
    assert config.block_dropout == (0.0, 0.1)
    assert (config.local_drop, config.global_ratio) == (0.15, 0.5)
    off = build_config(parse_args(["--no-drop-path"]), num_classes=10)
    assert (off.local_drop, off.global_ratio) == (0.0, 0.0)
    assert FractalConfig.from_dict(config.to_dict()) == config
    with pytest.raises(KeyError):
        preset("no-such-preset")


def test_a_short_run_lowers_the_loss() -> None:
    torch.manual_seed(0)
    config = preset("tiny-c4", image_size=8)
    split = synthetic_split(256, 8, seed=0)
    norm = (torch.full((3,), 0.5), torch.full((3,), 0.25))
    x = to_tensor(torch.from_numpy(split.images), *norm)
    y = torch.from_numpy(split.labels)
    net = FractalNet(config)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)

    @torch.no_grad()
    def loss_now() -> float:
        calibrated = recalibrate_batchnorm(net, None, [x])
        return float(F.cross_entropy(calibrated(x), y))

    before = loss_now()
    net.train()
    for step in range(40):
        batch = slice(32 * (step % 8), 32 * (step % 8 + 1))
        loss = F.cross_entropy(net(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = loss_now()
    assert math.isfinite(after)
    assert after < 0.7 * before, (before, after)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    config = FractalConfig(channels=(4, 8), columns=3, image_size=8)
    net = FractalNet(config).eval()
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"config": config.to_dict(), "model": net.state_dict()})
    assert not path.with_suffix(".tmp").exists()
    again = model_from_checkpoint(load_checkpoint(path))
    assert again.config == config and not again.training
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        for column in (None, 1, 2, 3):
            torch.testing.assert_close(again(x, column=column), net(x, column=column))


def test_resume_is_exact(tmp_path: Path) -> None:
    """Two epochs straight equal one epoch, a stop, and a resumed second epoch: the
    weights, optimizer and every random stream (drop-path, augmentation, dropout)
    continue where they stopped."""
    common = [*SYNTHETIC, "--epochs", "2", "--augment", "plus", "--eval-every", "2"]
    straight = train(parse_args([*common, "--out", str(tmp_path / "straight")]))
    stopped = tmp_path / "stopped"
    # A minimal time budget stops cleanly after the first epoch, as a preempted job would.
    train(parse_args([*common, "--max-minutes", "1e-9", "--out", str(stopped)]))
    assert load_checkpoint(stopped / "checkpoint.pt")["epoch"] == 1
    resumed = train(parse_args([*common, "--resume", "--out", str(stopped)]))

    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["drop_rng"] == b["drop_rng"]
    assert torch.equal(a["torch_rng"][0]["cpu"], b["torch_rng"][0]["cpu"])
    assert len((stopped / "metrics.jsonl").read_text().splitlines()) == 2


def test_tuning_one_column_leaves_the_others_as_they_were(tmp_path: Path) -> None:
    """`--tune-column 2` trains column 2 alone: its answers change, and every other
    column's (and the classifier's weights) stay bit for bit what they were."""
    out = tmp_path / "run"
    common = [*SYNTHETIC, "--eval-every", "9", "--out", str(out)]
    train(parse_args([*common, "--epochs", "1"]))
    before = model_from_checkpoint(load_checkpoint(out / "checkpoint.pt")).eval()
    train(parse_args([*common, "--epochs", "3", "--resume", "--tune-column", "2"]))
    after = model_from_checkpoint(load_checkpoint(out / "checkpoint.pt")).eval()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        for column in range(1, before.config.columns + 1):
            same = torch.equal(before(x, column=column), after(x, column=column))
            assert same == (column != 2), column
    assert torch.equal(before.head.weight, after.head.weight)


def test_resume_can_replace_the_dropout_rates(tmp_path: Path) -> None:
    """`--dropout` on a resume swaps the rates in the saved config; the weights load into
    the network with the new rates as they are (dropout has none), so the run goes on from
    exactly the checkpoint's answers."""
    out = tmp_path / "run"
    common = [*SYNTHETIC, "--eval-every", "9", "--out", str(out)]
    train(parse_args([*common, "--epochs", "1", "--dropout", "0.1,0.2"]))
    before = load_checkpoint(out / "checkpoint.pt")
    assert tuple(before["config"]["dropout"]) == (0.1, 0.2)
    train(parse_args([*common, "--epochs", "2", "--resume", "--dropout", "0,0"]))
    after = load_checkpoint(out / "checkpoint.pt")
    assert tuple(after["config"]["dropout"]) == (0.0, 0.0)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model_from_checkpoint(after).modules())
    undropped = FractalNet(FractalConfig.from_dict(after["config"]))
    undropped.load_state_dict(before["model"])  # strict: the same keys
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model_from_checkpoint(before)(x), undropped.eval()(x))


@pytest.mark.parametrize(("rates", "message"), [("0.1", "one rate per block"), ("0,1", "[0, 1)")])
def test_bad_dropout_rates_are_refused(tmp_path: Path, rates: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        train(parse_args([*SYNTHETIC, "--dropout", rates, "--out", str(tmp_path / "r")]))


def test_tune_column_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"column must lie in 1\.\.4"):
        train(parse_args([*SYNTHETIC, "--tune-column", "5", "--out", str(tmp_path / "r")]))
