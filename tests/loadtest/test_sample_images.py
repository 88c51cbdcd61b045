"""Labelled images: the shipped CIFAR-10 sample, ImageFolder trees and archives."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from loadtest.samples import SHIPPED, load_samples

CIFAR10 = {
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
}  # fmt: skip


def test_shipped_sample_is_20_jpegs_per_cifar10_class() -> None:
    samples = load_samples()
    assert Counter(s.label for s in samples) == {c: 20 for c in CIFAR10}
    assert all(s.content_type == "image/jpeg" and s.data[:2] == b"\xff\xd8" for s in samples)
    image = Image.open(io.BytesIO(samples[0].data))
    assert image.size == (32, 32)


def test_shipped_labels_agree_with_the_tree() -> None:
    from_labels = [(s.label, s.data) for s in load_samples(SHIPPED)]
    assert from_labels == [(s.label, s.data) for s in load_samples(SHIPPED / "test")]


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_image_folder_tree_and_archive(tmp_path: Path) -> None:
    tree = tmp_path / "data"
    for label in ("cat", "dog"):
        (tree / "test" / label).mkdir(parents=True)
        for i in range(2):
            (tree / "test" / label / f"{i}.jpg").write_bytes(_jpeg())
    (tree / "test" / "cat" / "notes.txt").write_text("not an image")
    (tree / "train" / "cat").mkdir(parents=True)
    (tree / "train" / "cat" / "9.jpg").write_bytes(_jpeg())

    from_tree = load_samples(tree)
    assert [(s.name, s.label) for s in from_tree] == [
        ("test/cat/0.jpg", "cat"), ("test/cat/1.jpg", "cat"),
        ("test/dog/0.jpg", "dog"), ("test/dog/1.jpg", "dog"),
    ]  # fmt: skip

    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname=".")
    assert load_samples(archive) == from_tree


def test_missing_or_empty_sources(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_samples(tmp_path / "nope")
    with pytest.raises(ValueError):
        load_samples(tmp_path)
