"""`fractal eval` on the tiny checkpoint (torch) and the tiny bundle (onnxruntime)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from model.data import load_split
from model.evaluate import (
    VariantScore,
    evaluate_bundle,
    evaluate_checkpoint,
    format_table,
    main,
    updated_manifest,
)
from service.bundle import load_bundle, read_manifest


def test_eval_checkpoint_reproduces_training(
    tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same calibration images and test set as the training run's last evaluation."""
    rows = (tiny_checkpoint.parent / "metrics.jsonl").read_text().splitlines()
    reported = json.loads(rows[-1])["test"]
    assert main([str(tiny_checkpoint), "--dataset", "digits"]) == 0
    scores, depth = capsys.readouterr().out.split("\n\n")
    lines = scores.splitlines()
    assert lines[0].split() == ["head", "loss", "top-1"]
    table = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert list(table) == ["full", "column_1", "column_2", "column_3", "column_4"]
    for head, (loss, top1) in table.items():
        assert float(top1) == pytest.approx(reported[head]["accuracy"], abs=5e-5)
        assert float(loss) == pytest.approx(reported[head]["loss"], abs=5e-5)
    # Each column against the one before it, on the same test images.
    accuracy = {head: float(row[1]) for head, row in table.items()}
    _check_depth_table(depth, ["column_1", "column_2", "column_3", "column_4"], accuracy)


def test_eval_checkpoint_on_its_held_out_images(tiny_checkpoint: Path, tiny_bundle: Path) -> None:
    """The 200 training images the fixture held out, not the test set."""
    held = evaluate_checkpoint(tiny_checkpoint, split="holdout")
    test = evaluate_checkpoint(tiny_checkpoint)
    assert {len(right) for right in held.right.values()} == {200}
    assert len(test.right["column_4"]) == len(load_split("digits", "test", None, 16))
    for head, scores in held.heads.items():
        assert scores["accuracy"] == pytest.approx(held.right[head].mean())
    with pytest.raises(SystemExit, match="test set only"):
        main([str(tiny_bundle), "--split", "holdout"])
    with pytest.raises(ValueError, match="model's own"):
        evaluate_checkpoint(tiny_checkpoint, dataset="synthetic", split="holdout")


def _check_depth_table(text: str, columns: list[str], accuracy: dict[str, float]) -> None:
    lines = text.strip().splitlines()
    assert lines[0].split()[:2] == ["column", "against"]
    rows = [line.split() for line in lines[1:]]
    assert [(r[0], r[1]) for r in rows] == list(zip(columns[1:], columns[:-1], strict=True))
    for name, before, change, _, only_it, only_other, p in rows:
        assert float(change) == pytest.approx(100 * (accuracy[name] - accuracy[before]), abs=0.02)
        assert np.sign(float(change)) == np.sign(int(only_it) - int(only_other))
        assert p == "<0.0001" or 0.0 <= float(p) <= 1.0


def test_eval_bundle_limit(tiny_bundle: Path) -> None:
    scores = evaluate_bundle(tiny_bundle, limit=20, threads=1, latency_repeats=1)
    assert len(scores) == len(load_bundle(tiny_bundle).variants)
    assert all(round(s.accuracy * 20, 9).is_integer() for s in scores)


def test_eval_bundle_reproduces_the_manifest(
    tiny_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = load_bundle(tiny_bundle)
    assert main([str(tiny_bundle), "--latency-repeats", "2"]) == 0
    scores, depth = capsys.readouterr().out.split("\n\n")
    lines = scores.splitlines()
    assert lines[0].split() == ["variant", "top-1", "manifest", "ms@1", "ms@8", "ms@32"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert set(rows) == {v.key for v in manifest.variants}
    for v in manifest.variants:
        top1, recorded, *latency = rows[v.key]
        assert float(recorded) == pytest.approx(v.accuracy, abs=1e-4)
        # The export scored the same test images with the same runtime code.
        assert float(top1) == pytest.approx(float(recorded), abs=0.01)
        assert all(float(ms) > 0 for ms in latency)
    fp32 = sorted((v for v in manifest.variants if v.precision == "fp32"), key=lambda v: v.column)
    accuracy = {key: float(row[0]) for key, row in rows.items()}
    _check_depth_table(depth, [v.key for v in fp32], accuracy)


def test_update_manifest(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    for refused in (["--limit", "10"], ["--dataset", "synthetic"]):
        with pytest.raises(SystemExit):
            main([str(bundle), "--update-manifest", *refused])
    before = read_manifest(bundle)
    assert main([str(bundle), "--update-manifest", "--latency-repeats", "1"]) == 0
    after = load_bundle(bundle)  # still valid, and the hashes still hold
    for old, new in zip(before.variants, after.variants, strict=True):
        assert new.key == old.key and new.sha256 == old.sha256
        assert new.accuracy is not None and new.latency is not None
        assert set(new.latency.ms_by_batch) == {1, 8, 32}
    assert after.training == before.training


def test_updated_manifest_replaces_only_measurements(tiny_bundle: Path) -> None:
    manifest = read_manifest(tiny_bundle)
    scores = [VariantScore("column_2", 0.5, {1: 1.0, 8: 2.0, 32: 3.0}, None)]
    updated = updated_manifest(manifest, scores, machine="test machine")
    changed = updated.variant(2)
    assert changed.accuracy == 0.5
    assert changed.latency is not None and changed.latency.machine == "test machine"
    assert changed.calibration == manifest.variant(2).calibration
    assert updated.variant(1) == manifest.variant(1)
    assert type(updated).model_validate(updated.model_dump()) == updated


def test_eval_refuses_what_it_cannot_score(
    tiny_checkpoint: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    with pytest.raises(SystemExit):
        main([str(tiny_checkpoint), "--update-manifest"])
    with pytest.raises(SystemExit, match="differ from the model's"):
        main([str(tiny_bundle), "--dataset", "synthetic", "--limit", "5"])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nothing-here")])


def test_format_table() -> None:
    table = format_table(["name", "value"], [["a", "1.5"], ["longer", "10.25"]])
    assert table.splitlines() == ["name    value", "a         1.5", "longer  10.25"]
