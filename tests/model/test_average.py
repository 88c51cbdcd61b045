"""Weight averaging: the mean of floating-point tensors, the last checkpoint's everything
else, refusals for mismatched checkpoints, and a result that `fractal eval` scores and
`fractal train --resume` continues from."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from model.average import average_checkpoints, average_state_dicts, main
from model.evaluate import evaluate_checkpoint
from model.train import load_checkpoint, parse_args, train
from service.bundle import sha256_file
from tests.model.test_train import SYNTHETIC


def test_floats_are_averaged_and_counters_come_from_the_last() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(7)}
    mean = average_state_dicts([a, b])
    assert torch.equal(mean["w"], torch.tensor([2.0, 4.0]))
    assert mean["n"].item() == 7


@pytest.mark.parametrize(
    "other",
    [
        {"w": torch.zeros(2), "extra": torch.zeros(1)},
        {"w": torch.zeros(3)},
        {"w": torch.zeros(2, dtype=torch.float64)},
    ],
    ids=["keys", "shape", "dtype"],
)
def test_mismatched_weights_are_refused(other: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ValueError, match="checkpoint 1"):
        average_state_dicts([other, {"w": torch.zeros(2)}])


def test_nothing_to_average_is_refused() -> None:
    with pytest.raises(ValueError):
        average_state_dicts([])


@pytest.fixture(scope="module")
def two_stage_ends(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The ends of two schedules of one synthetic run (epoch 1, then epoch 2 after a
    warm restart), as `fractal train --restart-schedule` leaves them."""
    run = tmp_path_factory.mktemp("run")
    keep = tmp_path_factory.mktemp("ends")
    common = [*SYNTHETIC, "--eval-every", "9", "--out", str(run)]
    first = shutil.copy(train(parse_args([*common, "--epochs", "1"])), keep / "e1.pt")
    ckpt = train(parse_args([*common, "--epochs", "2", "--resume", "--restart-schedule"]))
    return Path(first), Path(shutil.copy(ckpt, keep / "e2.pt"))


def test_the_average_of_two_stage_ends(two_stage_ends: tuple[Path, Path], tmp_path: Path) -> None:
    first, second = two_stage_ends
    out = tmp_path / "avg" / "checkpoint.pt"
    assert main([str(first), str(second), "--out", str(out)]) == 0
    a, b, avg = load_checkpoint(first), load_checkpoint(second), load_checkpoint(out)
    weight = "head.weight"
    assert torch.allclose(avg["model"][weight], (a["model"][weight] + b["model"][weight]) / 2)
    assert not torch.equal(a["model"][weight], b["model"][weight])
    assert avg["epoch"] == 2 and avg["schedule_start"] == b["schedule_start"] == 1
    momentum = [state["momentum_buffer"] for state in avg["optimizer"]["state"].values()]
    last = [state["momentum_buffer"] for state in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(momentum, last, strict=True))
    assert avg["averaged_from"] == [
        {"file": "e1.pt", "sha256": sha256_file(first), "epoch": 1},
        {"file": "e2.pt", "sha256": sha256_file(second), "epoch": 2},
    ]
    scores = evaluate_checkpoint(out, limit=20)
    assert set(scores.heads) >= {"full", "column_1", "column_4"}
    # Training resumes from the average as from the last checkpoint.
    resumed = [*SYNTHETIC, "--eval-every", "9", "--out", str(out.parent), "--resume"]
    assert load_checkpoint(train(parse_args([*resumed, "--epochs", "3"])))["epoch"] == 3


def test_a_checkpoint_averaged_with_itself_is_unchanged(
    two_stage_ends: tuple[Path, Path], tmp_path: Path
) -> None:
    _, second = two_stage_ends
    avg = average_checkpoints([second, second], tmp_path / "same.pt")
    for key, value in load_checkpoint(second)["model"].items():
        assert torch.allclose(avg["model"][key], value.to(avg["model"][key].dtype))


def test_refusals_are_clear(two_stage_ends: tuple[Path, Path], tmp_path: Path) -> None:
    first, second = two_stage_ends
    with pytest.raises(SystemExit, match="at least two"):
        main([str(first), "--out", str(tmp_path / "x.pt")])
    with pytest.raises(SystemExit, match="fractal average"):
        main([str(first), str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.pt")])
    other = load_checkpoint(first)
    other["config"] = {**other["config"], "columns": 3}
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="another network"):
        main([str(tmp_path / "other.pt"), str(second), "--out", str(tmp_path / "x.pt")])
    assert not (tmp_path / "x.pt").exists()
