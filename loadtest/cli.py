"""`fractal loadtest`: open-loop load test of a running server (docs/loadtest.md).

    fractal loadtest --url http://127.0.0.1:8000 --rate 50 --duration 30 \\
        --deadline mixture:0.7*fixed:20,0.3*uniform:50:200 --out results/
    fractal loadtest --url ... --rate 20 --duration 10 --sweep --deadlines 5,10,20,40,80
    fractal loadtest --url ... --ceiling --rate 200
    fractal loadtest --url ... --target --rate 50 --duration 10
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import httpx

from loadtest.affinity import parse_cpu_list, pinned
from loadtest.ceiling import format_ceiling, run_ceiling
from loadtest.deadlines import parse_deadline
from loadtest.generator import Target, build_plan
from loadtest.report import format_table, summarize, write_csv, write_json
from loadtest.samples import Sample, load_samples
from loadtest.stalls import run_probed
from loadtest.sweep import format_sweep, parse_grid, run_sweep
from loadtest.target import SATURATION_STEPS, TargetRun, format_target, run_target
from service.protocol import LIVE_PATH, MODELS_PATH, column_count, model_classes

log = logging.getLogger("loadtest")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fractal loadtest",
        description="Open-loop load test: Poisson arrivals at a fixed rate, deadline hit "
        "rate and accuracy of the answers.",
    )
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--rate", type=float, default=10.0, help="offered requests per second")
    p.add_argument(
        "--duration",
        type=float,
        default=10.0,
        help="seconds of arrivals (per point with --sweep, per step with --ceiling)",
    )
    p.add_argument(
        "--deadline",
        default="uniform:10:80",
        help="deadline distribution: none, fixed:MS, uniform:LOW:HIGH, "
        "mixture:W*SPEC,W*SPEC (default %(default)s)",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="ask for progressive answers (SSE) and time the first one",
    )
    p.add_argument("--column", type=int, default=None, help="force column K (X-Column)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=256,
        help="requests in flight at most (all workers together); an arrival "
        "beyond it is dropped and counted (default %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="generator processes (default %(default)s: one sent 1,570 req/s on 2 CPU "
        "cores, and each one takes CPU from a server on the same host)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds before a request counts as an error (default %(default)s)",
    )
    p.add_argument(
        "--images",
        default=None,
        help="labelled images: ImageFolder tree (test/<class>/*.jpg) or its "
        ".tar.gz (default: the CIFAR-10 sample shipped with the package)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the schedule, images, deadlines")
    p.add_argument(
        "--cpus",
        default=None,
        help="run the generator on these CPUs only (taskset's list form: 0 or 0-1,3), "
        "to keep it off a server pinned to the others (default: wherever the OS puts it)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for summary.json, results.csv and the figures",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--sweep",
        action="store_true",
        help="anytime frontier: each deadline of --deadlines, server's choice "
        "and every column forced",
    )
    mode.add_argument(
        "--ceiling",
        action="store_true",
        help="measure the generator's own ceiling against GET /v2/health/live, "
        "doubling --rate for up to --steps steps",
    )
    mode.add_argument(
        "--target",
        action="store_true",
        help="the acceptance run: calibrate each column at --rate, saturate the deepest "
        "at --saturate-rate, then 70%% of saturation with derived deadlines: server's "
        "choice, streams, and every column forced",
    )
    p.add_argument(
        "--saturate-rate",
        type=float,
        default=1000.0,
        help="first offered rate of the --target saturation step, raised by half while "
        "the server keeps up with it (default %(default)s)",
    )
    p.add_argument(
        "--saturate-steps",
        type=int,
        default=SATURATION_STEPS,
        help="--target steps at the offer that saturated the server, the first included; "
        "the saturated throughput is their median (default %(default)s; 1: one step)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="seconds each --target step offers its load before the measured --duration, "
        "recorded apart (runs/<step>-warmup.csv, the summary's `warmup`); 0: none "
        "(default %(default)s)",
    )
    p.add_argument(
        "--deadlines",
        default="5,10,20,40,80",
        help="deadline grid in ms for --sweep (default %(default)s)",
    )
    p.add_argument("--steps", type=int, default=6, help="ramp steps for --ceiling")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    args = p.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.saturate_rate <= 0:
        p.error("--rate, --duration and --saturate-rate must be positive")
    if args.saturate_steps < 1:
        p.error("--saturate-steps must be at least 1")
    if args.workers < 1 or args.concurrency < args.workers:
        p.error("need --workers >= 1 and --concurrency >= --workers")
    if args.column is not None and args.column < 1:
        p.error("--column is 1-based")
    try:
        args.deadline_dist = parse_deadline(args.deadline)
        args.grid = parse_grid(args.deadlines)
        args.cpu_set = None if args.cpus is None else parse_cpu_list(args.cpus)
    except ValueError as exc:
        p.error(str(exc))
    return args


def server_models(url: str, timeout_s: float) -> dict[str, Any]:
    """GET /v1/models (raises httpx.HTTPError when the server is not there)."""
    response = httpx.get(url.rstrip("/") + MODELS_PATH, timeout=timeout_s)
    response.raise_for_status()
    payload: dict[str, Any] = response.json()
    return payload


def _target(args: argparse.Namespace) -> Target:
    return Target(args.url.rstrip("/"), args.column, args.stream, args.timeout)


def _run_meta(args: argparse.Namespace, samples: list[Sample]) -> dict[str, Any]:
    return {
        "url": args.url,
        "rate_rps": args.rate,
        "duration_s": args.duration,
        "deadline": args.deadline_dist.spec(),
        "stream": args.stream,
        "column": args.column,
        "concurrency": args.concurrency,
        "workers": args.workers,
        "timeout_s": args.timeout,
        "seed": args.seed,
        "cpus": None if args.cpu_set is None else sorted(args.cpu_set),
        "images": args.images or "shipped CIFAR-10 sample",
        "image_count": len(samples),
    }


def _warn_on_labels(samples: list[Sample], models: dict[str, Any]) -> None:
    classes = set(model_classes(models))
    if classes and not classes & {s.label for s in samples}:
        log.warning(
            "no image label is one of the model's classes (%s...): accuracy will be 0",
            ", ".join(sorted(classes)[:4]),
        )


def single(args: argparse.Namespace, samples: list[Sample]) -> int:
    plan = build_plan(args.rate, args.duration, args.deadline_dist, len(samples), args.seed)
    log.info("%d requests scheduled over %g s", len(plan.arrivals), args.duration)
    results, stalls, _ = run_probed(_target(args), plan, samples, args.concurrency, args.workers)
    summary = summarize(results, args.rate, args.duration, stalls)
    print(format_table(summary))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "summary.json", {"run": _run_meta(args, samples), **summary})
        write_csv(args.out / "results.csv", results)
        if not args.no_plots:
            from loadtest import plots

            plots.latency_cdf(results, args.out / "latency_cdf.png")
            plots.accuracy_vs_deadline(results, args.out / "accuracy_vs_deadline.png")
        print(f"wrote {args.out}")
    return 0


def sweep(args: argparse.Namespace, samples: list[Sample], models: dict[str, Any]) -> int:
    columns = column_count(models)
    points = run_sweep(
        _target(args),
        columns,
        args.grid,
        args.rate,
        args.duration,
        samples,
        args.concurrency,
        args.workers,
        args.seed,
        args.out,
    )
    print(format_sweep(points))
    if args.out is not None:
        meta = {**_run_meta(args, samples), "deadlines_ms": args.grid, "columns": columns}
        del meta["deadline"], meta["column"]
        write_json(args.out / "sweep.json", {"run": meta, "points": points})
        if not args.no_plots:
            from loadtest import plots

            plots.sweep_frontier(
                points, args.out / "sweep.png", f"Anytime frontier at {args.rate:g} req/s"
            )
        print(f"wrote {args.out}")
    return 0


def target(args: argparse.Namespace, samples: list[Sample], models: dict[str, Any]) -> int:
    run = TargetRun(
        _target(args),
        column_count(models),
        args.rate,
        args.saturate_rate,
        args.duration,
        samples,
        args.concurrency,
        args.workers,
        args.seed,
        out=args.out,
        warmup_s=args.warmup,
        saturation_steps=args.saturate_steps,
    )
    report = run_target(run)
    print(format_target(report))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {**_run_meta(args, samples), "saturate_rate_rps": args.saturate_rate}
        del meta["deadline"], meta["column"], meta["stream"]
        write_json(args.out / "target.json", {"run": meta, **report})
        print(f"wrote {args.out}")
    return 0


def ceiling(args: argparse.Namespace) -> int:
    report = run_ceiling(
        _target(args),
        args.rate,
        args.steps,
        args.duration,
        args.concurrency,
        args.workers,
        args.seed,
    )
    print(format_ceiling(report))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "ceiling.json", {"url": args.url, **report})
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    args = parse_args(argv)
    with pinned(args.cpu_set):
        return run(args)


def run(args: argparse.Namespace) -> int:
    try:
        if args.ceiling:
            httpx.get(args.url.rstrip("/") + LIVE_PATH, timeout=args.timeout).raise_for_status()
            return ceiling(args)
        models = server_models(args.url, args.timeout)
    except httpx.HTTPError as exc:
        print(f"fractal loadtest: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    try:
        samples = load_samples(args.images)
    except (OSError, ValueError) as exc:
        print(f"fractal loadtest: {exc}", file=sys.stderr)
        return 1
    _warn_on_labels(samples, models)
    if args.sweep:
        return sweep(args, samples, models)
    if args.target:
        return target(args, samples, models)
    return single(args, samples)


if __name__ == "__main__":
    sys.exit(main())
