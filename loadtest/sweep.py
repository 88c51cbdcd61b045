"""The anytime frontier: accuracy and deadline hit rate over a grid of deadlines.

For every deadline in the grid, at one offered rate, the same plan (same arrivals, same
images: only the deadline differs) runs once with the server choosing the column
("auto") and once per column k with `X-Column: k` forcing it. A shallow forced column
meets tight deadlines but answers worse; a deep one answers well but is shed or late
under tight deadlines; "auto" should follow the upper envelope of the two.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from loadtest.deadlines import Fixed
from loadtest.generator import Target, build_plan
from loadtest.report import summarize, write_csv
from loadtest.samples import Sample
from loadtest.stalls import run_probed

log = logging.getLogger(__name__)

SETTLE_S = 0.5
"""Pause between points so that one point's backlog does not leak into the next."""


def parse_grid(text: str) -> list[float]:
    """ "5,10,20" -> [5.0, 10.0, 20.0]: positive, increasing deadlines in ms."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"bad deadline grid {text!r}: expected numbers like 5,10,20") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"bad deadline grid {text!r}: need positive deadlines")
    return sorted(set(values))


def modes(columns: int) -> list[tuple[str, int | None]]:
    """("auto", None) then ("column k", k) for every column."""
    return [("auto", None)] + [(f"column {k}", k) for k in range(1, columns + 1)]


def point(
    mode: str, column: int | None, deadline_ms: float, summary: dict[str, Any]
) -> dict[str, Any]:
    return {
        "mode": mode,
        "column": column,
        "deadline_ms": deadline_ms,
        "accuracy": summary["accuracy"],
        "deadline_hit_rate": summary["deadline_hit_rate"],
        "correct_in_time_rate": summary["correct_in_time_rate"],
        "shed_rate": summary["shed_rate"],
        "drop_rate": summary["drop_rate"],
        "error_rate": summary["error_rate"],
        "achieved_rate_rps": summary["achieved_rate_rps"],
        "latency_ms": summary["latency_ms"],
        "columns_served": summary["columns_served"],
        "counts": summary["counts"],
    }


def run_sweep(
    target: Target,
    columns: int,
    deadlines_ms: Sequence[float],
    rate_rps: float,
    duration_s: float,
    samples: Sequence[Sample],
    concurrency: int,
    workers: int,
    seed: int,
    out: Path | None = None,
) -> list[dict[str, Any]]:
    """One point per (mode, deadline); with `out`, each point's CSV under out/points/."""
    points = []
    if out is not None:
        (out / "points").mkdir(parents=True, exist_ok=True)
    for mode, column in modes(columns):
        for deadline in deadlines_ms:
            plan = build_plan(rate_rps, duration_s, Fixed(deadline), len(samples), seed)
            results, stalls, _ = run_probed(
                replace(target, column=column), plan, samples, concurrency, workers
            )
            summary = summarize(results, rate_rps, duration_s, stalls)
            points.append(point(mode, column, deadline, summary))
            log.info(
                "%s, deadline %g ms: accuracy %s, hit rate %s",
                mode,
                deadline,
                summary["accuracy"],
                summary["deadline_hit_rate"],
            )
            if out is not None:
                name = f"{mode.replace(' ', '')}-{deadline:g}ms.csv"
                write_csv(out / "points" / name, results)
            time.sleep(SETTLE_S)
    return points


def format_sweep(points: Sequence[dict[str, Any]]) -> str:
    """Rows: modes; columns: deadlines; cells: accuracy / hit rate / correct in time."""
    deadlines = sorted({p["deadline_ms"] for p in points})
    by_key = {(p["mode"], p["deadline_ms"]): p for p in points}
    mode_names = list(dict.fromkeys(p["mode"] for p in points))

    def cell(p: dict[str, Any] | None) -> str:
        if p is None:
            return "-"
        parts = (p["accuracy"], p["deadline_hit_rate"], p["correct_in_time_rate"])
        return "/".join("-" if v is None else f"{v:.2f}" for v in parts)

    header = ["mode \\ deadline (ms)", *(f"{d:g}" for d in deadlines)]
    rows = [[m, *(cell(by_key.get((m, d))) for d in deadlines)] for m in mode_names]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    return "\n".join(["cells: accuracy of answers / deadline hit rate / correct in time", *lines])
