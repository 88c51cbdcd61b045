"""Summary math on a hand-made results list, including the hit-rate definition."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.generator import Result, split_warmup
from loadtest.report import (
    deadline_bins,
    format_table,
    late_answers,
    read_csv,
    summarize,
    write_csv,
)


def ok(index: int, latency: float, deadline: float | None, column: int, right: bool) -> Result:
    r = Result(index, 0, index * 0.1, "cat", deadline, send_s=index * 0.1 + 0.001)
    r.status, r.latency_ms, r.column = 200, latency, column
    r.predicted = "cat" if right else "dog"
    r.correct = right
    r.deadline_met = deadline is None or latency <= deadline
    return r


def synthetic() -> list[Result]:
    results = [
        ok(0, 10.0, 20.0, 1, False),  # in time, wrong
        ok(1, 15.0, 20.0, 2, True),  # in time, right
        ok(2, 30.0, 20.0, 2, True),  # late, right
        ok(3, 40.0, 50.0, 3, True),  # in time, right
        ok(4, 5.0, None, 1, True),  # no deadline: a 2xx answer is a hit
    ]
    shed = Result(5, 0, 0.5, "cat", 10.0, send_s=0.501, status=503, latency_ms=2.0,
                  error="shed:deadline")  # fmt: skip
    failed = Result(6, 1, 0.6, "cat", 10.0, send_s=0.6, status=500, latency_ms=1.0, error="500")
    timeout = Result(7, 1, 0.7, "cat", 10.0, send_s=0.7, latency_ms=9000.0, error="timeout")
    dropped = Result(8, 1, 0.8, "cat", 10.0, dropped=True)
    dropped2 = Result(9, 1, 0.9, "cat", 10.0, dropped=True)
    return [*results, shed, failed, timeout, dropped, dropped2]


def test_counts_add_up() -> None:
    s = summarize(synthetic(), offered_rate_rps=10.0, duration_s=1.0)
    c = s["counts"]
    assert c == {
        "scheduled": 10, "sent": 8, "completed": 5, "dropped": 2, "shed": 1, "errors": 2,
        "deadline_met": 3 + 1,
    }  # fmt: skip
    assert c["scheduled"] == c["sent"] + c["dropped"]
    assert c["sent"] == c["completed"] + c["shed"] + c["errors"]


def test_hit_rate_counts_every_scheduled_request() -> None:
    s = summarize(synthetic(), offered_rate_rps=10.0, duration_s=1.0)
    # Hits: #0, #1, #3 (in time) and #4 (no deadline). Late, shed, failed, timed out and
    # dropped requests are all misses, and all ten are in the denominator.
    assert s["deadline_hit_rate"] == pytest.approx(4 / 10)
    assert s["shed_rate"] == pytest.approx(1 / 10)
    assert s["drop_rate"] == pytest.approx(2 / 10)
    assert s["error_rate"] == pytest.approx(2 / 10)
    assert s["correct_in_time_rate"] == pytest.approx(3 / 10)  # 1, 3, 4


def test_accuracy_overall_and_per_column() -> None:
    s = summarize(synthetic(), offered_rate_rps=10.0, duration_s=1.0)
    assert s["accuracy"] == pytest.approx(4 / 5)
    assert s["columns_served"] == {"1": 2, "2": 2, "3": 1}
    by = s["accuracy_by_column"]
    assert by["1"]["accuracy"] == pytest.approx(0.5)
    assert by["2"]["accuracy"] == 1.0 and by["3"]["accuracy"] == 1.0
    assert sum(v["answers"] for v in by.values()) == s["counts"]["completed"]
    assert s["accuracy_checked"] == 5 and s["accuracy_images"] is None  # rows without images
    images = synthetic()
    for r, image in zip(images[:5], (7, 3, 7, 7, 3), strict=True):
        r.image = image
    assert summarize(images, 10.0, 1.0)["accuracy_images"] == 2


def test_latency_percentiles_use_completed_answers_only() -> None:
    s = summarize(synthetic(), offered_rate_rps=10.0, duration_s=1.0)
    # Completed latencies: 5, 10, 15, 30, 40 (numpy's linear interpolation).
    assert s["latency_ms"]["p50"] == pytest.approx(15.0)
    assert s["latency_ms"]["p99"] == pytest.approx(39.6)
    assert s["stream_first_answer_ms"] is None


def test_rates() -> None:
    results = synthetic()
    s = summarize(results, offered_rate_rps=10.0, duration_s=1.0)
    assert s["scheduled_rate_rps"] == pytest.approx(10.0)
    # The timed-out request ends 9 s after its scheduled time: the window stretches to it.
    assert s["achieved_rate_rps"] == pytest.approx(5 / 9.7, abs=1e-3)
    assert s["send_lag_ms"]["max"] == pytest.approx(1.0)
    assert s["error_kinds"] == {"500": 1, "timeout": 1}


def test_stream_first_answer_percentiles() -> None:
    results = synthetic()
    for r, first in zip(results[:4], (3.0, 4.0, 5.0, 6.0), strict=False):
        r.first_answer_ms = first
    s = summarize(results, offered_rate_rps=10.0, duration_s=1.0)
    assert s["stream_first_answer_ms"]["p50"] == pytest.approx(4.5)


def test_empty_and_all_dropped_runs() -> None:
    s = summarize([Result(0, 0, 0.0, "cat", 5.0, dropped=True)], 1.0, 1.0)
    assert s["deadline_hit_rate"] == 0.0 and s["accuracy"] is None
    assert s["latency_ms"]["p50"] is None
    assert "dropped" in format_table(s)


def test_deadline_bins() -> None:
    bins = deadline_bins(synthetic(), bins=2)
    assert sum(b["requests"] for b in bins) == 9  # #4 had no deadline
    low, high = bins
    assert (low["low_ms"], high["high_ms"]) == (10.0, 50.0)
    assert high["requests"] == 1 and high["hit_rate"] == 1.0
    assert low["hit_rate"] == pytest.approx(2 / 8)
    assert deadline_bins([Result(0, 0, 0.0, "cat", None)]) == []


def test_late_answers_split_by_where_the_time_went() -> None:
    results = synthetic()
    # #2: 30 ms against a 20 ms deadline, sent 1 ms after its scheduled time, so the
    # server was given 19 ms.
    results[2].server_ms = 19.5
    assert late_answers(results) == {
        "total": 1, "late_by_server_clock": 1, "late_outside_server": 0, "unknown": 0
    }  # fmt: skip
    results[2].server_ms = 18.0
    assert late_answers(results)["late_outside_server"] == 1
    results[2].server_ms = None
    assert late_answers(results)["unknown"] == 1


def test_time_outside_the_server() -> None:
    results = synthetic()
    for r, server in zip(results[:4], (8.0, 11.0, 18.0, 30.0), strict=True):
        r.server_ms = server
    s = summarize(results, 10.0, 1.0)
    # Outside: 2, 4, 12, 10 ms (#4 has no server time and is left out).
    assert s["outside_server_ms"]["p50"] == pytest.approx(7.0)
    assert s["late_answers"]["late_outside_server"] == 1
    table = format_table(s)
    assert "time outside the server" in table and "by the server's clock" in table


def test_server_time_split() -> None:
    results = synthetic()
    assert summarize(results, 10.0, 1.0)["server_split_ms"] is None
    # #0 and #1 in time, #2 late (30 ms against 20); #3 has no split and is left out.
    for r, (server, queue, run) in zip(
        results[:4],
        ((8.0, 1.0, 2.0), (11.0, 3.0, 2.0), (18.0, 9.0, 4.0), (20.0, None, None)),
        strict=True,
    ):
        r.server_ms, r.queue_ms, r.inference_ms = server, queue, run
    s = summarize(results, 10.0, 1.0)
    assert s["server_split_ms"]["queue"]["p50"] == pytest.approx(3.0)
    assert s["server_split_ms"]["rest"]["p50"] == pytest.approx(5.0)  # of 5, 6, 5
    assert s["late_server_split_ms"] == {
        "queue": {"p50": 9.0}, "inference": {"p50": 4.0}, "rest": {"p50": 5.0}
    }  # fmt: skip
    assert "late answers' p50" in format_table(s)


def test_a_warm_up_is_split_off_and_the_rest_retimed() -> None:
    """Scheduled before `warmup_s`: the warm-up, as it was. The rest: indices from 0 and
    scheduled and send times from the warm-up's end; latencies unchanged."""
    results = synthetic()  # scheduled at 0.0, 0.1, ... 0.9 s
    warm, measured = split_warmup(results, 0.25)
    assert [r.index for r in warm] == [0, 1, 2] and warm == results[:3]
    assert [r.index for r in measured] == list(range(7))
    assert [r.scheduled_s for r in measured] == pytest.approx([0.05 + 0.1 * i for i in range(7)])
    assert measured[0].send_s == pytest.approx(results[3].send_s - 0.25)  # type: ignore[operator]
    assert [r.latency_ms for r in measured] == [r.latency_ms for r in results[3:]]
    assert summarize(measured, 10.0, 0.7)["counts"]["scheduled"] == 7
    # No warm-up: everything is measured, as it was.
    assert split_warmup(results, 0.0) == ([], results)


def test_csv_round_trip(tmp_path: Path) -> None:
    results = synthetic()
    results[0].first_answer_ms = 3.25
    results[1].server_ms = 7.125
    results[1].queue_ms, results[1].inference_ms = 0.5, 2.25
    results[2].image = 17
    path = tmp_path / "results.csv"
    write_csv(path, results)
    back = read_csv(path)
    assert back == results
    assert summarize(back, 10.0, 1.0) == summarize(results, 10.0, 1.0)


def test_table_shows_the_key_figures() -> None:
    table = format_table(summarize(synthetic(), offered_rate_rps=10.0, duration_s=1.0))
    for text in ("deadline hit rate", "0.4", "shed (503)", "column 2", "p99"):
        assert text in table
