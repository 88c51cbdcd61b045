"""The generator's own ceiling: the highest rate it can offer and see answered.

Each step sends GET /v2/health/live (no model work) open-loop at a rate that doubles
from the starting one; the ramp stops at the first step that falls short. A step falls
short when fewer than `KEEP_UP` of the offered requests per second come back, or any
request is dropped at the concurrency bound or fails. The ceiling is the best achieved
rate seen. On a shared machine the server's own health route takes part of the same
CPUs, so this is a lower bound on what the generator alone could do.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from loadtest.deadlines import NoDeadline
from loadtest.generator import Target, build_plan, run_load
from loadtest.report import summarize

log = logging.getLogger(__name__)

KEEP_UP = 0.95
"""Achieved / offered rate below which a step counts as falling short."""


def falls_short(summary: dict[str, Any]) -> bool:
    counts = summary["counts"]
    behind = summary["achieved_rate_rps"] < KEEP_UP * summary["offered_rate_rps"]
    return behind or counts["dropped"] > 0 or counts["completed"] < counts["scheduled"]


def ramp_rates(start_rps: float, steps: int) -> list[float]:
    return [start_rps * 2**i for i in range(steps)]


def run_ceiling(
    target: Target,
    start_rps: float,
    steps: int,
    duration_s: float,
    concurrency: int,
    workers: int,
    seed: int,
) -> dict[str, Any]:
    """Steps of the ramp and the ceiling (best achieved rate, in answers per second)."""
    target = replace(target, ceiling=True, column=None, stream=False)
    rows: list[dict[str, Any]] = []
    for rate in ramp_rates(start_rps, steps):
        plan = build_plan(rate, duration_s, NoDeadline(), 1, seed)
        summary = summarize(run_load(target, plan, [], concurrency, workers), rate, duration_s)
        short = falls_short(summary)
        rows.append(
            {
                "offered_rate_rps": rate,
                "achieved_rate_rps": summary["achieved_rate_rps"],
                "sent_rate_rps": summary["sent_rate_rps"],
                "latency_ms": summary["latency_ms"],
                "send_lag_ms": summary["send_lag_ms"],
                "counts": summary["counts"],
                "falls_short": short,
            }
        )
        log.info("offered %g req/s: achieved %g", rate, summary["achieved_rate_rps"])
        if short:
            break
    return {
        "workers": workers,
        "concurrency": concurrency,
        "duration_s": duration_s,
        "ceiling_rps": max(r["achieved_rate_rps"] for r in rows),
        "limited": rows[-1]["falls_short"],
        "steps": rows,
    }


def format_ceiling(report: dict[str, Any]) -> str:
    lines = ["offered  achieved  p50 ms  p99 ms  lag p99 ms  dropped  errors"]
    for r in report["steps"]:
        lat, lag, counts = r["latency_ms"], r["send_lag_ms"], r["counts"]
        lines.append(
            f"{r['offered_rate_rps']:7g}  {r['achieved_rate_rps']:8.1f}  "
            f"{_num(lat['p50']):>6}  {_num(lat['p99']):>6}  {_num(lag['p99']):>10}  "
            f"{counts['dropped']:7d}  {counts['errors']:6d}"
        )
    verdict = "" if report["limited"] else " (not reached: raise --rate or --steps)"
    lines.append(
        f"generator ceiling: {report['ceiling_rps']:.1f} answers/s "
        f"with {report['workers']} worker(s){verdict}"
    )
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
