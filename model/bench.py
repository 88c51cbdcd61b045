"""`fractal bench-train`: training images/second with drop-path skipped, off, and masked.

Three set-ups of one network, timed in one process on the same batch:
- skip: the paper's drop-path (50% global, else local 15%); dropped paths not computed;
- off:  no drop-path (local_drop = global_ratio = 0): every path, every step;
- mask: the paper's sampling, but every path computed and the dropped ones discarded,
  the naive way to implement it (autograd still skips them on the way back).
skip and mask start from the same seed, so they draw the same plans step for step. The
set-ups take turns in short rounds, in a rotating order, so that a noisy machine slows
each of them alike; the median round is reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.config import PRESETS, FractalConfig, preset
from model.evaluate import format_table
from model.network import DropMode, FractalNet

log = logging.getLogger("model.bench")


@dataclass(frozen=True)
class Setup:
    name: str
    description: str
    drop_path: bool
    mode: DropMode


SETUPS = (
    Setup("skip", "paper drop-path, dropped paths skipped", True, "skip"),
    Setup("off", "no drop-path, every path", False, "skip"),
    Setup("mask", "paper drop-path, every path computed and masked", True, "mask"),
)
RATIOS = (("skip", "off"), ("skip", "mask"), ("mask", "off"))


def setup_config(config: FractalConfig, setup: Setup) -> FractalConfig:
    if setup.drop_path:
        return config
    return dataclasses.replace(config, local_drop=0.0, global_ratio=0.0)


def training_step(
    config: FractalConfig, setup: Setup, x: torch.Tensor, y: torch.Tensor, seed: int
) -> Callable[[], None]:
    """One SGD step of a fresh network for `setup` on the batch (x, y), as a closure."""
    torch.manual_seed(seed)
    net = FractalNet(setup_config(config, setup), seed=seed).train()
    net.drop_mode = setup.mode
    optimizer = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)

    def step() -> None:
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def timed(step: Callable[[], None], steps: int, clock: Callable[[], float]) -> float:
    """Seconds `steps` calls of `step` take."""
    start = clock()
    for _ in range(steps):
        step()
    return clock() - start


def run_rounds(
    steps: dict[str, Callable[[], None]],
    steps_per_round: int,
    rounds: int,
    images_per_step: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Images/second of each set-up per round, taking turns in a rotating order."""
    names = list(steps)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            seconds = timed(steps[name], steps_per_round, clock)
            rates[name].append(steps_per_round * images_per_step / max(seconds, 1e-12))
        log.info("round %d/%d: %s", r + 1, rounds, {n: round(v[-1], 1) for n, v in rates.items()})
    return rates


def ratios(medians: dict[str, float]) -> dict[str, float]:
    """Speed of each set-up over another's, for the pairs in RATIOS."""
    return {f"{a}/{b}": medians[a] / medians[b] for a, b in RATIOS}


def report(rates: dict[str, list[float]], setups: Sequence[Setup] = SETUPS) -> str:
    medians = {name: statistics.median(values) for name, values in rates.items()}
    rows = [
        [
            s.name,
            s.description,
            f"{medians[s.name]:.1f}",
            f"{min(rates[s.name]):.1f}",
            f"{max(rates[s.name]):.1f}",
        ]
        for s in setups
    ]
    table = format_table(["setup", "drop-path", "images/s", "min", "max"], rows, left=2)
    speedups = ", ".join(f"{k} {v:.2f}x" for k, v in ratios(medians).items())
    return f"{table}\nratios (median images/s): {speedups}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fractal bench-train", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small-c4")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--steps", type=int, default=10, help="timed steps per set-up per round")
    p.add_argument("--rounds", type=int, default=5, help="turns each set-up takes")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per set-up first")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    config = preset(args.preset)
    gen = torch.Generator().manual_seed(args.seed)
    size = config.image_size
    x = torch.randn(args.batch_size, config.in_channels, size, size, generator=gen)
    y = torch.randint(0, config.num_classes, (args.batch_size,), generator=gen)
    steps = {s.name: training_step(config, s, x, y, args.seed) for s in SETUPS}
    for step in steps.values():
        timed(step, args.warmup, time.perf_counter)
    rates = run_rounds(steps, args.steps, args.rounds, args.batch_size)
    print(
        f"preset {args.preset} ({config.channels}, C={config.columns}, {size}px), batch "
        f"{args.batch_size}, {args.steps} steps x {args.rounds} rounds, {args.threads} threads"
    )
    print(report(rates))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
