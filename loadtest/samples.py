"""Labelled images to send: the small CIFAR-10 sample shipped in the package, or the user's.

Sources:
- the default: `loadtest/samples/` (20 CIFAR-10 test images per class, `labels.csv`);
- a folder with `labels.csv` (`file,label` rows, paths relative to the folder);
- an ImageFolder tree, `test/<class>/*.jpg` (or `<class>/*.jpg` directly);
- the same tree packed as `.tar.gz` / `.tgz` / `.tar` (its `test/` members).

Images are sent as they are stored (no decoding here): the server resizes them.
"""

from __future__ import annotations

import csv
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

SHIPPED = Path(__file__).resolve().parent / "samples"
LABELS_FILE = "labels.csv"
CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".gif": "image/gif",
}


@dataclass(frozen=True)
class Sample:
    name: str
    label: str
    data: bytes
    content_type: str


def content_type(name: str) -> str | None:
    return CONTENT_TYPES.get(PurePosixPath(name).suffix.lower())


def _from_labels(root: Path) -> list[Sample]:
    samples = []
    with (root / LABELS_FILE).open(newline="") as f:
        for row in csv.DictReader(f):
            kind = content_type(row["file"])
            if kind is None:
                raise ValueError(f"{root / LABELS_FILE}: unsupported image type {row['file']!r}")
            data = (root / row["file"]).read_bytes()
            samples.append(Sample(row["file"], row["label"], data, kind))
    return samples


def _tree_root(root: Path) -> Path:
    return root / "test" if (root / "test").is_dir() else root


def _from_tree(root: Path) -> list[Sample]:
    base = _tree_root(root)
    samples = []
    for folder in sorted(p for p in base.iterdir() if p.is_dir()):
        for path in sorted(folder.iterdir()):
            kind = content_type(path.name)
            if kind is not None and path.is_file():
                name = str(path.relative_to(root))
                samples.append(Sample(name, folder.name, path.read_bytes(), kind))
    return samples


def _from_archive(path: Path) -> list[Sample]:
    samples = []
    with tarfile.open(path) as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if parts and parts[0] == ".":
                parts = parts[1:]
            kind = content_type(member.name)
            if not member.isfile() or kind is None or len(parts) != 3 or parts[0] != "test":
                continue
            f = tar.extractfile(member)
            if f is not None:
                samples.append(Sample("/".join(parts), parts[1], f.read(), kind))
    return samples


def load_samples(source: str | Path | None = None) -> list[Sample]:
    """Labelled images from `source` (default: the shipped sample), sorted by name."""
    root = SHIPPED if source is None else Path(source)
    if root.is_file():
        samples = _from_archive(root)
    elif (root / LABELS_FILE).is_file():
        samples = _from_labels(root)
    elif root.is_dir():
        samples = _from_tree(root)
    else:
        raise FileNotFoundError(f"{root}: no such image folder or archive")
    if not samples:
        raise ValueError(f"{root}: no labelled images found (expected test/<class>/*.jpg)")
    return sorted(samples, key=lambda s: s.name)
