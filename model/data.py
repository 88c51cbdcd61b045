"""Datasets as uint8 NHWC arrays: loading, caching, downloading, and batch augmentation.

Every dataset comes back as `Split(images[N,H,W,3] uint8, labels[N] int64, classes)`, the
same raw-pixel form the served ONNX models take. Sources:
- `digits`: scikit-learn's bundled 8x8 digits, upsampled (embedded; no files needed);
- `cifar10` / `cifar100`: an ImageFolder tree (`train/<class>/*.png|jpg`, `test/...`), the
  same tree packed as .tar.gz, or the standard python-pickle batches;
- `svhn`: an ImageFolder tree or the official `*_32x32.mat` files;
- `synthetic`: class-coloured noise, for tests.
Decoded trees are cached as .npz under the cache directory, keyed by path, size and mtime.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)

DATASETS = ("digits", "cifar10", "cifar100", "svhn", "synthetic")
Augment = Literal["none", "plus", "plusplus"]
"""The paper's C10 (none), C10+ (4 px translation + flip), C10++ (the same, reflect pad)."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

# Official archives and their published MD5 sums (used only with --download).
DOWNLOADS = {
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
    ),
    "svhn-train": (
        "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
        "e26dedcc434d2e4c54c9b2d4a06d8373",
    ),
    "svhn-test": (
        "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
        "eb5a983be6a315427106f1b164d9cef3",
    ),
}


@dataclass(frozen=True)
class Split:
    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def holdout(self, count: int, seed: int = 0) -> tuple[Split, Split]:
        """(rest, held out): `count` images set aside by a seeded permutation."""
        if count <= 0:
            return self, Split(self.images[:0], self.labels[:0], self.classes)
        idx = np.random.default_rng(seed + 7919).permutation(len(self))
        keep, out = np.sort(idx[count:]), np.sort(idx[:count])
        return (
            Split(self.images[keep], self.labels[keep], self.classes),
            Split(self.images[out], self.labels[out], self.classes),
        )

    def subset(self, count: int | None, seed: int = 0) -> Split:
        """A class-mixed random subset of `count` items (all of them when None)."""
        if count is None or count >= len(self):
            return self
        idx = np.random.default_rng(seed).permutation(len(self))[:count]
        return Split(self.images[idx], self.labels[idx], self.classes)


def cache_dir() -> Path:
    return Path(os.environ.get("FRACTAL_CACHE_DIR", Path.home() / ".cache" / "fractal"))


def load_split(
    dataset: str,
    split: Literal["train", "test"],
    data_dir: str | Path | None = None,
    image_size: int = 32,
    download: bool = False,
    synthetic_count: int = 512,
) -> Split:
    if dataset == "digits":
        return _digits(split, image_size)
    if dataset == "synthetic":
        return synthetic_split(synthetic_count, image_size, seed=0 if split == "train" else 1)
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    if data_dir is None:
        raise ValueError(f"dataset {dataset!r} needs --data-dir")
    root = Path(data_dir)
    if download:
        fetch(dataset, root)
    return _cached(dataset, split, root)


def synthetic_split(count: int, image_size: int, seed: int, num_classes: int = 10) -> Split:
    """Learnable noise: each class has its own mean colour and a bright quadrant."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, count)
    palette = np.random.default_rng(1234).integers(30, 225, (num_classes, 3))
    images = rng.normal(0, 25, (count, image_size, image_size, 3)) + palette[labels, None, None]
    half = image_size // 2
    for i, c in enumerate(labels):
        r, q = divmod(int(c) % 4, 2)
        images[i, r * half : (r + 1) * half, q * half : (q + 1) * half] += 40
    classes = tuple(f"class_{i}" for i in range(num_classes))
    return Split(np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64), classes)


def _digits(split: str, image_size: int) -> Split:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = (bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    cut = int(0.8 * len(labels))
    idx = order[:cut] if split == "train" else order[cut:]
    gray = torch.from_numpy(pixels[idx]).float()[:, None]
    big = F.interpolate(gray, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = big.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1)
    return Split(images.numpy().copy(), labels[idx], tuple(str(i) for i in range(10)))


def _cached(dataset: str, split: str, root: Path) -> Split:
    stat = root.stat()
    key = hashlib.sha256(f"{root.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    path = cache_dir() / f"{dataset}-{split}-{key[:16]}.npz"
    if path.exists():
        with np.load(path) as data:
            return Split(data["images"], data["labels"], tuple(str(c) for c in data["classes"]))
    loaded = _read(dataset, split, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=loaded.images, labels=loaded.labels, classes=np.array(loaded.classes))
    tmp.replace(path)
    return loaded


def _read(dataset: str, split: str, root: Path) -> Split:
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz", ".tar")):
        return _image_tree(_tar_members(root, split))
    if dataset in ("cifar10", "cifar100"):
        batches = _find_pickles(root)
        if batches is not None:
            return _cifar_pickles(batches, dataset, split)
    if dataset == "svhn" and (root / f"{split}_32x32.mat").exists():
        return _svhn_mat(root / f"{split}_32x32.mat")
    tree = root / split
    if not tree.is_dir():
        raise FileNotFoundError(f"{root}: expected {split}/<class>/<image> or the official files")
    files = sorted(p for p in tree.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return _image_tree((p.parent.name, p.read_bytes()) for p in files)


def _tar_members(archive: Path, split: str) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] != split:
                continue
            if Path(member.name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            handle = tar.extractfile(member)
            if handle is not None:
                yield parts[-2], handle.read()


def _image_tree(items: Iterable[tuple[str, bytes]]) -> Split:
    pairs = sorted(items, key=lambda item: item[0])
    if not pairs:
        raise FileNotFoundError("no images found")
    classes = tuple(sorted({label for label, _ in pairs}))
    index = {c: i for i, c in enumerate(classes)}
    images = np.stack([_decode(data) for _, data in pairs])
    labels = np.array([index[label] for label, _ in pairs], dtype=np.int64)
    return Split(images, labels, classes)


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _find_pickles(root: Path) -> Path | None:
    for candidate in (root, root / "cifar-10-batches-py", root / "cifar-100-python"):
        if (candidate / "data_batch_1").exists() or (candidate / "train").is_file():
            return candidate
    return None


def _unpickle(path: Path) -> dict[bytes, object]:
    with path.open("rb") as f:
        data: dict[bytes, object] = pickle.load(f, encoding="bytes")
        return data


def _cifar_pickles(folder: Path, dataset: str, split: str) -> Split:
    if dataset == "cifar10":
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta, label_key, names_key = "batches.meta", b"labels", b"label_names"
    else:
        names, meta, label_key, names_key = [split], "meta", b"fine_labels", b"fine_label_names"
    parts = [_unpickle(folder / n) for n in names]
    data = np.concatenate([np.asarray(p[b"data"], dtype=np.uint8) for p in parts])
    labels = np.concatenate([np.asarray(p[label_key], dtype=np.int64) for p in parts])
    label_names: Any = _unpickle(folder / meta)[names_key]
    classes = tuple(n.decode() for n in label_names)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    return Split(images, labels, classes)


def _svhn_mat(path: Path) -> Split:
    from scipy.io import loadmat

    mat = loadmat(path)
    images = np.ascontiguousarray(mat["X"].transpose(3, 0, 1, 2))
    labels = mat["y"].reshape(-1).astype(np.int64) % 10  # the files label zero as 10
    return Split(images, labels, tuple(str(i) for i in range(10)))


def fetch(dataset: str, root: Path) -> None:
    """Download and verify the official files into `root` (only when asked)."""
    keys = ["svhn-train", "svhn-test"] if dataset == "svhn" else [dataset]
    root.mkdir(parents=True, exist_ok=True)
    for key in keys:
        url, md5 = DOWNLOADS[key]
        target = root / url.rsplit("/", 1)[-1]
        if not target.exists():
            log.info("downloading %s", url)
            urllib.request.urlretrieve(url, target)
        digest = hashlib.md5(target.read_bytes()).hexdigest()
        if digest != md5:
            target.unlink()
            raise ValueError(f"{target.name}: checksum {digest} != {md5}; removed")
        if target.name.endswith(".tar.gz"):
            with tarfile.open(target) as tar:
                tar.extractall(root, filter="data")


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the 0-1 scale (what the exported graph normalises by)."""
    flat = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return flat.mean(0).tolist(), flat.std(0).tolist()


def to_tensor(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def augment_batch(x: torch.Tensor, mode: Augment, generator: torch.Generator) -> torch.Tensor:
    """Random 4 px translation and horizontal flip of a float NCHW batch."""
    if mode == "none":
        return x
    n, _, h, w = x.shape
    pad_mode = "reflect" if mode == "plusplus" else "constant"
    padded = F.pad(x, (4, 4, 4, 4), mode=pad_mode)
    offsets = torch.randint(0, 9, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        crop = padded[i, :, dy : dy + h, dx : dx + w]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out
