"""`fractal loadtest --target`: the acceptance run of docs/loadtest.md as one command.

1. **Calibrate**: each column forced (`X-Column`), no deadline, at the low `--rate`:
   its p99 latency as this harness sees it (client included). A column whose step lost
   CPU time to the hypervisor (`step_disturbed`, pure) is measured again, and so is every
   column where column 1 came out slower than the deepest (`calibration_disturbed`,
   pure), up to `MAX_CALIBRATIONS` times in all.
2. **Saturate**: the deepest column forced, no deadline, offered `--saturate-rate`: the
   answers per second it sustains are the saturated throughput, the rate at which every
   request could still get the best answer. Where the server kept up with the offer
   (`saturated`, pure), the offer was not enough: it is raised by half and the step run
   again, up to `MAX_RAISES` times. An offer that saturated it runs `saturation_steps`
   times in all, and the saturated throughput is the median of those steps
   (`saturated_throughput`, pure; where the median kept up after all, the offer is
   raised): one 10 s step found 1,107-1,411 answers/s within an hour on 2026-12-07, and
   a fast minute set a load the next ones could not carry.
3. **Target load**: `load_share` (70 %) of that, with deadlines uniform between
   `low_factor` (1.5) x column 1's p99 and `high_factor` (2) x the deepest column's p99.
   At that load the same plan (same arrivals, images, deadlines) runs with the server
   choosing, as streams, and with each column forced.
4. **Verdict** (`verdict`, a pure function): the server's hit rate is at least
   `hit_rate` (99.5 %); its accuracy is at least that of the most accurate single column
   whose hit rate is at least the server's (less that accuracy's standard error over the
   distinct images answered: the two are measured on different sets of answers, drawn
   from a finite set of images); and a stream's first answer (p99) comes
   within column 1's p99 at that load (forced, single answer) plus `stream_slack_ms`.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from loadtest.deadlines import Deadline, NoDeadline, Uniform
from loadtest.generator import Target, build_plan
from loadtest.report import summarize, write_csv
from loadtest.samples import Sample
from loadtest.stalls import run_probed
from loadtest.sweep import SETTLE_S

log = logging.getLogger(__name__)

RECOVER_S = 3.0
"""Pause after the saturation step: the server works off its backlog, and its admission
control, cut back under overload, grows again before the measured runs."""
SATURATED_BELOW = 0.95
"""A saturation step saturated the server when it answered less than this share of the
rate it was offered."""
RAISE_FACTOR = 1.5
MAX_RAISES = 3
"""How many times an offer the server kept up with is raised (by `RAISE_FACTOR`)."""
MAX_CALIBRATIONS = 3
"""How many times in all the calibration is measured while it comes out disturbed."""
CALIBRATION_STEAL_MS_PER_S = 25.0
"""A calibration step that lost more CPU time than this to the hypervisor, per second of
the step, is measured again. On 2026-12-07 steps that lost 470 ms or more in 10 s came
out with their p99 up to six times the usual (column 4: 28.2 ms with 4,070 ms stolen,
against 5-7 ms); steps under 100 ms, and most under 350, did not."""
SATURATION_STEPS = 3
"""Steps at the offer that saturated the server, the first included, whose median is the
saturated throughput."""


@dataclass(frozen=True)
class TargetSpec:
    load_share: float = 0.7
    low_factor: float = 1.5
    high_factor: float = 2.0
    hit_rate: float = 0.995
    stream_slack_ms: float = 2.0


def target_deadlines(p99_ms: Mapping[int, float], spec: TargetSpec) -> tuple[float, float]:
    """(low, high) ms: low_factor x column 1's p99, high_factor x the deepest one's
    (never below low)."""
    low = spec.low_factor * p99_ms[1]
    high = spec.high_factor * p99_ms[max(p99_ms)]
    return round(low, 3), round(max(high, low), 3)


def target_rate(saturated_rps: float, spec: TargetSpec) -> float:
    return round(spec.load_share * saturated_rps, 1)


def saturated(offered_rps: float, achieved_rps: float) -> bool:
    """Whether a step offered `offered_rps` found the server's limit: it answered less
    than `SATURATED_BELOW` of the offer (else the offer, not the server, set the rate)."""
    return achieved_rps < SATURATED_BELOW * offered_rps


def calibration_disturbed(p99_ms: Mapping[int, float]) -> bool:
    """Whether a calibration was disturbed: column 1, a fraction of the deepest column's
    work, came out slower at p99 than the deepest (a slow spell of the machine during its
    step). From such a one the deadlines would shrink to one value or nearly (from
    `low_factor` x column 1's p99 up to `high_factor` x the deepest's): three runs of
    about twenty on 2026-12-07 got one fixed deadline of 18-34 ms."""
    return p99_ms[1] > p99_ms[max(p99_ms)]


def stolen_ms_per_s(summary: Mapping[str, Any]) -> float:
    """CPU time the hypervisor took during a step, per second of it (0 where the machine
    does not report it)."""
    steal = (summary.get("stalls") or {}).get("steal_ms")
    return (steal or 0.0) / summary["duration_s"] if summary.get("duration_s") else 0.0


def step_disturbed(summary: Mapping[str, Any]) -> bool:
    """Whether the hypervisor took enough CPU during a calibration step to set its p99:
    more than `CALIBRATION_STEAL_MS_PER_S`."""
    return stolen_ms_per_s(summary) > CALIBRATION_STEAL_MS_PER_S


def calibrate(
    step: Callable[[str, int], dict[str, Any]], columns: int
) -> tuple[dict[int, dict[str, Any]], list[dict[str, float]]]:
    """Run the calibration `step` (name, column) -> summary for every column; then, while
    the calibration is disturbed, `MAX_CALIBRATIONS` times in all, again: the columns whose
    steps lost CPU to the hypervisor (`step_disturbed`), or every column where none did
    but column 1 came out slower than the deepest (`calibration_disturbed`). Of a
    column's steps the one that lost the least CPU (the later on a tie) is kept. Returns
    the kept summaries and each attempt's p99 by the columns it measured."""
    attempts: list[dict[str, float]] = []
    kept: dict[int, dict[str, Any]] = {}
    todo = list(range(1, columns + 1))
    for attempt in range(MAX_CALIBRATIONS):
        suffix = "" if attempt == 0 else f"-{attempt + 1}"
        measured = {k: step(f"calibrate-column{k}{suffix}", k) for k in todo}
        attempts.append({str(k): s["latency_ms"]["p99"] for k, s in measured.items()})
        for k, summary in measured.items():
            if k not in kept or stolen_ms_per_s(summary) <= stolen_ms_per_s(kept[k]):
                kept[k] = summary
        stolen = [k for k in sorted(kept) if step_disturbed(kept[k])]
        p99 = {k: s["latency_ms"]["p99"] for k, s in kept.items()}
        if not (stolen or calibration_disturbed(p99)):
            break
        why = (
            f"CPU stolen in the steps of columns {stolen}"
            if stolen
            else f"column 1 slower than column {columns}"
        )
        if attempt + 1 == MAX_CALIBRATIONS:
            log.warning("calibration still disturbed (%s): the least disturbed steps kept", why)
        else:
            log.info("calibration disturbed (%s): again", why)
        todo = stolen or list(range(1, columns + 1))
    return dict(sorted(kept.items())), attempts


def find_saturation(
    step: Callable[[str, float], dict[str, Any]],
    offered_rps: float,
    pause: Callable[[], None] = lambda: None,
    steps: int = SATURATION_STEPS,
) -> tuple[dict[str, Any], list[dict[str, float]], list[float]]:
    """Run the saturation `step` (name, offered rate) -> summary, with a `pause` after
    each. An offer is run once while the server keeps up with it, and raised by
    `RAISE_FACTOR`; one it did not keep up with (and the last, after `MAX_RAISES`
    raises) is run `steps` times in all (`<name>-again-2`, ...). Where the median of
    those shows the server kept up after all (the first step caught a slow spell), the
    offer is raised too. Returns the last step's summary, every (offered, achieved), and
    the answer rates of the steps at the last offer."""
    attempts: list[dict[str, float]] = []
    for raises in range(MAX_RAISES + 1):
        name = "saturate" if raises == 0 else f"saturate-{raises + 1}"
        last = raises == MAX_RAISES
        rates: list[float] = []
        for again in range(1, steps + 1):
            summary = step(name if again == 1 else f"{name}-again-{again}", offered_rps)
            rates.append(summary["achieved_rate_rps"])
            attempts.append({"offered_rps": offered_rps, "achieved_rps": rates[-1]})
            pause()
            if not (last or saturated(offered_rps, rates[0])):
                break
        median = saturated_throughput(rates)
        if last or saturated(offered_rps, median):
            break
        log.info(
            "the server kept up with %s req/s (%s answers/s): offering more", offered_rps, median
        )
        offered_rps = round(offered_rps * RAISE_FACTOR, 1)
    return summary, attempts, rates


def saturated_throughput(rates_rps: Sequence[float]) -> float:
    """The saturated throughput from the answer rates of repeated steps at one offer:
    their median, which one fast or slow step does not move."""
    return round(statistics.median(rates_rps), 1)


def best_single_column(
    columns: Mapping[int, Mapping[str, Any]], hit_rate: float
) -> tuple[int, float] | None:
    """The most accurate forced column whose hit rate is at least `hit_rate`, and its
    accuracy; None when no column reaches it."""
    reaching = [
        (summary["accuracy"], k)
        for k, summary in columns.items()
        if summary["accuracy"] is not None and (summary["deadline_hit_rate"] or 0.0) >= hit_rate
    ]
    if not reaching:
        return None
    accuracy, column = max(reaching)
    return column, accuracy


def verdict(
    auto: Mapping[str, Any],
    stream: Mapping[str, Any],
    columns: Mapping[int, Mapping[str, Any]],
    spec: TargetSpec,
) -> dict[str, Any]:
    """Each target, its measured value, the bound it is held to, and whether it is met."""
    hit = auto["deadline_hit_rate"] or 0.0
    best = best_single_column(columns, hit)
    accuracy = auto["accuracy"]
    # Accuracies of different answer sets: within the bound's standard error is a tie.
    slack = 0.0 if best is None else _standard_error(best[1], columns[best[0]])
    first = (stream.get("stream_first_answer_ms") or {}).get("p99")
    column_1_p99 = columns[1]["latency_ms"]["p99"] if 1 in columns else None
    stream_bound = None if column_1_p99 is None else column_1_p99 + spec.stream_slack_ms
    return {
        "hit_rate": {"value": hit, "bound": spec.hit_rate, "met": hit >= spec.hit_rate},
        "accuracy": {
            "value": accuracy,
            "best_single_column": None if best is None else best[0],
            "bound": None if best is None else best[1],
            "standard_error": round(slack, 4),
            # No single column reaching the server's hit rate: nothing to fall short of.
            "met": accuracy is not None and (best is None or accuracy >= best[1] - slack),
        },
        "stream_first_answer_p99_ms": {
            "value": first,
            "bound": stream_bound,
            "met": first is not None and stream_bound is not None and first <= stream_bound,
        },
    }


def _standard_error(accuracy: float, summary: Mapping[str, Any]) -> float:
    """The standard error of a run's accuracy, over the distinct images its answers were
    for where the summary says (else over its answers): 7,600 answers drawn from the
    200 images shipped in loadtest/samples/ measure those 200 images, not 7,600."""
    images = summary.get("accuracy_images") or summary.get("accuracy_checked") or 0
    return math.sqrt(accuracy * (1.0 - accuracy) / images) if images else 0.0


@dataclass(frozen=True)
class TargetRun:
    target: Target
    columns: int
    calibrate_rps: float
    saturate_rps: float
    duration_s: float
    samples: Sequence[Sample]
    concurrency: int
    workers: int
    seed: int
    spec: TargetSpec = TargetSpec()
    out: Path | None = None
    """With a folder: every step's per-request rows as out/runs/<step>.csv (and those of
    its warm-up as out/runs/<step>-warmup.csv)."""
    warmup_s: float = 0.0
    """Each step first offers its load for this long, recorded apart: the step is measured
    once the server is under the load, not from a cold start after the pause between steps."""
    saturation_steps: int = SATURATION_STEPS
    """Steps at the offer that saturated the server (the first included); the saturated
    throughput is their median."""

    def load(
        self, name: str, deadline: Deadline, rate_rps: float, **changes: Any
    ) -> dict[str, Any]:
        plan = build_plan(
            rate_rps, self.warmup_s + self.duration_s, deadline, len(self.samples), self.seed
        )
        target = replace(self.target, **changes)
        measured, stalls, warm = run_probed(
            target, plan, self.samples, self.concurrency, self.workers, self.warmup_s
        )
        if self.out is not None:
            (self.out / "runs").mkdir(parents=True, exist_ok=True)
            write_csv(self.out / "runs" / f"{name}.csv", measured)
            if warm:
                write_csv(self.out / "runs" / f"{name}-warmup.csv", warm)
        time.sleep(SETTLE_S)
        summary = summarize(measured, rate_rps, self.duration_s, stalls)
        if self.warmup_s > 0:
            before = summarize(warm, rate_rps, self.warmup_s)
            summary["warmup"] = {
                "duration_s": self.warmup_s,
                "scheduled": before["counts"]["scheduled"],
                "deadline_hit_rate": before["deadline_hit_rate"],
            }
        return summary


def run_target(run: TargetRun) -> dict[str, Any]:
    """Every step's summary, the derived load and deadlines, and the verdict."""
    deepest = run.columns
    calibration, calibrations = calibrate(
        lambda name, k: run.load(name, NoDeadline(), run.calibrate_rps, column=k, stream=False),
        deepest,
    )
    p99 = {k: s["latency_ms"]["p99"] for k, s in calibration.items()}
    log.info("calibration p99 by column (ms): %s", p99)

    def saturate(name: str, rps: float) -> dict[str, Any]:
        return run.load(name, NoDeadline(), rps, column=deepest, stream=False)

    def recover() -> None:
        time.sleep(RECOVER_S)

    saturation, attempts, rates = find_saturation(
        saturate, run.saturate_rps, recover, run.saturation_steps
    )
    offered = attempts[-1]["offered_rps"]
    achieved = saturated_throughput(rates)
    rate = target_rate(achieved, run.spec)
    low, high = target_deadlines(p99, run.spec)
    log.info(
        "saturated %s answers/s: target load %s req/s, deadlines %s-%s ms",
        achieved,
        rate,
        low,
        high,
    )
    deadline = Uniform(low, high)
    auto = run.load("auto", deadline, rate, column=None, stream=False)
    stream = run.load("stream", deadline, rate, column=None, stream=True)
    forced = {
        k: run.load(f"column{k}", deadline, rate, column=k, stream=False)
        for k in range(1, deepest + 1)
    }
    return {
        "spec": asdict(run.spec),
        "calibration": {
            "rate_rps": run.calibrate_rps,
            "p99_ms": {str(k): v for k, v in p99.items()},
            "attempts": calibrations,
            "runs": {str(k): s for k, s in calibration.items()},
        },
        "saturation": {
            "offered_rps": offered,
            "column": deepest,
            "achieved_rps": achieved,
            "saturated": saturated(offered, achieved),
            "attempts": attempts,
            "steps_rps": rates,
            "run": saturation,
        },
        "load": {"rate_rps": rate, "deadline": deadline.spec(), "warmup_s": run.warmup_s},
        "runs": {
            "auto": auto,
            "stream": stream,
            **{f"column {k}": s for k, s in forced.items()},
        },
        "verdict": verdict(auto, stream, forced, run.spec),
    }


def format_target(report: Mapping[str, Any]) -> str:
    load = report["load"]
    lines = [
        f"calibration p99 (ms) by column at {report['calibration']['rate_rps']:g} req/s: "
        + ", ".join(f"{k}: {v}" for k, v in report["calibration"]["p99_ms"].items())
        + _calibration_note(report),
        f"saturated throughput (column {report['saturation']['column']} forced): "
        f"{report['saturation']['achieved_rps']} answers/s{_saturation_note(report)}",
        f"target load: {load['rate_rps']} req/s, deadlines {load['deadline']} ms",
        *_warmup_lines(report),
        "",
        f"{'mode':10s} {'hit rate':>9s} {'accuracy':>9s} {'p50 ms':>8s} {'p99 ms':>8s} "
        f"{'shed':>7s} {'first p99':>10s} {'late srv/out':>13s} {'out p99':>8s} "
        f"{'stalls':>7s} {'misses near':>12s} {'stolen ms':>10s}  columns served",
    ]
    for mode, s in report["runs"].items():
        first = (s.get("stream_first_answer_ms") or {}).get("p99")
        stalls = s.get("stalls") or {}
        near = f"{stalls.get('misses_near_stalls', '-')}/{stalls.get('misses', '-')}"
        late = s.get("late_answers") or {}
        split = f"{late.get('late_by_server_clock', '-')}/{late.get('late_outside_server', '-')}"
        outside = (s.get("outside_server_ms") or {}).get("p99")
        lines.append(
            f"{mode:10s} {_num(s['deadline_hit_rate'], 4):>9s} {_num(s['accuracy'], 4):>9s} "
            f"{_num(s['latency_ms']['p50'], 2):>8s} {_num(s['latency_ms']['p99'], 2):>8s} "
            f"{_num(s['shed_rate'], 4):>7s} {_num(first, 2):>10s} {split:>13s} "
            f"{_num(outside, 2):>8s} {stalls.get('count', '-')!s:>7s} {near:>12s} "
            f"{_num(stalls.get('steal_ms'), 0):>10s}  "
            f"{s['columns_served']}"
        )
    lines.append("")
    for name, v in report["verdict"].items():
        lines.append(
            f"{name}: {_num(v['value'], 4)} against {_num(v['bound'], 4)}: "
            f"{'met' if v['met'] else 'NOT met'}"
        )
    return "\n".join(lines)


def _warmup_lines(report: Mapping[str, Any]) -> list[str]:
    warmup_s = report["load"].get("warmup_s") or 0.0
    if warmup_s <= 0:
        return []
    rates = ", ".join(
        f"{mode} {_num(s['warmup']['deadline_hit_rate'], 4)}"
        for mode, s in report["runs"].items()
        if "warmup" in s
    )
    return [f"each step measured after a {warmup_s:g} s warm-up at its load (hit rate: {rates})"]


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _calibration_note(report: Mapping[str, Any]) -> str:
    """How many calibrations it took, when one came out disturbed."""
    attempts = report["calibration"].get("attempts", [])
    if len(attempts) <= 1:
        return ""
    again = ", ".join(f"column {k} {sum(k in a for a in attempts)} times" for k in attempts[0])
    return f" (disturbed: measured {again}; each column's least disturbed step kept)"


def _saturation_note(report: Mapping[str, Any]) -> str:
    """How the saturation was found, where it took more than the first offer."""
    saturation = report["saturation"]
    attempts = saturation.get("attempts") or []
    offers = " then ".join(f"{o:g}" for o in dict.fromkeys(a["offered_rps"] for a in attempts))
    rates = saturation.get("steps_rps") or []
    median = (
        f"; the median of {len(rates)} steps at the last offer: "
        + ", ".join(f"{r:g}" for r in rates)
        if len(rates) > 1
        else ""
    )
    if not saturation.get("saturated", True):
        return f" (NOT saturated: it kept up with {offers} req/s; a lower bound{median})"
    return f" (offered {offers} req/s{median})" if len(attempts) > 1 or median else ""
