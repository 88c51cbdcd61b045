"""Two-process DDP training on CPU (gloo), launched as the docs say: torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.train import load_checkpoint
from tests.support import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "model.train", "--dataset", "synthetic", "--preset", "tiny-c4",
        "--image-size", "16", "--epochs", "2", "--train-limit", "64", "--eval-limit", "16",
        "--batch-size", "16", "--threads", "1", "--device", "cpu", "--no-progress",
        "--out", str(out),
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 2
    # Every rank's random streams were gathered, so a resume restores each of them.
    assert len(ckpt["aug_rng"]) == len(ckpt["torch_rng"]) == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert "on cpu x2" in result.stderr  # the run logged its world size
