"""The model bundle: `manifest.json` plus one ONNX file per (column, precision, views) variant.

This schema is the contract between the exporter (`model.export`, which imports it) and
the server. `load_bundle` refuses a bundle whose files are missing or whose hashes differ.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

Precision = Literal["fp32", "int8"]
Views = Literal[1, 2]
"""Test-time views a variant averages: 1 (the image), or 2 (the image and its mirror)."""


def variant_key(column: int, precision: str = "fp32", views: int = 1) -> str:
    """`column_4`, `column_4_int8`, `column_4_flip`, `column_4_int8_flip`."""
    return (
        f"column_{column}"
        + ("" if precision == "fp32" else f"_{precision}")
        + ("" if views == 1 else "_flip")
    )


class BundleError(Exception):
    """A bundle that cannot be served, with the reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class InputSpec(_Strict):
    name: str = "images"
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: Literal[3] = 3
    dtype: Literal["uint8"] = "uint8"
    layout: Literal["NHWC"] = "NHWC"


class Normalization(_Strict):
    """Per-channel mean and std on the 0-1 scale, applied inside every graph."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class LatencyProfile(_Strict):
    """Median milliseconds per batch size, on the machine described."""

    ms_by_batch: dict[int, float]
    machine: str


class Calibration(_Strict):
    temperature: float = Field(gt=0)
    ece_before: float = Field(ge=0, le=1)
    ece_after: float = Field(ge=0, le=1)
    images: int = Field(ge=0, description="held-out training images the fit used")


class Variant(_Strict):
    column: int = Field(ge=1)
    precision: Precision = "fp32"
    views: Views = Field(
        default=1,
        description="2: the graph averages the logits of the image and of its mirror image "
        "(twice the cost of one view)",
    )
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    depth: int = Field(ge=1, description="conv layers on this column's path")
    parameters: int = Field(ge=1)
    macs: int = Field(ge=1, description="multiply-accumulates per image")
    accuracy: float | None = Field(default=None, ge=0, le=1, description="test-set top-1")
    calibration: Calibration
    latency: LatencyProfile | None = None
    max_abs_diff: float | None = Field(
        default=None, description="export check: max |onnx - torch| of probabilities"
    )

    @property
    def key(self) -> str:
        return variant_key(self.column, self.precision, self.views)


class Training(_Strict):
    config: dict[str, Any]
    dataset: str
    epochs: int
    augmentation: str
    date: str
    checkpoint_sha256: str
    seed: int | None = None
    command: str | None = None


class Manifest(_Strict):
    format_version: Literal[1] = 1
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str
    description: str = ""
    dataset: str
    classes: tuple[str, ...]
    input: InputSpec
    outputs: tuple[str, ...] = ("probabilities", "logits")
    normalization: Normalization
    columns: int = Field(ge=1)
    training: Training
    variants: tuple[Variant, ...]

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        fp32 = sorted(v.column for v in self.variants if v.key == variant_key(v.column))
        if fp32 != list(range(1, self.columns + 1)):
            raise ValueError(
                f"need one single-view fp32 variant per column 1..{self.columns}, got {fp32}"
            )
        keys = [v.key for v in self.variants]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate (column, precision, views) variants")
        if any(v.column > self.columns for v in self.variants):
            raise ValueError("a variant names a column beyond `columns`")
        return self

    def variant(self, column: int, precision: Precision = "fp32", views: Views = 1) -> Variant:
        key = variant_key(column, precision, views)
        for v in self.variants:
            if v.key == key:
                return v
        raise KeyError(f"no variant {key}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(folder: str | Path) -> Manifest:
    path = Path(folder) / MANIFEST
    try:
        return Manifest.model_validate(json.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise BundleError(f"{path}: no manifest") from exc
    except (json.JSONDecodeError, ValidationError) as exc:
        raise BundleError(f"{path}: invalid manifest: {exc}") from exc


def write_manifest(folder: str | Path, manifest: Manifest) -> None:
    path = Path(folder) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
    tmp.replace(path)


def load_bundle(folder: str | Path, verify_hashes: bool = True) -> Manifest:
    """The manifest, after checking every variant file exists and matches its hash."""
    root = Path(folder)
    manifest = read_manifest(root)
    for v in manifest.variants:
        path = root / v.file
        if Path(v.file).name != v.file:
            raise BundleError(f"{v.file}: variant files must sit beside the manifest")
        if not path.is_file():
            raise BundleError(f"{root}: missing file {v.file} ({v.key})")
        if verify_hashes and sha256_file(path) != v.sha256:
            raise BundleError(f"{root}: {v.file} does not match its sha256 in the manifest")
    return manifest
