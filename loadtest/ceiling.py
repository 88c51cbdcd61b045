"""The generator's own ceiling: the highest rate it can offer and see answered.

Each step sends GET /v2/health/live (no model work) open-loop at a rate that doubles
from the starting one; the ramp stops at the first step that falls short. A step falls
short when any request is dropped at the concurrency bound or fails, or when a backlog
built up: the last answer came more than `BACKLOG_S` after the schedule's end (at 10 %
overload, a 10 s step ends 1 s behind). Comparing answers with the offered rate instead
would confuse a backlog with the Poisson count's own noise. The ceiling is the highest
rate of a step that kept up. On a shared machine the server's health route takes part
of the same CPUs, so this is a lower bound on what the generator alone could do.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from loadtest.deadlines import NoDeadline
from loadtest.generator import Target, build_plan, run_load
from loadtest.report import summarize

log = logging.getLogger(__name__)

BACKLOG_S = 1.0
"""Seconds after the schedule's end by which the last answer must be in."""


def falls_short(summary: dict[str, Any]) -> bool:
    counts = summary["counts"]
    backlog = summary["elapsed_s"] - summary["duration_s"] > BACKLOG_S
    return backlog or counts["completed"] < counts["scheduled"]


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
                "scheduled_rate_rps": summary["scheduled_rate_rps"],
                "achieved_rate_rps": summary["achieved_rate_rps"],
                "backlog_s": round(summary["elapsed_s"] - summary["duration_s"], 3),
                "sent_rate_rps": summary["sent_rate_rps"],
                "latency_ms": summary["latency_ms"],
                "send_lag_ms": summary["send_lag_ms"],
                "counts": summary["counts"],
                "falls_short": short,
            }
        )
        log.info("offered %g req/s: %s", rate, "falls short" if short else "kept up")
        if short:
            break
    kept_up = [r["scheduled_rate_rps"] for r in rows if not r["falls_short"]]
    return {
        "workers": workers,
        "concurrency": concurrency,
        "duration_s": duration_s,
        "ceiling_rps": max(kept_up) if kept_up else None,
        "limited": rows[-1]["falls_short"],
        "steps": rows,
    }


def format_ceiling(report: dict[str, Any]) -> str:
    lines = ["offered  scheduled  answered     p50 ms  p99 ms  lag p99 ms  backlog s  kept up"]
    for r in report["steps"]:
        lat, lag, counts = r["latency_ms"], r["send_lag_ms"], r["counts"]
        answered = f"{counts['completed']}/{counts['scheduled']}"
        lines.append(
            f"{r['offered_rate_rps']:7g}  {r['scheduled_rate_rps']:9.1f}  {answered:>11}  "
            f"{_num(lat['p50']):>6}  {_num(lat['p99']):>6}  {_num(lag['p99']):>10}  "
            f"{r['backlog_s']:9.2f}  {'no' if r['falls_short'] else 'yes'}"
        )
    workers = f"with {report['workers']} worker(s)"
    if report["ceiling_rps"] is None:
        first = report["steps"][0]["offered_rate_rps"]
        lines.append(f"generator ceiling: below {first:g} req/s {workers} (lower --rate)")
    else:
        more = "" if report["limited"] else " or more (raise --rate or --steps)"
        lines.append(f"generator ceiling: {report['ceiling_rps']:.1f} req/s{more} {workers}")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
