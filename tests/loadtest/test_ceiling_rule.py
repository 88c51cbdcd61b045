"""When a ceiling step counts as keeping up: everything answered, no backlog."""

from __future__ import annotations

from typing import Any

from loadtest.ceiling import BACKLOG_S, falls_short, format_ceiling, ramp_rates


def step(elapsed: float, completed: int = 100, scheduled: int = 100) -> dict[str, Any]:
    return {
        "duration_s": 10.0,
        "elapsed_s": elapsed,
        "counts": {"completed": completed, "scheduled": scheduled},
    }


def test_keeping_up_and_falling_short() -> None:
    assert not falls_short(step(10.2))
    assert falls_short(step(10.0 + BACKLOG_S + 0.1))  # answers kept coming after the end
    assert falls_short(step(10.2, completed=99))  # a drop, error or shed request


def test_ramp_doubles() -> None:
    assert ramp_rates(50.0, 4) == [50.0, 100.0, 200.0, 400.0]


def test_ceiling_table() -> None:
    row = {
        "offered_rate_rps": 100.0, "scheduled_rate_rps": 98.0, "backlog_s": 0.1,
        "latency_ms": {"p50": 1.0, "p99": 5.0}, "send_lag_ms": {"p99": 2.0},
        "counts": {"completed": 980, "scheduled": 980}, "falls_short": False,
    }  # fmt: skip
    report = {"workers": 2, "ceiling_rps": 98.0, "limited": False, "steps": [row]}
    assert "98.0 req/s or more" in format_ceiling(report)
    short = {**row, "falls_short": True}
    report = {"workers": 2, "ceiling_rps": None, "limited": True, "steps": [short]}
    assert "below 100 req/s" in format_ceiling(report)
