"""PNG figures of a run and of a sweep.

Built on `matplotlib.figure.Figure` directly, not pyplot: no global backend or figure
state, nothing to close, no display needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from loadtest.generator import Result
from loadtest.report import deadline_bins


def _plain_log_x(ax: Axes, ticks: Sequence[float] | None = None) -> None:
    """Log x axis labelled 5, 10, 20 rather than 5x10^0."""
    ax.set_xscale("log")
    if ticks:
        ax.set_xticks(list(ticks))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def latency_cdf(results: Sequence[Result], path: Path, title: str = "") -> None:
    """Share of completed answers at or under each latency (dotted: up to 3 deadlines)."""
    latencies = np.sort([r.latency_ms for r in results if r.ok and r.latency_ms is not None])
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    if len(latencies):
        ax.step(
            latencies,
            np.arange(1, len(latencies) + 1) / len(latencies),
            where="post",
            label=f"completed ({len(latencies)} of {len(results)} scheduled)",
        )
    deadlines = sorted({r.deadline_ms for r in results if r.deadline_ms is not None})
    if 0 < len(deadlines) <= 3:
        for d in deadlines:
            ax.axvline(d, color="grey", linestyle=":", linewidth=1)
    _plain_log_x(ax)
    ax.set_xlabel("latency from scheduled send (ms, log)")
    ax.set_ylabel("fraction of completed answers")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title or "Latency CDF")
    if len(latencies):
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def accuracy_vs_deadline(results: Sequence[Result], path: Path, title: str = "") -> None:
    """Per deadline bin: accuracy of the answers and the deadline hit rate."""
    bins = deadline_bins(results)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    if bins:
        centers = [b["center_ms"] for b in bins]
        acc = [np.nan if b["accuracy"] is None else b["accuracy"] for b in bins]
        hit = [np.nan if b["hit_rate"] is None else b["hit_rate"] for b in bins]
        ax.plot(centers, acc, "o-", label="accuracy of answers")
        ax.plot(centers, hit, "s--", label="deadline hit rate (of all scheduled)")
        ax.legend(loc="best")
    else:
        ax.text(0.5, 0.5, "no request had a deadline", ha="center", transform=ax.transAxes)
    ax.set_xlabel("deadline (ms, bin mean)")
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "Accuracy against deadline")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


PANELS = (
    ("accuracy", "accuracy of answers"),
    ("deadline_hit_rate", "deadline hit rate"),
    ("correct_in_time_rate", "correct in time (of all requests)"),
)


def _values(rows: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [np.nan if p[key] is None else p[key] for p in rows]


def sweep_frontier(points: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    """Accuracy, hit rate and correct-in-time against deadline, one line per mode."""
    modes = list(dict.fromkeys(p["mode"] for p in points))
    fig = Figure(figsize=(15, 4.4))
    axes = fig.subplots(1, len(PANELS), sharex=True)
    for mode in modes:
        rows = sorted((p for p in points if p["mode"] == mode), key=lambda p: p["deadline_ms"])
        x = [p["deadline_ms"] for p in rows]
        style = "o-" if mode == "auto" else ".--"
        width = 2.2 if mode == "auto" else 1.2
        for ax, (key, _) in zip(axes, PANELS, strict=True):
            ax.plot(x, _values(rows, key), style, linewidth=width, label=mode)
    deadlines = sorted({p["deadline_ms"] for p in points})
    for ax, (_, name) in zip(axes, PANELS, strict=True):
        _plain_log_x(ax, deadlines)
        ax.set_xlabel("deadline (ms, log)")
        ax.set_ylabel(name)
        ax.set_ylim(0, 1.02)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(loc="best", fontsize="small")
    fig.suptitle(title or "Anytime frontier")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
