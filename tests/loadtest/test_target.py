"""`fractal loadtest --target`: the derived load and deadlines, the verdict, and the whole
run against the stub server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loadtest.cli import main
from loadtest.report import read_csv
from loadtest.samples import load_samples
from loadtest.target import (
    MAX_CALIBRATIONS,
    MAX_RAISES,
    TargetSpec,
    best_single_column,
    calibrate,
    calibration_disturbed,
    find_saturation,
    format_target,
    saturated,
    saturated_throughput,
    step_disturbed,
    stolen_ms_per_s,
    target_deadlines,
    target_rate,
    verdict,
)
from tests.loadtest.loadtest_stub import StubServer

SPEC = TargetSpec()


def summary(
    hit: float, accuracy: float | None, p99: float = 5.0, first: float | None = None
) -> dict[str, Any]:
    return {
        "deadline_hit_rate": hit,
        "accuracy": accuracy,
        "latency_ms": {"p50": p99 / 2, "p99": p99},
        "stream_first_answer_ms": None if first is None else {"p50": first / 2, "p99": first},
    }


def test_deadlines_and_rate_follow_the_spec() -> None:
    assert target_deadlines({1: 4.0, 2: 6.0, 3: 9.0}, SPEC) == (6.0, 18.0)
    # A deepest column faster than 1.5x column 1 never makes an empty range.
    assert target_deadlines({1: 10.0, 2: 7.0}, SPEC) == (15.0, 15.0)
    assert target_rate(400.0, SPEC) == 280.0


def server_of(capacity_rps: float | list[float], steps: list[str]) -> Any:
    """A saturation step against a server that answers at most `capacity_rps` (or, step
    after step, each capacity of a list)."""
    capacities = iter(capacity_rps) if isinstance(capacity_rps, list) else None

    def step(name: str, offered_rps: float) -> dict[str, Any]:
        steps.append(name)
        capacity = next(capacities) if capacities is not None else capacity_rps
        assert isinstance(capacity, float)
        return {"achieved_rate_rps": min(offered_rps, capacity) * 0.99}

    return step


def test_an_offer_the_server_keeps_up_with_is_raised_until_it_saturates() -> None:
    assert saturated(1000.0, 940.0) and not saturated(1000.0, 960.0)
    steps: list[str] = []
    pauses: list[int] = []
    summary, attempts, rates = find_saturation(
        server_of(1600.0, steps), 1000.0, lambda: pauses.append(1), steps=1
    )
    assert [a["offered_rps"] for a in attempts] == [1000.0, 1500.0, 2250.0]
    assert summary["achieved_rate_rps"] == attempts[-1]["achieved_rps"] == 1584.0
    assert rates == [1584.0]
    assert steps == ["saturate", "saturate-2", "saturate-3"] and len(pauses) == 3
    # An offer the server cannot keep up with is measured once.
    steps.clear()
    _, attempts, _ = find_saturation(server_of(600.0, steps), 1000.0, steps=1)
    assert steps == ["saturate"] and attempts[0]["achieved_rps"] == 594.0
    # A server that keeps up with every offer: the last one is a lower bound, said so.
    _, attempts, _ = find_saturation(server_of(float("inf"), []), 1000.0, steps=1)
    assert len(attempts) == MAX_RAISES + 1 and attempts[-1]["offered_rps"] == 3375.0


def test_the_saturated_throughput_is_the_median_of_steps_at_the_saturating_offer() -> None:
    steps: list[str] = []
    pauses: list[int] = []
    # Kept up with 1000, then 1500 saturated it: three steps there, a fast one among them.
    step = server_of([2000.0, 1425.0, 1313.0, 1121.0], steps)
    _, attempts, rates = find_saturation(step, 1000.0, lambda: pauses.append(1))
    assert steps == ["saturate", "saturate-2", "saturate-2-again-2", "saturate-2-again-3"]
    assert [a["offered_rps"] for a in attempts] == [1000.0, 1500.0, 1500.0, 1500.0]
    assert len(pauses) == 4
    assert rates == pytest.approx([1410.75, 1299.87, 1109.79])
    # One fast step does not set the load; neither does one slow one.
    assert saturated_throughput(rates) == 1299.9
    assert saturated_throughput([1200.0, 600.0, 1210.0]) == 1200.0
    # A first step in a slow spell: the median kept up with the offer, which is raised.
    steps.clear()
    step = server_of([700.0, 2000.0, 2000.0, 1300.0, 1250.0, 1400.0], steps)
    _, attempts, rates = find_saturation(step, 1000.0)
    assert steps[:3] == ["saturate", "saturate-again-2", "saturate-again-3"]
    assert steps[3:] == ["saturate-2", "saturate-2-again-2", "saturate-2-again-3"]
    assert saturated_throughput(rates) == 1287.0
    # The last offer is measured in full even where the server kept up with it.
    steps.clear()
    _, attempts, rates = find_saturation(server_of(float("inf"), steps), 1000.0)
    assert len(steps) == MAX_RAISES + 3 and len(rates) == 3


def test_a_disturbed_calibration_is_measured_again() -> None:
    assert not calibration_disturbed({1: 4.4, 2: 5.3, 3: 4.0, 4: 6.1})
    assert not calibration_disturbed({1: 4.4, 2: 5.3, 3: 4.0, 4: 4.4})
    assert calibration_disturbed({1: 22.7, 2: 13.5, 3: 8.1, 4: 7.7})  # deadlines 34.1-34.1
    seen: list[str] = []

    def step_of(p99_by_attempt: list[dict[int, float]]) -> Any:
        def step(name: str, column: int) -> dict[str, Any]:
            seen.append(name)
            attempt = sum(n.startswith(f"calibrate-column{column}") for n in seen) - 1
            return summary(1.0, None, p99=p99_by_attempt[attempt][column])

        return step

    slow_then_steady = [{1: 22.7, 2: 13.5, 3: 8.1, 4: 7.7}, {1: 4.4, 2: 5.3, 3: 4.0, 4: 6.1}]
    runs, attempts = calibrate(step_of(slow_then_steady), 4)
    assert attempts == [{str(k): v for k, v in a.items()} for a in slow_then_steady]
    assert {k: s["latency_ms"]["p99"] for k, s in runs.items()} == slow_then_steady[1]
    assert seen[:4] == [f"calibrate-column{k}" for k in range(1, 5)]
    assert seen[4:] == [f"calibrate-column{k}-2" for k in range(1, 5)]
    # Steady at once: measured once; never steady: measured MAX_CALIBRATIONS times.
    seen.clear()
    assert len(calibrate(step_of(slow_then_steady[1:]), 4)[1]) == 1
    seen.clear()
    assert len(calibrate(step_of(slow_then_steady[:1] * 3), 4)[1]) == MAX_CALIBRATIONS


def test_a_calibration_step_that_lost_cpu_to_the_hypervisor_is_measured_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def measured(p99: float, steal_ms: float | None) -> dict[str, Any]:
        return {**summary(1.0, None, p99=p99), "duration_s": 10.0, "stalls": {"steal_ms": steal_ms}}

    assert not step_disturbed(measured(5.0, 250.0)) and step_disturbed(measured(28.2, 4070.0))
    assert not step_disturbed(measured(5.0, None))  # the machine does not say: trusted
    assert stolen_ms_per_s(measured(5.0, 470.0)) == 47.0
    seen: list[str] = []
    # Column 4 lost 4 s, then 0.5 s, then 0.3 s: each time again; the least stolen kept.
    plan = {
        "calibrate-column1": measured(4.3, 120.0),
        "calibrate-column2": measured(4.4, 20.0),
        "calibrate-column3": measured(4.8, 40.0),
        "calibrate-column4": measured(28.2, 4070.0),
        "calibrate-column4-2": measured(9.0, 500.0),
        "calibrate-column4-3": measured(7.5, 300.0),
    }

    def step(name: str, column: int) -> dict[str, Any]:
        seen.append(name)
        return plan[name]

    runs, attempts = calibrate(step, 4)
    assert seen == [f"calibrate-column{k}" for k in range(1, 5)] + [
        "calibrate-column4-2",
        "calibrate-column4-3",
    ]
    assert attempts == [{"1": 4.3, "2": 4.4, "3": 4.8, "4": 28.2}, {"4": 9.0}, {"4": 7.5}]
    assert {k: s["latency_ms"]["p99"] for k, s in runs.items()} == {1: 4.3, 2: 4.4, 3: 4.8, 4: 7.5}
    # A step that lost more CPU than the one before it is not kept.
    seen.clear()
    plan["calibrate-column4-2"] = measured(5.5, 200.0)
    plan["calibrate-column4"] = measured(28.2, 400.0)
    runs, attempts = calibrate(step, 4)
    assert len(attempts) == 2 and runs[4]["latency_ms"]["p99"] == 5.5
    plan["calibrate-column4-2"] = measured(40.0, 900.0)
    plan["calibrate-column4-3"] = measured(35.0, 600.0)
    caplog.clear()
    runs, attempts = calibrate(step, 4)
    assert len(attempts) == MAX_CALIBRATIONS and runs[4]["latency_ms"]["p99"] == 28.2
    assert "still disturbed (CPU stolen in the steps of columns [4])" in caplog.text


def test_the_printed_report_says_how_saturation_was_found() -> None:
    def report(attempts: list[tuple[float, float]]) -> dict[str, Any]:
        offered, achieved = attempts[-1]
        return {
            "calibration": {"rate_rps": 50.0, "p99_ms": {"1": 3.0}},
            "saturation": {
                "column": 4,
                "achieved_rps": achieved,
                "saturated": saturated(offered, achieved),
                "attempts": [{"offered_rps": o, "achieved_rps": a} for o, a in attempts],
            },
            "load": {"rate_rps": 0.7 * achieved, "deadline": "uniform:5:10"},
            "runs": {},
            "verdict": {},
        }

    assert "800.0 answers/s\n" in format_target(report([(1000.0, 800.0)]))
    repeated = report([(1000.0, 800.0)])
    repeated["saturation"]["steps_rps"] = [800.0, 760.0, 820.0]
    assert (
        "800.0 answers/s (offered 1000 req/s; the median of 3 steps at the last offer: "
        "800, 760, 820)" in format_target(repeated)
    )
    assert "(offered 1000 then 1500 req/s)" in format_target(
        report([(1000.0, 990.0), (1500.0, 1100.0)])
    )
    assert "NOT saturated: it kept up with 1000 then 1500" in format_target(
        report([(1000.0, 990.0), (1500.0, 1490.0)])
    )
    recalibrated = report([(1000.0, 800.0)])
    assert "measured" not in format_target(recalibrated)
    recalibrated["calibration"]["attempts"] = [{"1": 9.0, "4": 6.0}, {"1": 3.0, "4": 6.0}]
    assert "1: 3.0 (disturbed: measured column 1 2 times, column 4 2 times;" in format_target(
        recalibrated
    )


def test_best_single_column_reaching_a_hit_rate() -> None:
    columns = {1: summary(1.0, 0.6), 2: summary(0.999, 0.7), 3: summary(0.9, 0.8)}
    assert best_single_column(columns, 0.995) == (2, 0.7)
    assert best_single_column(columns, 1.0) == (1, 0.6)
    assert best_single_column({1: summary(0.5, 0.6)}, 0.9) is None


def test_verdict_each_target() -> None:
    columns = {1: summary(1.0, 0.6, p99=4.0), 2: summary(0.97, 0.8, p99=9.0)}
    good = verdict(summary(0.997, 0.65), summary(0.99, 0.7, first=5.5), columns, SPEC)
    assert all(v["met"] for v in good.values())
    assert good["accuracy"]["best_single_column"] == 1 and good["accuracy"]["bound"] == 0.6
    assert good["stream_first_answer_p99_ms"]["bound"] == 6.0
    # Within one standard error of the bound is a tie (no answers counted here: none).
    columns[1]["accuracy_checked"] = 2500  # standard error 0.0098
    tie = verdict(summary(0.997, 0.595), summary(0.99, 0.7, first=5.5), columns, SPEC)
    assert tie["accuracy"]["met"] and tie["accuracy"]["standard_error"] == pytest.approx(0.0098)
    # The answers were for 200 distinct images: the error is that of 200 images.
    columns[1]["accuracy_images"] = 200  # standard error 0.0346
    few = verdict(summary(0.997, 0.57), summary(0.99, 0.7, first=5.5), columns, SPEC)
    assert few["accuracy"]["met"] and few["accuracy"]["standard_error"] == pytest.approx(0.0346)
    assert not verdict(summary(0.997, 0.56), summary(0.99, 0.7), columns, SPEC)["accuracy"]["met"]
    del columns[1]["accuracy_images"]
    bad = verdict(summary(0.99, 0.55), summary(0.99, 0.7, first=6.5), columns, SPEC)
    assert not any(v["met"] for v in bad.values())
    # At a hit rate no single column reaches, there is no accuracy to fall short of.
    alone = verdict(summary(1.0, 0.5), summary(1.0, 0.5, first=1.0), {1: summary(0.9, 0.6)}, SPEC)
    assert alone["accuracy"]["met"] and alone["accuracy"]["bound"] is None


def test_target_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = {s.data: s.label for s in load_samples()}
    out = tmp_path / "target"
    with StubServer(column_ms=(2.0, 12.0), labels=labels) as stub:
        code = main(
            ["--url", stub.url, "--target", "--rate", "30", "--saturate-rate", "80",
             "--duration", "0.6", "--warmup", "0.3", "--workers", "1", "--no-plots",
             "--out", str(out)]
        )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "hit_rate:" in printed and "stream_first_answer_p99_ms:" in printed
    report = json.loads((out / "target.json").read_text())
    p99 = report["calibration"]["p99_ms"]
    assert set(p99) == {"1", "2"} and p99["1"] < p99["2"]
    assert report["load"]["rate_rps"] == pytest.approx(
        0.7 * report["saturation"]["achieved_rps"], abs=0.1
    )
    low, high = target_deadlines({1: p99["1"], 2: p99["2"]}, SPEC)
    assert report["load"]["deadline"] == f"uniform:{low:g}:{high:g}"
    assert set(report["runs"]) == {"auto", "stream", "column 1", "column 2"}
    assert report["runs"]["stream"]["stream_first_answer_ms"]["p99"] is not None
    assert "stalls  misses near  stolen ms" in printed
    for run in report["runs"].values():
        counts = run["counts"]
        assert counts["scheduled"] == counts["sent"] + counts["dropped"] > 0
        assert run["stalls"]["misses"] == counts["scheduled"] - counts["deadline_met"]
    attempts = report["saturation"]["attempts"]
    rates = report["saturation"]["steps_rps"]
    assert rates == [a["achieved_rps"] for a in attempts[-3:]]
    assert len({a["offered_rps"] for a in attempts[-3:]}) == 1
    assert report["saturation"]["achieved_rps"] == pytest.approx(sorted(rates)[1], abs=0.05)
    saturate = {p.stem for p in (out / "runs").glob("saturate*") if "warmup" not in p.stem}
    assert len(saturate) == len(attempts) and "saturate" in saturate
    assert any(name.endswith("-again-3") for name in saturate)
    # A calibration step may be measured again where the machine lost CPU during it.
    calibrated = {p.stem for p in (out / "runs").glob("calibrate*") if "warmup" not in p.stem}
    assert {"calibrate-column1", "calibrate-column2"} <= calibrated
    assert len(calibrated) == sum(len(a) for a in report["calibration"]["attempts"])
    steps = {*calibrated, *saturate, "auto", "stream"}
    steps |= {"column1", "column2"}
    assert {p.stem for p in (out / "runs").iterdir()} == steps | {f"{s}-warmup" for s in steps}
    # Each step: a warm-up recorded apart, then the measured part, timed from its start.
    assert report["load"]["warmup_s"] == 0.3 and "after a 0.3 s warm-up" in printed
    for run in report["runs"].values():
        assert run["warmup"]["duration_s"] == 0.3 and run["warmup"]["scheduled"] > 0
    rows = read_csv(out / "runs" / "auto.csv")
    assert [r.index for r in rows] == list(range(len(rows)))
    assert rows and all(0.0 <= r.scheduled_s < 0.6 for r in rows)
    warm = read_csv(out / "runs" / "auto-warmup.csv")
    assert warm and all(r.scheduled_s < 0.3 for r in warm)
    assert set(report["verdict"]) == {"hit_rate", "accuracy", "stream_first_answer_p99_ms"}
