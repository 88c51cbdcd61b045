"""The exported bundle: parity, manifest schema, hashes, refusal of broken bundles, int8."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import FractalConfig
from model.data import load_split
from model.export import column_macs, expected_calibration_error, fit_temperature
from service.bundle import (
    MANIFEST,
    BundleError,
    Manifest,
    load_bundle,
    read_manifest,
    sha256_file,
    write_manifest,
)
from service.runtime import SessionConfig, create_session, run_probabilities


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the session bundle, for tests that break it."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def test_every_column_matches_torch(tiny_bundle: Path) -> None:
    manifest = load_bundle(tiny_bundle)
    fp32 = [v for v in manifest.variants if v.precision == "fp32"]
    assert [v.column for v in fp32] == list(range(1, manifest.columns + 1))
    for v in fp32:
        assert v.max_abs_diff is not None and v.max_abs_diff < 1e-4, v.key
        assert v.depth == len(manifest.training.config["channels"]) * 2 ** (v.column - 1)
        assert v.accuracy is not None and v.latency is not None
        assert set(v.latency.ms_by_batch) == {1, 8, 32}


def test_manifest_round_trip(tiny_bundle: Path, tmp_path: Path) -> None:
    manifest = read_manifest(tiny_bundle)
    again = Manifest.model_validate(json.loads(manifest.model_dump_json()))
    assert again == manifest
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    config = FractalConfig.from_dict(manifest.training.config)
    assert config.columns == manifest.columns
    assert config.image_size == manifest.input.height == manifest.input.width


def test_hashes_match_the_files(tiny_bundle: Path) -> None:
    manifest = read_manifest(tiny_bundle)
    for v in manifest.variants:
        assert sha256_file(tiny_bundle / v.file) == v.sha256
    assert sorted(p.name for p in tiny_bundle.glob("*.onnx")) == sorted(
        v.file for v in manifest.variants
    )


def test_a_missing_file_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "column_2.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(bundle_copy)


def test_a_wrong_hash_is_refused(bundle_copy: Path) -> None:
    path = bundle_copy / "column_1.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(bundle_copy)
    assert load_bundle(bundle_copy, verify_hashes=False).columns >= 1


def test_an_inconsistent_manifest_is_refused(bundle_copy: Path) -> None:
    data = json.loads((bundle_copy / MANIFEST).read_text())
    data["variants"] = [v for v in data["variants"] if v["column"] != 1]
    (bundle_copy / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="invalid manifest"):
        load_bundle(bundle_copy)


def logits(session: object, images: np.ndarray) -> np.ndarray:
    return np.asarray(session.run(["logits"], {"images": images})[0])  # type: ignore[attr-defined]


def test_int8_agrees_with_fp32(tiny_bundle: Path) -> None:
    manifest = load_bundle(tiny_bundle)
    images = load_split(manifest.dataset, "test", image_size=manifest.input.height).images
    config = SessionConfig(intra_op_threads=1)
    int8 = [v for v in manifest.variants if v.precision == "int8"]
    assert [v.column for v in int8] == list(range(1, manifest.columns + 1))
    for v in int8:
        quantized = create_session(tiny_bundle / v.file, config)
        reference = create_session(tiny_bundle / manifest.variant(v.column, "fp32").file, config)
        ref, out = logits(reference, images), logits(quantized, images)
        agree = float((out.argmax(1) == ref.argmax(1)).mean())
        assert agree > 0.8, f"{v.key}: same top-1 on only {agree:.0%} of the test images"
        # Independent of how close the tiny model's classes are: the logits stay close.
        # (Saturating int8 kernels once moved them by over a third of their spread.)
        error = float(np.abs(out - ref).mean() / ref.std())
        assert error < 0.1, f"{v.key}: int8 logits off by {error:.0%} of their spread"
        assert np.allclose(run_probabilities(quantized, images).sum(1), 1.0, atol=1e-4)


def test_column_macs() -> None:
    config = FractalConfig(channels=(4, 8), columns=2, image_size=4, in_channels=3)
    # Column 2: block 1 at 4x4 (3->4, 4->4), block 2 at 2x2 (4->8, 8->8), then 8x10.
    expected = 16 * 9 * (3 * 4 + 4 * 4) + 4 * 9 * (4 * 8 + 8 * 8) + 8 * 10
    assert column_macs(config, 2) == expected


def test_expected_calibration_error() -> None:
    labels = np.array([0, 1, 0, 1])
    confident_right = np.eye(2)[labels]
    assert expected_calibration_error(confident_right, labels) == 0.0
    confident_wrong = np.eye(2)[1 - labels]
    assert expected_calibration_error(confident_wrong, labels) == pytest.approx(1.0)


def test_fit_temperature_undoes_a_known_scaling() -> None:
    gen = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 5, generator=gen) * 2
    labels = torch.multinomial(true_logits.softmax(1), 1, generator=gen).squeeze(1)
    assert fit_temperature(true_logits * 3.0, labels) == pytest.approx(3.0, rel=0.1)


def test_two_view_variants_average_the_mirror_images_logits(flip_bundle: Path) -> None:
    manifest = load_bundle(flip_bundle)
    assert sorted(v.key for v in manifest.variants) == sorted(
        key for k in range(1, manifest.columns + 1) for key in (f"column_{k}", f"column_{k}_flip")
    )
    images = load_split(manifest.dataset, "test", image_size=manifest.input.height).images[:64]
    mirrored = images[:, :, ::-1, :].copy()
    config = SessionConfig(intra_op_threads=1)
    for k in range(1, manifest.columns + 1):
        two = manifest.variant(k, views=2)
        assert (two.views, two.precision, two.file) == (2, "fp32", f"column_{k}_flip.onnx")
        assert two.max_abs_diff is not None and two.max_abs_diff < 1e-4
        assert two.macs == 2 * manifest.variant(k).macs  # both views
        one = create_session(flip_bundle / manifest.variant(k).file, config)
        both = create_session(flip_bundle / two.file, config)
        expected = (logits(one, images) + logits(one, mirrored)) / 2
        np.testing.assert_allclose(logits(both, images), expected, atol=1e-4)
        # A mirror image gets the same answer.
        np.testing.assert_allclose(
            run_probabilities(both, images), run_probabilities(both, mirrored), atol=1e-5
        )


def test_a_manifest_needs_a_single_view_fp32_variant_per_column(flip_bundle: Path) -> None:
    manifest = read_manifest(flip_bundle)
    data = json.loads(manifest.model_dump_json())
    data["variants"] = [v for v in data["variants"] if v["column"] != 2 or v["views"] == 2]
    with pytest.raises(ValueError, match="single-view fp32 variant per column"):
        Manifest.model_validate(data)
