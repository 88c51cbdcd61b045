"""`fractal eval PATH`: top-1 accuracy of a checkpoint (torch) or a bundle (onnxruntime).

A checkpoint (`.pt`) is scored as the whole network and as each column alone, each with
BatchNorm statistics re-estimated for its path on the training images the checkpoint
trained on (see `model.recalibrate`). A bundle (a folder with `manifest.json`) is scored
variant by variant through the same onnxruntime code the server runs, with a latency
profile; `--update-manifest` writes both back into the manifest. Both end with each column
against the one before it on the same test images (`model.significance`).
"""

from __future__ import annotations

import argparse
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from model.data import DATASETS, Split, load_split
from model.significance import compare
from model.train import (
    calibration_batches,
    checkpoint_normalization,
    dist_from_env,
    head_outputs,
    load_checkpoint,
    model_from_checkpoint,
    pick_device,
    summarize,
)
from service.bundle import (
    MANIFEST,
    BundleError,
    LatencyProfile,
    Manifest,
    load_bundle,
    read_manifest,
    write_manifest,
)
from service.runtime import (
    SessionConfig,
    available_cpus,
    create_session,
    describe_machine,
    measure_latency_ms,
    predicted_classes,
)

log = logging.getLogger("model.evaluate")

BATCH_SIZES = (1, 8, 32)
"""Batch sizes of the latency profile (as `fractal export` measures)."""


@dataclass(frozen=True)
class VariantScore:
    """One bundle variant: its measured top-1 and latency, and what the manifest says."""

    key: str
    accuracy: float
    ms_by_batch: dict[int, float]
    manifest_accuracy: float | None
    right: np.ndarray | None = None
    """Per test image, whether the variant got it right."""


@dataclass(frozen=True)
class CheckpointScores:
    heads: dict[str, dict[str, float]]
    """Loss and top-1 of the whole network ("full") and of every column ("column_K")."""
    right: dict[str, np.ndarray]
    """Per head and test image, whether it got the image right."""


def load_test_split(
    dataset: str, data_dir: str | None, image_size: int, classes: Sequence[str], limit: int | None
) -> Split:
    """The test images, refused when their classes are not the model's (in order)."""
    split = load_split(dataset, "test", data_dir, image_size).subset(limit, seed=0)
    if tuple(split.classes) != tuple(classes):
        raise ValueError(
            f"{dataset} test classes {split.classes} differ from the model's {tuple(classes)}"
        )
    return split


def evaluate_checkpoint(
    path: Path,
    dataset: str | None = None,
    data_dir: str | None = None,
    limit: int | None = None,
    device: torch.device | None = None,
    split: Literal["test", "holdout"] = "test",
) -> CheckpointScores:
    """Loss and top-1 of the whole network and of each column, as training reports them,
    on the test set or (`split="holdout"`) on the training images the checkpoint held out,
    which choosing between checkpoints can use without looking at the test set."""
    device = device or torch.device("cpu")
    ckpt = load_checkpoint(path)
    net = model_from_checkpoint(ckpt).to(device)
    size = net.config.image_size
    dataset = dataset or ckpt["dataset"]
    norm = checkpoint_normalization(ckpt)
    # Calibrate on what the network trained on: the training split minus its holdout.
    hold = ckpt.get("holdout", {"count": 0, "seed": 0})
    train = load_split(dataset, "train", data_dir, size)
    rest, held_out = train.holdout(int(hold["count"]), seed=int(hold["seed"]))
    if split == "holdout":
        if dataset != ckpt["dataset"]:
            raise ValueError(f"held-out images are the model's own ({ckpt['dataset']}) only")
        if len(held_out) == 0:
            raise ValueError(f"{path} was trained without --holdout: no held-out images")
        test = held_out.subset(limit, seed=0)
    else:
        test = load_test_split(dataset, data_dir, size, ckpt["classes"], limit)
    log.info("%s: %d %s images of %s on %s", path, len(test), split, dataset, device)
    outputs = head_outputs(net, test, norm, device, calibration_batches(rest, norm, device))
    return CheckpointScores(
        summarize(outputs, len(test)), {head: right for head, (_, right) in outputs.items()}
    )


def evaluate_bundle(
    folder: Path,
    dataset: str | None = None,
    data_dir: str | None = None,
    limit: int | None = None,
    threads: int | None = None,
    latency_repeats: int = 20,
) -> list[VariantScore]:
    """Top-1 and latency of every variant, through onnxruntime."""
    manifest = load_bundle(folder)
    test = load_test_split(
        dataset or manifest.dataset, data_dir, manifest.input.height, manifest.classes, limit
    )
    config = SessionConfig(intra_op_threads=threads or available_cpus())
    scores = []
    for v in manifest.variants:
        session = create_session(folder / v.file, config)
        right = predicted_classes(session, test.images) == test.labels
        acc = float(right.sum()) / max(len(right), 1)
        ms = measure_latency_ms(
            session, manifest.input.height, manifest.input.width, BATCH_SIZES, latency_repeats
        )
        log.info("%s: top-1 %.4f on %d images, latency %s ms", v.key, acc, len(test), ms)
        scores.append(VariantScore(v.key, acc, ms, v.accuracy, right))
    return scores


def updated_manifest(manifest: Manifest, scores: Sequence[VariantScore], machine: str) -> Manifest:
    """`manifest` with each variant's accuracy and latency replaced by `scores`."""
    by_key = {s.key: s for s in scores}
    variants = []
    for v in manifest.variants:
        score = by_key.get(v.key)
        if score is None:
            variants.append(v)
            continue
        latency = LatencyProfile(ms_by_batch=score.ms_by_batch, machine=machine)
        variants.append(
            v.model_copy(update={"accuracy": round(score.accuracy, 6), "latency": latency})
        )
    return manifest.model_copy(update={"variants": tuple(variants)})


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Text columns, the first `left` left-aligned (names), the rest right-aligned (figures)."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def checkpoint_table(results: dict[str, dict[str, float]]) -> str:
    rows = [[head, f"{r['loss']:.4f}", f"{r['accuracy']:.4f}"] for head, r in results.items()]
    return format_table(["head", "loss", "top-1"], rows)


def bundle_table(scores: Sequence[VariantScore]) -> str:
    headers = ["variant", "top-1", "manifest", *(f"ms@{n}" for n in BATCH_SIZES)]
    rows = [
        [
            s.key,
            f"{s.accuracy:.4f}",
            "-" if s.manifest_accuracy is None else f"{s.manifest_accuracy:.4f}",
            *(f"{s.ms_by_batch[n]:.3f}" for n in BATCH_SIZES),
        ]
        for s in scores
    ]
    return format_table(headers, rows)


def depth_table(right: Sequence[tuple[str, np.ndarray]]) -> str:
    """Each column against the one before it, on the same images (McNemar's exact test):
    whether accuracy rising with depth is more than chance. `right`: (name, per-image
    right/wrong) in column order."""
    headers = ["column", "against", "top-1 change", "only it right", "only the other", "p"]
    rows = []
    for (before, b), (name, r) in itertools.pairwise(right):
        paired = compare(b, r)
        p = paired.p_value
        rows.append(
            [
                name,
                before,
                f"{100 * paired.difference:+.2f} points",
                str(paired.only_second),
                str(paired.only_first),
                "<0.0001" if p < 1e-4 else f"{p:.4f}",
            ]
        )
    return format_table(headers, rows, left=2)


def fp32_columns(
    manifest: Manifest, scores: Sequence[VariantScore]
) -> list[tuple[str, np.ndarray]]:
    """The fp32 columns' per-image right/wrong, shallowest first (a manifest has one fp32
    variant per column)."""
    right = {s.key: s.right for s in scores}
    keys = [manifest.variant(k).key for k in range(1, manifest.columns + 1)]
    return [(key, r) for key in keys if (r := right.get(key)) is not None]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fractal eval", description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path, help="a checkpoint (.pt) or a bundle folder")
    p.add_argument("--dataset", choices=DATASETS, help="default: the model's own")
    p.add_argument("--data-dir", help="dataset location (as for training)")
    p.add_argument("--limit", type=int, help="evaluate on only this many test images")
    p.add_argument(
        "--split",
        choices=("test", "holdout"),
        default="test",
        help="checkpoints: the test set, or the training images held out (--holdout)",
    )
    p.add_argument(
        "--update-manifest",
        action="store_true",
        help="bundles: write the measured accuracy and latency into manifest.json",
    )
    p.add_argument("--latency-repeats", type=int, default=20, help="bundles: runs per batch size")
    p.add_argument("--threads", type=int, help="torch / onnxruntime threads (default: all CPUs)")
    p.add_argument("--device", default="auto", help="checkpoints: auto, cpu, cuda, cuda:N")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        print(run(args))
    except (BundleError, ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"fractal eval: {exc}") from exc
    return 0


def run(args: argparse.Namespace) -> str:
    """Score `args.path` and return the table to print."""
    path: Path = args.path
    if path.is_dir() and (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        if args.split != "test":
            raise ValueError("bundles are scored on the test set only (--split test)")
        if args.update_manifest and args.limit is not None:
            raise ValueError("--update-manifest needs the whole test set, not --limit")
        if args.update_manifest and args.dataset not in (None, manifest.dataset):
            raise ValueError(f"the manifest describes {manifest.dataset}, not {args.dataset}")
        scores = evaluate_bundle(
            path, args.dataset, args.data_dir, args.limit, args.threads, args.latency_repeats
        )
        text = f"{bundle_table(scores)}\n\n{depth_table(fp32_columns(manifest, scores))}"
        if not args.update_manifest:
            return text
        write_manifest(path, updated_manifest(manifest, scores, describe_machine()))
        return f"{text}\nupdated {path / MANIFEST}"
    if path.is_file():
        if args.update_manifest:
            raise ValueError("--update-manifest applies to bundles only")
        device = pick_device(args.device, dist_from_env())
        result = evaluate_checkpoint(
            path, args.dataset, args.data_dir, args.limit, device, args.split
        )
        columns = [(head, r) for head, r in result.right.items() if head != "full"]
        return f"{checkpoint_table(result.heads)}\n\n{depth_table(columns)}"
    raise FileNotFoundError(f"{path} is neither a checkpoint nor a bundle folder")


if __name__ == "__main__":
    raise SystemExit(main())
