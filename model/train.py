"""Train FractalNet the paper's way: `fractal train`, `python -m model.train`, or
`torchrun --nproc-per-node N -m model.train` (DDP: gloo on CPU, nccl on GPU).

SGD (momentum 0.9, lr 0.02, batch 100), the learning rate divided by 10 each time the
number of remaining epochs halves, drop-path per mini-batch (50% global, else local 0.15).
Rank 0 logs, evaluates and writes checkpoints; every rank draws the same drop-path plan
(same seed), so DDP replicas compute the same sub-network.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.config import PRESETS, FractalConfig, preset
from model.data import DATASETS, Split, augment_batch, channel_stats, load_split, to_tensor
from model.distill import distillation_loss, teacher_logits
from model.network import FractalNet, tune_only
from model.recalibrate import recalibrate_batchnorm

log = logging.getLogger("model.train")


LR_SCHEDULES = ("paper", "constant")


def lr_at(epoch: int, total_epochs: int, base_lr: float, schedule_start: int = 0) -> float:
    """The paper's schedule: divide by 10 each time the remaining epochs halve.

    `schedule_start` restarts the schedule at that epoch (a warm restart, as in SGDR): the
    epochs from it to `total_epochs` follow the schedule of a run that long.
    """
    span = max(total_epochs - schedule_start, 1)
    remaining = max(total_epochs - epoch, 1)
    halvings = math.floor(math.log2(span / remaining) + 1e-9)
    return base_lr / 10 ** max(halvings, 0)


def scheduled_lr(
    schedule: str, epoch: int, total_epochs: int, base_lr: float, schedule_start: int = 0
) -> float:
    """The learning rate of `epoch` under `--lr-schedule`: the paper's steps (`lr_at`), or
    `base_lr` throughout (`constant`, for stochastic weight averaging)."""
    if schedule == "constant":
        return base_lr
    return lr_at(epoch, total_epochs, base_lr, schedule_start)


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    return Dist(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fractal train", description=__doc__.splitlines()[0])
    add_train_arguments(p)
    return p.parse_args(argv)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=DATASETS, default="digits")
    p.add_argument("--data-dir", help="dataset folder, .tar.gz of an ImageFolder tree, or batches")
    p.add_argument("--download", action="store_true", help="fetch the official files if absent")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny-c4")
    p.add_argument("--channels", type=lambda s: tuple(int(c) for c in s.split(",")))
    p.add_argument("--columns", type=int)
    p.add_argument("--image-size", type=int, help="input size (digits are upsampled to it)")
    p.add_argument(
        "--dropout",
        type=_rates,
        help="dropout rate per block, comma-separated (default: the paper's 0, 0.1, 0.2, ...); "
        "with --resume it replaces the checkpoint's rates (no weights change)",
    )
    p.add_argument("--local-drop", type=float)
    p.add_argument("--global-ratio", type=float)
    p.add_argument("--no-drop-path", action="store_true", help="train without drop-path")
    p.add_argument("--init", choices=("xavier", "torch"))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=100, help="global batch (split over ranks)")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default="paper",
        help="paper: divide --lr by 10 each time the remaining epochs halve; constant: "
        "--lr throughout (stochastic weight averaging, with --keep-every)",
    )
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--augment", choices=("none", "plus", "plusplus"), default="none")
    p.add_argument(
        "--holdout",
        type=int,
        default=0,
        help="training images kept out of training (export calibrates on them)",
    )
    p.add_argument("--train-limit", type=int, help="use only this many training images")
    p.add_argument("--eval-limit", type=int, help="evaluate on only this many test images")
    p.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch intra-op threads (CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--out", type=Path, default=Path("runs/train"))
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument(
        "--restart-schedule",
        action="store_true",
        help="with --resume: restart the learning-rate steps at the resumed epoch (a warm "
        "restart: the remaining epochs follow the schedule of a run that long)",
    )
    p.add_argument(
        "--tune-column",
        type=int,
        metavar="K",
        help="train column K alone, every mini-batch (a fine-tuning stage after drop-path "
        "training): the other columns and the classifier are frozen, so their answers stay "
        "as they were",
    )
    p.add_argument(
        "--distill-from",
        type=Path,
        metavar="CHECKPOINT",
        help="learn also from this trained network's answers on the training images (its "
        "tuned column, or whole network, with two views; see model.distill)",
    )
    p.add_argument(
        "--distill-weight",
        type=float,
        default=0.5,
        help="with --distill-from: the teacher's share of the loss, the labels' the rest",
    )
    p.add_argument(
        "--distill-temperature",
        type=float,
        default=4.0,
        help="with --distill-from: softmax temperature of teacher and student",
    )
    p.add_argument(
        "--keep-every",
        type=int,
        default=0,
        metavar="N",
        help="also keep the checkpoint of every N-th epoch as OUT/checkpoint-eNNNN.pt "
        "(epoch ends to average with fractal average; default 0: none)",
    )
    p.add_argument("--max-minutes", type=float, help="stop cleanly after this long")
    p.add_argument("--no-progress", action="store_true")


def _rates(text: str) -> tuple[float, ...]:
    return tuple(float(r) for r in text.split(","))


def build_config(args: argparse.Namespace, num_classes: int) -> FractalConfig:
    local, glob = args.local_drop, args.global_ratio
    if args.no_drop_path:
        local, glob = 0.0, 0.0
    return preset(
        args.preset,
        num_classes=num_classes,
        channels=args.channels,
        columns=args.columns,
        image_size=args.image_size,
        dropout=args.dropout,
        local_drop=local,
        global_ratio=glob,
        init=args.init,
    )


def pick_device(name: str, d: Dist) -> torch.device:
    if name == "auto":
        name = f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def calibration_batches(
    split: Split,
    norm: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    count: int = 2000,
    batch_size: int = 200,
) -> list[torch.Tensor]:
    """Un-augmented training images for re-estimating BatchNorm statistics."""
    sample = torch.from_numpy(split.subset(count, seed=5).images)
    return [
        to_tensor(sample[i : i + batch_size], *norm).to(device)
        for i in range(0, len(sample), batch_size)
    ]


@torch.no_grad()
def head_outputs(
    net: FractalNet,
    split: Split,
    norm: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    calibration: list[torch.Tensor],
    batch_size: int = 500,
) -> dict[str, tuple[float, np.ndarray]]:
    """Summed loss and, per image, whether the head got it right: for the whole network
    and for every column alone, each with its own BatchNorm statistics (see
    `model.recalibrate`)."""
    heads: list[int | None] = [None, *range(1, net.config.columns + 1)]
    nets = {h: recalibrate_batchnorm(net, h, calibration) for h in heads}
    losses = dict.fromkeys(heads, 0.0)
    right: dict[int | None, list[torch.Tensor]] = {h: [] for h in heads}
    images = torch.from_numpy(split.images)
    labels = torch.from_numpy(split.labels)
    for start in range(0, len(split), batch_size):
        x = to_tensor(images[start : start + batch_size], *norm).to(device)
        y = labels[start : start + batch_size].to(device)
        with autocast(device):
            for h in heads:
                logits = nets[h](x, column=h).float()
                losses[h] += F.cross_entropy(logits, y, reduction="sum").item()
                right[h].append((logits.argmax(1) == y).cpu())
    return {
        ("full" if h is None else f"column_{h}"): (
            losses[h],
            torch.cat(right[h]).numpy() if right[h] else np.zeros(0, dtype=bool),
        )
        for h in heads
    }


def summarize(
    outputs: dict[str, tuple[float, np.ndarray]], images: int
) -> dict[str, dict[str, float]]:
    """Mean loss and top-1 of every head from `head_outputs`."""
    n = max(images, 1)
    return {
        head: {"loss": loss / n, "accuracy": int(right.sum()) / n}
        for head, (loss, right) in outputs.items()
    }


def autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def kept_checkpoint_path(out: Path, epoch: int) -> Path:
    """Where `--keep-every` keeps the checkpoint written after `epoch`."""
    return out / f"checkpoint-e{epoch:04d}.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    ckpt: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], str]:
    """The checkpoint and the sha256 of its file, from one read of the file."""
    data = Path(path).read_bytes()
    ckpt: dict[str, Any] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    return ckpt, hashlib.sha256(data).hexdigest()


def checkpoint_normalization(ckpt: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel (mean, std) the checkpoint's network expects its inputs scaled by."""
    return torch.tensor(ckpt["normalization"]["mean"]), torch.tensor(ckpt["normalization"]["std"])


def model_from_checkpoint(ckpt: dict[str, Any]) -> FractalNet:
    net = FractalNet(FractalConfig.from_dict(ckpt["config"]))
    net.load_state_dict(ckpt["model"])
    net.eval()
    return net


def train(args: argparse.Namespace) -> Path:
    d = dist_from_env()
    if d.world_size > 1:
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        dist.init_process_group(backend)
    device = pick_device(args.device, d)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(
        level=logging.INFO if d.is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    torch.manual_seed(args.seed)
    out: Path = args.out
    ckpt_path = out / "checkpoint.pt"
    if args.keep_every < 0:
        raise ValueError("--keep-every must be 0 (none) or a positive number of epochs")
    resume = load_checkpoint(ckpt_path) if args.resume and ckpt_path.exists() else None
    if args.restart_schedule and resume is None:
        raise ValueError("--restart-schedule needs --resume and a checkpoint in --out")

    image_size = args.image_size or (16 if args.dataset == "digits" else 32)
    args.image_size = image_size
    train_split = load_split(args.dataset, "train", args.data_dir, image_size, args.download)
    test_split = load_split(args.dataset, "test", args.data_dir, image_size)
    train_split, _ = train_split.holdout(args.holdout, seed=args.seed)
    train_split = train_split.subset(args.train_limit, seed=args.seed)
    test_split = test_split.subset(args.eval_limit, seed=args.seed)
    if resume is not None:
        config = FractalConfig.from_dict(resume["config"])
        if args.dropout is not None:
            config = dataclasses.replace(config, dropout=args.dropout)
        mean, std = resume["normalization"]["mean"], resume["normalization"]["std"]
    else:
        config = build_config(args, len(train_split.classes))
        mean, std = channel_stats(train_split.images)
    if config.image_size != train_split.images.shape[1]:
        raise ValueError(
            f"images are {train_split.images.shape[1]} px, config says "
            f"{config.image_size}; pass --image-size"
        )
    norm = (torch.tensor(mean), torch.tensor(std))

    net = FractalNet(config, seed=args.seed).to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if args.tune_column is not None:
        log.info(
            "tuning column %d alone: %d trainable parameters",
            args.tune_column,
            tune_only(net, args.tune_column),
        )
    # Every parameter is in the optimizer, frozen or not, so a checkpoint's optimizer state
    # loads whichever stage wrote it; SGD skips a parameter without a gradient.
    optimizer = torch.optim.SGD(
        net.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    start_epoch = 0
    schedule_start = 0
    aug_gen = torch.Generator().manual_seed(args.seed * 1000 + d.rank)
    if resume is not None:
        net.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        start_epoch = int(resume["epoch"])
        schedule_start = start_epoch if args.restart_schedule else resume.get("schedule_start", 0)
        net.drop_rng.setstate(resume["drop_rng"])
        aug_gen.set_state(resume["aug_rng"][d.rank % len(resume["aug_rng"])])
        if "torch_rng" in resume:  # absent from checkpoints written before it was saved
            _set_torch_rng_state(resume["torch_rng"][d.rank % len(resume["torch_rng"])], device)
        log.info(
            "resumed from %s at epoch %d (schedule from epoch %d)",
            ckpt_path,
            start_epoch,
            schedule_start,
        )
    model: nn.Module = net
    if args.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    if d.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,  # drop-path leaves some columns unused per batch
        )
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        log.info(
            "config %s; %d parameters; %d train / %d test images on %s x%d",
            config,
            sum(p.numel() for p in net.parameters()),
            len(train_split),
            len(test_split),
            device,
            d.world_size,
        )

    per_rank = max(args.batch_size // d.world_size, 1)
    images = torch.from_numpy(train_split.images)
    labels = torch.from_numpy(train_split.labels)
    soft: torch.Tensor | None = None
    teachers = list(resume.get("teachers", [])) if resume is not None else []
    if args.distill_from:  # each stage that had a teacher, for the record
        soft, teacher_sha256 = _teacher(args, train_split, device)
        teachers.append(
            {
                "from_epoch": start_epoch,
                "sha256": teacher_sha256,
                "weight": args.distill_weight,
                "temperature": args.distill_temperature,
            }
        )
    started = time.monotonic()
    epoch = start_epoch
    for epoch in range(start_epoch, args.epochs):
        lr = scheduled_lr(args.lr_schedule, epoch, args.epochs, args.lr, schedule_start)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Same permutation on every rank; each takes its own stride of it.
        perm = torch.randperm(
            len(train_split), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch)
        )
        steps = len(perm) // (per_rank * d.world_size)
        net.train()
        loss_sum, correct, seen, t0 = 0.0, 0, 0, time.monotonic()
        bar = _progress(
            steps, f"epoch {epoch + 1}/{args.epochs}", d.is_main and not args.no_progress
        )
        for step in range(steps):
            idx = perm[(step * d.world_size + d.rank) * per_rank :][:per_rank]
            x = augment_batch(to_tensor(images[idx], *norm), args.augment, aug_gen).to(device)
            y = labels[idx].to(device)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device):
                logits = model(x, column=args.tune_column)
                if soft is None:
                    loss = F.cross_entropy(logits.float(), y)
                else:
                    loss = distillation_loss(
                        logits.float(),
                        y,
                        soft[idx].to(device),
                        args.distill_weight,
                        args.distill_temperature,
                    )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum().item())
            seen += len(y)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        if bar is not None:
            bar.close()
        elapsed = time.monotonic() - t0
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "images_per_second": seen * d.world_size / max(elapsed, 1e-9),
        }
        last = epoch + 1 == args.epochs
        if d.is_main and ((epoch + 1) % args.eval_every == 0 or last):
            calib = calibration_batches(train_split, norm, device)
            outputs = head_outputs(net, test_split, norm, device, calib)
            record["test"] = summarize(outputs, len(test_split))
        # Every rank takes part in the gathers; only rank 0 writes.
        aug_states = _gather_states(aug_gen.get_state(), d)
        torch_states = _gather_states(_torch_rng_state(device), d)
        if d.is_main:
            log.info("%s", json.dumps(record))
            with (out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            save_checkpoint(
                ckpt_path,
                {
                    "config": config.to_dict(),
                    "model": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "schedule_start": schedule_start,
                    "drop_rng": net.drop_rng.getstate(),
                    "aug_rng": aug_states,
                    "torch_rng": torch_states,
                    "normalization": {"mean": mean, "std": std},
                    "classes": list(train_split.classes),
                    "dataset": args.dataset,
                    "holdout": {"count": args.holdout, "seed": args.seed},
                    "teachers": teachers,
                    "args": {
                        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    },
                },
            )
            if args.keep_every and (epoch + 1) % args.keep_every == 0:
                shutil.copyfile(ckpt_path, kept_checkpoint_path(out, epoch + 1))
        if d.world_size > 1:
            dist.barrier()
        if args.max_minutes and time.monotonic() - started > args.max_minutes * 60:
            log.info("stopping after %.1f minutes at epoch %d", args.max_minutes, epoch + 1)
            break
    if d.is_main:
        plot_metrics(out / "metrics.jsonl", out / "metrics.png")
    if d.world_size > 1:
        dist.destroy_process_group()
    return ckpt_path


def _teacher(
    args: argparse.Namespace, split: Split, device: torch.device
) -> tuple[torch.Tensor, str]:
    """The logits of `--distill-from` for every training image (see `model.distill`), and
    the sha256 of the teacher's file."""
    if not 0 <= args.distill_weight <= 1 or args.distill_temperature <= 0:
        raise ValueError("--distill-weight must lie in [0, 1] and --distill-temperature be > 0")
    ckpt, sha256 = read_checkpoint(args.distill_from)
    if list(ckpt["classes"]) != list(split.classes):
        raise ValueError(f"{args.distill_from}: its classes are not the training data's")
    norm = checkpoint_normalization(ckpt)
    started = time.monotonic()
    with torch.random.fork_rng(devices=[]):  # building the teacher draws initial weights
        logits = teacher_logits(
            model_from_checkpoint(ckpt),
            args.tune_column,
            torch.from_numpy(split.images),
            norm,
            calibration_batches(split, norm, device),
            device,
        )
    log.info(
        "teacher %s: %.1f%% of %d training images right, in %.0f s",
        args.distill_from,
        100 * float((logits.argmax(1) == torch.from_numpy(split.labels)).float().mean()),
        len(split),
        time.monotonic() - started,
    )
    return logits, sha256


def _torch_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The global generators dropout draws from: saved so a resumed run draws the same
    masks as an uninterrupted one."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_torch_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _gather_states(state: Any, d: Dist) -> list[Any]:
    """`state` from every rank, in rank order (a one-item list without DDP)."""
    if d.world_size == 1:
        return [state]
    states: list[Any] = [None] * d.world_size
    dist.all_gather_object(states, state)
    return states


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    """Loss and accuracy per epoch: training, and every column on the test set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [r["epoch"] for r in rows]
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="train (drop-path)")
    ax_acc.plot(epochs, [r["train_accuracy"] for r in rows], label="train (drop-path)")
    evaluated = [r for r in rows if "test" in r]
    names = list(evaluated[0]["test"]) if evaluated else []
    for name in names:
        xs = [r["epoch"] for r in evaluated]
        ax_loss.plot(xs, [r["test"][name]["loss"] for r in evaluated], label=f"test {name}")
        ax_acc.plot(xs, [r["test"][name]["accuracy"] for r in evaluated], label=f"test {name}")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1", title="accuracy")
    ax_acc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    random.seed(args.seed)
    train(args)


if __name__ == "__main__":
    main()
