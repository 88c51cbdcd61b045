"""`fractal export CHECKPOINT --out models/NAME`: one ONNX model per column, and a manifest.

Each column graph takes raw pixels (`images`, uint8 NHWC, dynamic batch), does the
preprocessing itself (cast, scale, per-channel normalisation, NCHW), runs the column,
divides the logits by the column's fitted temperature and outputs `probabilities`
(softmax) and `logits` (uncalibrated). Every graph is checked with `onnx.checker` and
against PyTorch on real images before the manifest names it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.config import FractalConfig
from model.data import DATASETS, Split, load_split
from model.network import FractalNet, column_parameters
from model.recalibrate import recalibrate_batchnorm
from model.train import (
    calibration_batches,
    checkpoint_normalization,
    model_from_checkpoint,
    read_checkpoint,
)
from model.views import batched_logits, viewed_logits
from service.bundle import (
    Calibration,
    InputSpec,
    LatencyProfile,
    Manifest,
    Normalization,
    Training,
    Variant,
    sha256_file,
    variant_key,
    write_manifest,
)
from service.runtime import (
    SessionConfig,
    accuracy,
    available_cpus,
    create_session,
    describe_machine,
    measure_latency_ms,
    run_probabilities,
)

log = logging.getLogger("model.export")

PARITY_BOUND = 1e-4
"""Largest |onnxruntime - torch| probability difference an fp32 export may show."""


class ServingColumn(nn.Module):
    """uint8 NHWC pixels -> (calibrated probabilities, logits) for one column."""

    def __init__(
        self,
        net: FractalNet,
        column: int,
        mean: list[float],
        std: list[float],
        temperature: float,
        views: int = 1,
    ) -> None:
        super().__init__()
        self.net = net
        self.column = column
        self.views = views
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(std).view(1, 3, 1, 1) * 255.0))
        self.register_buffer("inv_temperature", torch.tensor(1.0 / temperature))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, inv_std = self.get_buffer("mean"), self.get_buffer("inv_std")
        x = (images.permute(0, 3, 1, 2).float() - mean) * inv_std
        logits = viewed_logits(self.net, x, self.column, self.views)
        return torch.softmax(logits * self.get_buffer("inv_temperature"), dim=1), logits


def column_macs(config: FractalConfig, column: int) -> int:
    """Multiply-accumulates per image of `column` (convolutions and the classifier)."""
    size, cin, total = config.image_size, config.in_channels, 0
    for cout in config.channels:
        for j in range(2 ** (column - 1)):
            total += size * size * 9 * (cin if j == 0 else cout) * cout
        cin, size = cout, size // 2
    return total + config.channels[-1] * config.num_classes


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al., 2017)."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising held-out NLL (LBFGS on log T)."""
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.exp().clamp(0.05, 20.0).item())


def export_onnx(module: ServingColumn, path: Path, size: int) -> None:
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=["images"],
        output_names=["probabilities", "logits"],
        dynamic_axes={
            "images": {0: "batch"},
            "probabilities": {0: "batch"},
            "logits": {0: "batch"},
        },
        opset_version=17,
        dynamo=False,
    )
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray) -> None:
    """Static QDQ int8 (per-channel 7-bit weights), calibrated on training images.

    Weights use 7 bits (`reduce_range`): on x86 CPUs without VNNI, onnxruntime's u8 x s8
    kernels add pairs of products in 16 bits, which saturate with full-range weights. On an
    AVX2-only machine, full-range weights moved the tiny test model's logits by 35-41% of
    their spread; 7-bit weights by 3-4%."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.array_split(calibration, max(len(calibration) // 32, 1)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    prepped = int8_path.with_suffix(".prep.onnx")
    quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=True)
    quantize_static(
        str(prepped),
        str(int8_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=True,
        op_types_to_quantize=["Conv", "Gemm", "MatMul"],
    )
    prepped.unlink()


def export_bundle(
    checkpoint: Path,
    out: Path,
    name: str,
    version: str,
    data_dir: str | None = None,
    dataset: str | None = None,
    int8: bool = False,
    flip: bool = False,
    test_limit: int | None = None,
    calibration_limit: int = 5000,
    latency_repeats: int = 20,
    description: str = "",
    command: str | None = None,
) -> Manifest:
    ckpt, checkpoint_sha256 = read_checkpoint(checkpoint)
    net = model_from_checkpoint(ckpt)
    config = net.config
    dataset = dataset or ckpt["dataset"]
    norm_cfg = ckpt["normalization"]
    norm = checkpoint_normalization(ckpt)
    size = config.image_size
    train = load_split(dataset, "train", data_dir, size)
    hold = ckpt.get("holdout", {"count": 0, "seed": 0})
    rest, held_out = train.holdout(int(hold["count"]), seed=int(hold["seed"]))
    if len(held_out) == 0:
        log.warning("checkpoint kept no held-out images; calibrating on training images")
        held_out = train
    held_out = held_out.subset(calibration_limit, seed=1)
    test = load_split(dataset, "test", data_dir, size).subset(test_limit, seed=0)
    out.mkdir(parents=True, exist_ok=True)

    bn_batches = calibration_batches(rest, norm, torch.device("cpu"))
    ctx = _Context(
        out=out,
        session=SessionConfig(intra_op_threads=available_cpus()),
        held_out=held_out,
        test=test,
        norm=norm,
        size=size,
        machine=describe_machine(),
        latency_repeats=latency_repeats,
        int8_images=train.subset(512, seed=2).images if int8 else None,
    )
    variants: list[Variant] = []
    for column in range(1, config.columns + 1):
        column_net = recalibrate_batchnorm(net, column, bn_batches)
        common = {
            "column": column,
            "depth": config.column_depth(column),
            "parameters": column_parameters(net, column),
            "macs": column_macs(config, column),
        }
        for views in (1, 2) if flip else (1,):
            variants += _export_column(column_net, column, views, common, ctx)

    args = ckpt.get("args", {})
    manifest = Manifest(
        name=name,
        version=version,
        description=description,
        dataset=dataset,
        classes=tuple(ckpt["classes"]),
        input=InputSpec(height=size, width=size),
        normalization=Normalization(mean=tuple(norm_cfg["mean"]), std=tuple(norm_cfg["std"])),
        columns=config.columns,
        training=Training(
            config=config.to_dict(),
            dataset=ckpt["dataset"],
            epochs=int(ckpt["epoch"]),
            augmentation=str(args.get("augment", "unknown")),
            date=dt.datetime.fromtimestamp(checkpoint.stat().st_mtime, dt.UTC).isoformat(
                timespec="seconds"
            ),
            checkpoint_sha256=checkpoint_sha256,
            seed=args.get("seed"),
            command=command,
        ),
        variants=tuple(variants),
    )
    write_manifest(out, manifest)
    return manifest


@dataclass(frozen=True)
class _Context:
    """What exporting every variant shares."""

    out: Path
    session: SessionConfig
    held_out: Split
    test: Split
    norm: tuple[torch.Tensor, torch.Tensor]
    size: int
    machine: str
    latency_repeats: int
    int8_images: np.ndarray | None


def _export_column(
    column_net: FractalNet, column: int, views: int, common: dict[str, Any], ctx: _Context
) -> list[Variant]:
    """The column's fp32 variant with `views` views (temperature fitted, exported, checked
    against torch, measured), and its int8 variant when asked for."""
    held = torch.from_numpy(ctx.held_out.images)
    held_logits = batched_logits(column_net, column, held, ctx.norm, views)
    labels = ctx.held_out.labels
    temperature = fit_temperature(held_logits, torch.from_numpy(labels))
    scaled = (held_logits / temperature).softmax(1).numpy()
    calib = Calibration(
        temperature=round(temperature, 6),
        ece_before=expected_calibration_error(held_logits.softmax(1).numpy(), labels),
        ece_after=expected_calibration_error(scaled, labels),
        images=len(ctx.held_out),
    )
    mean, std = (t.tolist() for t in ctx.norm)
    module = ServingColumn(column_net, column, mean, std, temperature, views).eval()
    fields = common | {"views": views, "calibration": calib, "macs": common["macs"] * views}
    key = variant_key(column, "fp32", views)
    path = ctx.out / f"{key}.onnx"
    export_onnx(module, path, ctx.size)
    session = create_session(path, ctx.session)
    check = ctx.test.images[:64]
    with torch.no_grad():
        expected = module(torch.from_numpy(check))[0].numpy()
    diff = float(np.abs(run_probabilities(session, check) - expected).max())
    log.info(
        "%s: T=%.3f ECE %.4f -> %.4f, max |onnx - torch| = %.2e",
        key,
        temperature,
        calib.ece_before,
        calib.ece_after,
        diff,
    )
    if diff > PARITY_BOUND:
        raise RuntimeError(f"{key}: ONNX differs from torch by {diff:.2e}")
    variants = [_measured(path, session, ctx, fields | {"precision": "fp32", "max_abs_diff": diff})]
    if ctx.int8_images is not None:
        q_path = ctx.out / f"{variant_key(column, 'int8', views)}.onnx"
        quantize_int8(path, q_path, ctx.int8_images)
        q_session = create_session(q_path, ctx.session)
        q_diff = float(np.abs(run_probabilities(q_session, check) - expected).max())
        q_fields = fields | {"precision": "int8", "max_abs_diff": q_diff}
        variants.append(_measured(q_path, q_session, ctx, q_fields))
    return variants


def _measured(path: Path, session: object, ctx: _Context, fields: dict[str, Any]) -> Variant:
    acc = accuracy(session, ctx.test.images, ctx.test.labels)
    latency = measure_latency_ms(session, ctx.size, ctx.size, repeats=ctx.latency_repeats)
    log.info("%s: top-1 %.4f, latency %s ms", path.name, acc, latency)
    return Variant(
        file=path.name,
        sha256=sha256_file(path),
        accuracy=round(acc, 6),
        latency=LatencyProfile(ms_by_batch=latency, machine=ctx.machine),
        **fields,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fractal export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, required=True, help="bundle folder, e.g. models/cifar10")
    p.add_argument("--name", help="model name (default: the folder's name)")
    p.add_argument("--version", default=dt.date.today().isoformat())
    p.add_argument("--description", default="")
    p.add_argument("--dataset", choices=DATASETS, help="default: the checkpoint's")
    p.add_argument("--data-dir", help="dataset location (as for training)")
    p.add_argument("--int8", action="store_true", help="also write static int8 variants")
    p.add_argument(
        "--flip",
        action="store_true",
        help="also write two-view variants (the image and its mirror, logits averaged)",
    )
    p.add_argument("--test-limit", type=int, help="evaluate on only this many test images")
    p.add_argument("--latency-repeats", type=int, default=20)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    manifest = export_bundle(
        args.checkpoint,
        args.out,
        args.name or args.out.name,
        args.version,
        data_dir=args.data_dir,
        dataset=args.dataset,
        int8=args.int8,
        flip=args.flip,
        test_limit=args.test_limit,
        latency_repeats=args.latency_repeats,
        description=args.description,
        command=shlex.join(["fractal", "export", *(sys.argv[1:] if argv is None else argv)]),
    )
    for v in manifest.variants:
        print(
            f"{v.file:24s} top-1 {v.accuracy:.4f}  T={v.calibration.temperature:.3f}  "
            f"ECE {v.calibration.ece_before:.4f}->{v.calibration.ece_after:.4f}"
        )


if __name__ == "__main__":
    main()
