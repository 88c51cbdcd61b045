"""`fractal bench` end to end on the tiny bundle: wrk against real servers, the floor beside
the deepest column's saturated run, and the printed table. Timing figures are not judged
(a benchmark prints them); only that every figure exists and adds up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.bench import main


@pytest.mark.slow
def test_bench_runs_end_to_end(
    tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    code = main(
        ["--model", str(tiny_bundle), "--seconds", "1", "--repeats", "5",
         "--connections", "8", "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    columns = 4
    assert set(report["floor"]) == {f"column_{k}" for k in range(1, columns + 1)}
    assert set(report["low_load"]) == set(report["floor"])
    for mode in ("saturated_batched", "saturated_unbatched"):
        assert set(report[mode]) == {"column_1", f"column_{columns}"}
        for run in report[mode].values():
            assert run["requests_per_s"] > 0 and run["non_2xx"] == 0
            # the event loop is one thread of the server process
            assert 0 < run["event_loop_cpu_ms_per_request"] <= run["server_cpu_ms_per_request"]
    assert report["saturated_unbatched"]["column_1"]["mean_batch_size"] == pytest.approx(1.0)
    assert all(f["batch_gain"] >= 1.0 for f in report["floor"].values())  # best vs batch 1
    assert all(f["after_idle_p50_ms"] > 0 for f in report["floor"].values())
    beside = report["deepest_floor_beside"]
    assert beside["before"] > 0 and beside["after"] > 0
    printed = capsys.readouterr().out
    assert "## server at low load" in printed and "p50 overhead over floor ms" in printed
    assert "over the floor after idle ms" in printed and "event loop CPU ms/request" in printed
    assert "(floor measured beside the run:" in printed
    assert "in-process, best batch / batch 1 = " in printed
