"""Summary numbers of a run, its per-request CSV, and the printed table.

Definitions (every rate over ALL scheduled requests unless it says otherwise):
- scheduled = sent + dropped; sent = completed + shed + errors;
- completed: a 2xx answer with a class; shed: a 503; errors: every other outcome of a
  sent request (other statuses, connection errors, timeouts, broken streams);
- deadline hit rate: completed within the deadline / scheduled, so shed, failed and
  dropped requests all count as misses (a request without a deadline hits if completed);
- latency percentiles: completed requests, from the scheduled time (or the send time,
  when the generator sent it up to a millisecond early) to the answer;
- accuracy: correct answers / completed answers that could be checked against a label;
- correct in time: correct answers within the deadline / scheduled (what an anytime
  service is for: a right answer, in time, for every request);
- stalls: the machine's stalls seen by an idle probe process during the run, and the
  misses that overlapped one (loadtest.stalls);
- time outside the server: latency minus the server's own elapsed time for the request
  (`elapsed_ms` of its answer): the generator's send lag, the network both ways, the
  server's event loop before it reads the request, the client reading the answer; a
  server that honours `X-Request-Start` (which the generator stamps at the send) counts
  the way there in its elapsed time, and then only the send lag and the way back remain;
- late answers: completed past their deadline, split into *late by the server's clock*
  (its elapsed time exceeded the budget the request was sent with) and *late outside
  the server* (the server answered within that budget; the rest of the way made it late);
- the server's time split (single answers, from their `Server-Timing` header): *queue*,
  waiting for the batch to start; *inference*, the batch's run and its hand-back to the
  event loop; *transit*, from the send to the server reading the request (when the server
  reports it: `X-Request-Start`); *rest*, everything else between arrival and answer
  (reading and decoding the body, admission, writing the answer, and the event loop's
  turns in between).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.generator import Result, budget_at_send


def _percentiles(values: Sequence[float], qs: Sequence[int]) -> dict[str, float | None]:
    if not values:
        return {f"p{q}": None for q in qs}
    pct = np.percentile(np.asarray(values, dtype=float), qs)
    return {f"p{q}": round(float(v), 3) for q, v in zip(qs, pct, strict=True)}


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 6) if den else None


def _checked(results: Iterable[Result]) -> list[Result]:
    """The answers whose correctness is known."""
    return [r for r in results if r.ok and r.correct is not None]


def _accuracy(checked: Sequence[Result]) -> tuple[int, float | None]:
    """(answers, accuracy) of `checked` answers (`_checked`)."""
    return len(checked), _ratio(sum(bool(r.correct) for r in checked), len(checked))


def _images(checked: Sequence[Result]) -> int | None:
    """How many distinct images the `checked` answers were for (None where the rows do
    not say): answers for the same image are not independent evidence of accuracy."""
    if any(r.image is None for r in checked):
        return None
    return len({r.image for r in checked})


def late_answers(results: Iterable[Result]) -> dict[str, int]:
    """Completed answers past their deadline, by where the time went (module docstring)."""
    late = [r for r in results if r.ok and not r.deadline_met and r.deadline_ms is not None]
    by_server = 0
    unknown = 0
    for r in late:
        budget = budget_at_send(r.deadline_ms, r.scheduled_s, r.send_s or r.scheduled_s)
        if r.server_ms is None or budget is None:
            unknown += 1
        elif r.server_ms > budget:
            by_server += 1
    return {
        "total": len(late),
        "late_by_server_clock": by_server,
        "late_outside_server": len(late) - by_server - unknown,
        "unknown": unknown,
    }


def server_split(results: Iterable[Result], qs: Sequence[int]) -> dict[str, Any] | None:
    """Percentiles of the server's time split into queue, inference, transit (when the
    server reported it) and rest (module docstring), over the answers that carry queue and
    inference; None when none does."""
    timed = [
        r
        for r in results
        if r.server_ms is not None and r.queue_ms is not None and r.inference_ms is not None
    ]
    if not timed:
        return None
    parts: dict[str, list[float]] = {"queue": [], "inference": [], "transit": [], "rest": []}
    for r in timed:
        assert r.server_ms is not None and r.queue_ms is not None and r.inference_ms is not None
        transit = r.transit_ms or 0.0
        parts["queue"].append(r.queue_ms)
        parts["inference"].append(r.inference_ms)
        parts["transit"].append(transit)
        parts["rest"].append(r.server_ms - r.queue_ms - r.inference_ms - transit)
    if all(r.transit_ms is None for r in timed):
        del parts["transit"]
    return {name: _percentiles(values, qs) for name, values in parts.items()}


def summarize(
    results: Sequence[Result],
    offered_rate_rps: float,
    duration_s: float,
    stalls: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary of one run (see the module docstring for each definition); `stalls`,
    the machine's stalls during it (loadtest.stalls), is kept as it is."""
    scheduled = len(results)
    dropped = sum(r.dropped for r in results)
    sent = scheduled - dropped
    completed = [r for r in results if r.ok]
    shed = sum(r.shed for r in results)
    errors = sent - len(completed) - shed
    met = sum(r.deadline_met for r in results)
    correct_in_time = sum(bool(r.deadline_met and r.correct) for r in results)
    done_s = [r.origin_s + r.latency_ms / 1000.0 for r in results if r.latency_ms is not None]
    send_s = [r.send_s for r in results if r.send_s is not None]
    window_done = max([duration_s, *done_s])
    window_sent = max([duration_s, *send_s])
    served = Counter(r.column for r in completed if r.column is not None)
    known = _checked(completed)
    by_column: dict[str, dict[str, Any]] = {}
    for column in sorted(served):
        answers, acc = _accuracy([r for r in known if r.column == column])
        by_column[str(column)] = {"answers": served[column], "checked": answers, "accuracy": acc}
    checked, accuracy = _accuracy(known)
    lags = [max(r.send_s - r.scheduled_s, 0.0) * 1000.0 for r in results if r.send_s is not None]
    firsts = [r.first_answer_ms for r in completed if r.first_answer_ms is not None]
    outside = [
        r.latency_ms - r.server_ms
        for r in completed
        if r.latency_ms is not None and r.server_ms is not None
    ]
    return {
        "duration_s": duration_s,
        "elapsed_s": round(window_done, 3),
        "offered_rate_rps": offered_rate_rps,
        "scheduled_rate_rps": round(scheduled / duration_s, 3),
        "sent_rate_rps": round(sent / window_sent, 3),
        "achieved_rate_rps": round(len(completed) / window_done, 3),
        "counts": {
            "scheduled": scheduled,
            "sent": sent,
            "completed": len(completed),
            "dropped": dropped,
            "shed": shed,
            "errors": errors,
            "deadline_met": met,
        },
        "latency_ms": _percentiles(
            [r.latency_ms for r in completed if r.latency_ms is not None], (50, 95, 99)
        ),
        "deadline_hit_rate": _ratio(met, scheduled),
        "shed_rate": _ratio(shed, scheduled),
        "drop_rate": _ratio(dropped, scheduled),
        "error_rate": _ratio(errors, scheduled),
        "accuracy": accuracy,
        "accuracy_checked": checked,
        "accuracy_images": _images(known),
        "correct_in_time_rate": _ratio(correct_in_time, scheduled),
        "accuracy_by_column": by_column,
        "columns_served": {str(c): n for c, n in sorted(served.items())},
        "stream_first_answer_ms": _percentiles(firsts, (50, 99)) if firsts else None,
        "outside_server_ms": _percentiles(outside, (50, 99)) if outside else None,
        "late_answers": late_answers(results),
        "server_split_ms": server_split(completed, (50, 99)),
        "late_server_split_ms": server_split(
            (r for r in completed if not r.deadline_met and r.deadline_ms is not None), (50,)
        ),
        "send_lag_ms": {
            **_percentiles(lags, (50, 99)),
            "max": round(max(lags), 3) if lags else None,
        },
        "error_kinds": dict(Counter(r.error for r in results if r.error and not r.shed)),
        "stalls": stalls,
    }


def deadline_bins(results: Sequence[Result], bins: int = 8) -> list[dict[str, Any]]:
    """Hit rate and accuracy of answers per deadline bin (requests with a deadline)."""
    timed = [r for r in results if r.deadline_ms is not None]
    if not timed:
        return []
    values = np.array([r.deadline_ms for r in timed], dtype=float)
    low, high = float(values.min()), float(values.max())
    edges = np.linspace(low, high, bins + 1) if high > low else np.array([low, high])
    which = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
    out = []
    for b in range(len(edges) - 1):
        members = [r for r, w in zip(timed, which, strict=True) if w == b]
        if not members:
            continue
        checked, accuracy = _accuracy(_checked(members))
        out.append(
            {
                "low_ms": float(edges[b]),
                "high_ms": float(edges[b + 1]),
                "center_ms": float(np.mean([r.deadline_ms for r in members])),
                "requests": len(members),
                "hit_rate": _ratio(sum(r.deadline_met for r in members), len(members)),
                "accuracy": accuracy,
                "checked": checked,
            }
        )
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(summary: dict[str, Any]) -> str:
    """The summary as an aligned two-column text table."""
    counts, latency = summary["counts"], summary["latency_ms"]
    rows: list[tuple[str, Any]] = [
        ("offered rate (req/s)", summary["offered_rate_rps"]),
        ("achieved rate (answers/s)", summary["achieved_rate_rps"]),
        ("scheduled", counts["scheduled"]),
        ("sent", counts["sent"]),
        ("completed (2xx)", counts["completed"]),
        ("dropped (client bound)", counts["dropped"]),
        ("shed (503)", counts["shed"]),
        ("errors", counts["errors"]),
        (
            "latency p50 / p95 / p99 (ms)",
            " / ".join(_fmt(latency[k]) for k in ("p50", "p95", "p99")),
        ),
        ("deadline hit rate", summary["deadline_hit_rate"]),
        ("shed rate", summary["shed_rate"]),
        ("accuracy (answers)", summary["accuracy"]),
        ("correct in time (of scheduled)", summary["correct_in_time_rate"]),
    ]
    for column, info in summary["accuracy_by_column"].items():
        rows.append(
            (
                f"  column {column}: answers, accuracy",
                f"{info['answers']}, {_fmt(info['accuracy'])}",
            )
        )
    if summary["stream_first_answer_ms"]:
        first = summary["stream_first_answer_ms"]
        rows.append(("first answer p50 / p99 (ms)", f"{_fmt(first['p50'])} / {_fmt(first['p99'])}"))
    outside = summary.get("outside_server_ms")
    if outside:
        rows.append(
            (
                "time outside the server p50 / p99 (ms)",
                f"{_fmt(outside['p50'])} / {_fmt(outside['p99'])}",
            )
        )
    late = summary.get("late_answers")
    if late and late["total"]:
        rows.append(
            (
                "late answers: by the server's clock, outside it",
                f"{late['late_by_server_clock']}, {late['late_outside_server']}",
            )
        )
    split, late_split = summary.get("server_split_ms"), summary.get("late_server_split_ms")
    if split:
        rows.append(("server time p50 / p99, late answers' p50 (ms)", ""))
        for part, pcts in split.items():
            late_p50 = late_split[part]["p50"] if late_split else None
            rows.append(
                (f"  {part}", f"{_fmt(pcts['p50'])} / {_fmt(pcts['p99'])}, {_fmt(late_p50)}")
            )
    lag = summary["send_lag_ms"]
    rows.append(
        ("send lag p50 / p99 / max (ms)", " / ".join(_fmt(lag[k]) for k in ("p50", "p99", "max")))
    )
    stalls = summary.get("stalls")
    if stalls:
        rows.append(
            (
                f"machine stalls >= {_fmt(stalls['threshold_ms'])} ms: count, longest (ms)",
                f"{stalls['count']}, {_fmt(stalls['longest_ms'])}",
            )
        )
        rows.append(
            (
                "  misses during or just after one",
                f"{stalls['misses_near_stalls']} of {stalls['misses']}",
            )
        )
        if stalls.get("steal_ms") is not None:
            rows.append(("CPU time stolen by the hypervisor (ms)", _fmt(stalls["steal_ms"])))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {_fmt(value)}" for name, value in rows)


FIELDS = [f.name for f in dataclasses.fields(Result)]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""  # repr: exact round trip
    return str(value)


def write_csv(path: Path, results: Iterable[Result]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS)
        for r in results:
            writer.writerow([_cell(getattr(r, name)) for name in FIELDS])


def _opt(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda text: kind(text) if text != "" else None


def _flag(text: str) -> bool:
    return text == "1"


PARSERS: dict[str, Callable[[str], Any]] = {
    "index": int,
    "worker": int,
    "scheduled_s": float,
    "label": str,
    "deadline_ms": _opt(float),
    "image": _opt(int),
    "send_s": _opt(float),
    "latency_ms": _opt(float),
    "server_ms": _opt(float),
    "queue_ms": _opt(float),
    "inference_ms": _opt(float),
    "transit_ms": _opt(float),
    "status": int,
    "column": _opt(int),
    "predicted": _opt(str),
    "correct": _opt(_flag),
    "deadline_met": _flag,
    "first_answer_ms": _opt(float),
    "dropped": _flag,
    "error": _opt(str),
}


def read_csv(path: Path) -> list[Result]:
    with path.open(newline="") as f:
        return [Result(**{k: PARSERS[k](v) for k, v in row.items()}) for row in csv.DictReader(f)]


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
