"""`fractal loadtest` end to end against the stub server: files, tables, sweep, ceiling."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from loadtest import cli, sweep
from loadtest.affinity import parse_cpu_list
from loadtest.cli import main
from loadtest.report import read_csv, summarize
from loadtest.samples import load_samples
from tests.loadtest.loadtest_stub import StubServer

LABELS = {s.data: s.label for s in load_samples()}


def test_single_run_writes_consistent_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    with StubServer(column_ms=(2.0, 30.0), labels=LABELS) as stub:
        code = main(
            ["--url", stub.url, "--rate", "40", "--duration", "1.5", "--workers", "2",
             "--deadline", "mixture:0.5*fixed:1,0.5*uniform:10:80", "--seed", "5",
             "--out", str(out)]
        )  # fmt: skip
    assert code == 0
    assert "deadline hit rate" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {
        "summary.json", "results.csv", "latency_cdf.png", "accuracy_vs_deadline.png",
    }  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    results = read_csv(out / "results.csv")
    counts = summary["counts"]
    assert counts["scheduled"] == len(results) > 30
    assert counts["scheduled"] == counts["sent"] + counts["dropped"]
    assert counts["sent"] == counts["completed"] + counts["shed"] + counts["errors"]
    assert counts["shed"] > 0 and counts["completed"] > 0  # fixed:1 is below any column
    assert summary["run"]["deadline"] == "mixture:0.5*fixed:1,0.5*uniform:10:80"
    recomputed = json.loads(json.dumps(summarize(results, 40.0, 1.5, summary["stalls"])))
    assert {k: v for k, v in summary.items() if k != "run"} == recomputed
    assert summary["deadline_hit_rate"] == pytest.approx(
        sum(r.deadline_met for r in results) / len(results), abs=1e-6
    )
    assert set(summary["columns_served"]) <= {"1", "2"}


def test_sweep_covers_every_mode_and_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sweep, "SETTLE_S", 0.0)
    out = tmp_path / "sweep"
    with StubServer(column_ms=(2.0, 30.0), labels=LABELS) as stub:
        code = main(
            ["--url", stub.url, "--rate", "30", "--duration", "0.6", "--workers", "1",
             "--sweep", "--deadlines", "60,10", "--out", str(out)]
        )  # fmt: skip
    assert code == 0
    assert "column 2" in capsys.readouterr().out
    payload = json.loads((out / "sweep.json").read_text())
    assert payload["run"]["columns"] == 2 and payload["run"]["deadlines_ms"] == [10.0, 60.0]
    points = {(p["mode"], p["deadline_ms"]): p for p in payload["points"]}
    assert set(points) == {(m, d) for m in ("auto", "column 1", "column 2") for d in (10, 60)}
    # Column 2 needs 30 ms: shed at 10 ms, right at 60 ms; column 1 always says "frog"
    # (right for one image in ten).
    assert points[("column 2", 10)]["deadline_hit_rate"] == 0.0
    assert points[("column 2", 10)]["accuracy"] is None
    assert points[("column 2", 60)]["accuracy"] == 1.0
    frogs = points[("column 1", 60)]["counts"]["completed"]
    assert points[("column 1", 60)]["accuracy"] < 0.5 and frogs > 0
    assert points[("auto", 10)]["columns_served"] == {
        "1": points[("auto", 10)]["counts"]["completed"]
    }
    assert set(points[("auto", 60)]["columns_served"]) == {"2"}
    assert (out / "sweep.png").stat().st_size > 10_000
    assert len(list((out / "points").glob("*.csv"))) == 6


def test_ceiling_ramp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with StubServer() as stub:
        code = main(
            ["--url", stub.url, "--ceiling", "--rate", "20", "--steps", "2", "--duration", "0.5",
             "--workers", "1", "--out", str(tmp_path)]
        )  # fmt: skip
    assert code == 0
    assert "generator ceiling" in capsys.readouterr().out
    report = json.loads((tmp_path / "ceiling.json").read_text())
    assert 1 <= len(report["steps"]) <= 2
    assert report["steps"][0]["offered_rate_rps"] == 20
    kept_up = [s["scheduled_rate_rps"] for s in report["steps"] if not s["falls_short"]]
    assert report["ceiling_rps"] == (max(kept_up) if kept_up else None)


def test_bad_arguments_and_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--url", "http://127.0.0.1:9", "--deadline", "fixed:-1"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["--url", "http://127.0.0.1:9", "--sweep", "--deadlines", "5,x"])
    with pytest.raises(SystemExit) as exc:
        main(["--url", "http://127.0.0.1:9", "--target", "--saturate-steps", "0"])
    assert exc.value.code == 2
    with StubServer() as stub:
        url = stub.url
    assert main(["--url", url, "--duration", "0.2", "--timeout", "2"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_cpu_list_parsing() -> None:
    usable = sorted(os.sched_getaffinity(0))
    first = usable[0]
    assert parse_cpu_list(str(first)) == {first}
    assert parse_cpu_list(f" {first} , {first}-{first}") == {first}
    for bad in ("", "x", "1-0", "-1", "0-", "0;1"):
        with pytest.raises(ValueError, match="bad CPU"):
            parse_cpu_list(bad)
    with pytest.raises(ValueError, match="not among"):
        parse_cpu_list(str(max(usable) + 1))


def test_cpus_pins_the_generator_for_the_run_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = os.sched_getaffinity(0)
    cpu = min(before)
    seen: list[set[int]] = []
    real = cli.run_probed

    def probed(*args: Any, **kwargs: Any) -> Any:
        seen.append(os.sched_getaffinity(0))
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "run_probed", probed)
    with StubServer(column_ms=(1.0,), labels=LABELS) as stub:
        code = main(
            ["--url", stub.url, "--rate", "20", "--duration", "0.3", "--workers", "1",
             "--cpus", str(cpu), "--no-plots", "--out", str(tmp_path)]
        )  # fmt: skip
    assert code == 0
    assert seen == [{cpu}]
    assert os.sched_getaffinity(0) == before
    assert json.loads((tmp_path / "summary.json").read_text())["run"]["cpus"] == [cpu]
    with pytest.raises(SystemExit) as exc:
        main(["--url", stub.url, "--cpus", str(max(before) + 1)])
    assert exc.value.code == 2
