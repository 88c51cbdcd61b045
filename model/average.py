"""`fractal average CHECKPOINT... --out PATH`: the mean of several checkpoints' weights.

Stochastic weight averaging (Izmailov et al. 2018, "Averaging Weights Leads to Wider
Optima and Better Generalization"): the ends of several learning-rate cycles lie around a
wide minimum, and their mean often sits nearer its centre than any of them. The warm
restarts of this project's schedule (`fractal train --restart-schedule`) produce exactly
such ends, one per stage.

Every floating-point tensor of the weights (BatchNorm's running statistics included) is
averaged; integer buffers (BatchNorm's batch counters) come from the last checkpoint.
BatchNorm statistics need no special care here: `fractal eval` and `fractal export`
re-estimate them for every column (`model.recalibrate`). Everything else in the result
(config, optimizer state, epoch, random generators, arguments) is the last checkpoint's,
so `fractal train --resume` continues from the average as it would from that checkpoint;
`averaged_from` records every input (sha256, epoch, file name) in order.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model.train import read_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


def average_state_dicts(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of `states`' floating-point tensors; other tensors from the
    last. All must have the same keys, shapes and dtypes."""
    if not states:
        raise ValueError("nothing to average")
    last = states[-1]
    for i, state in enumerate(states[:-1]):
        if state.keys() != last.keys():
            raise ValueError(f"checkpoint {i + 1} has other weights than the last one")
        for key, tensor in state.items():
            if tensor.shape != last[key].shape or tensor.dtype != last[key].dtype:
                raise ValueError(f"checkpoint {i + 1}: {key} differs in shape or dtype")
    return {
        key: torch.stack([s[key] for s in states]).mean(0) if value.is_floating_point() else value
        for key, value in last.items()
    }


def average_checkpoints(paths: Sequence[Path], out: Path) -> dict[str, Any]:
    """Write to `out` the last of `paths` with its weights replaced by the mean of all;
    return what was written."""
    if len(paths) < 2:
        raise ValueError("give at least two checkpoints to average")
    ckpts, hashes = zip(*(read_checkpoint(p) for p in paths), strict=True)
    last = ckpts[-1]
    for path, ckpt in zip(paths, ckpts, strict=True):
        if ckpt["config"] != last["config"] or ckpt["classes"] != last["classes"]:
            raise ValueError(f"{path}: another network or class list than {paths[-1]}")
    result = dict(last)
    result["model"] = average_state_dicts([c["model"] for c in ckpts])
    result["averaged_from"] = [
        {"file": p.name, "sha256": sha256, "epoch": int(c["epoch"])}
        for p, c, sha256 in zip(paths, ckpts, hashes, strict=True)
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, result)
    epochs = [int(c["epoch"]) for c in ckpts]
    log.info("averaged %d checkpoints (epochs %s) into %s", len(paths), epochs, out)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fractal average", description=__doc__.splitlines()[0])
    p.add_argument(
        "checkpoints",
        nargs="+",
        type=Path,
        help="two or more; the result keeps the last one's config, optimizer state and epoch",
    )
    p.add_argument("--out", type=Path, required=True, help="where to write the average")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        average_checkpoints(args.checkpoints, args.out)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"fractal average: {exc}") from exc
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
