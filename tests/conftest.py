"""Shared fixtures: a tiny bundle exported from a real (digits-trained) checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-c4 FractalNet trained for a few seconds on the bundled digits."""
    pytest.importorskip("torch")
    from model.train import parse_args, train

    out = tmp_path_factory.mktemp("tiny-run")
    args = parse_args(
        [
            "--dataset",
            "digits",
            "--preset",
            "tiny-c4",
            "--epochs",
            "6",
            "--lr",
            "0.05",
            "--batch-size",
            "32",
            "--holdout",
            "200",
            "--eval-every",
            "6",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    return train(args)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle (fp32 and int8 columns) built from `tiny_checkpoint`."""
    from model.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(
        tiny_checkpoint,
        out,
        name="tiny",
        version="test",
        int8=True,
        latency_repeats=3,
        description="test fixture",
    )
    return out


@pytest.fixture(scope="session")
def flip_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle with one- and two-view fp32 variants of every column (`--flip`)."""
    from model.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "flip"
    export_bundle(tiny_checkpoint, out, name="flip", version="test", flip=True, latency_repeats=3)
    return out
