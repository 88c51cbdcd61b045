"""The machine-stall probe: a real probe process stopped by a signal, and the pure report."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest.generator import Result
from loadtest.report import format_table, summarize
from loadtest.stalls import Stall, StallProbe, stall_report, steal_since, stolen_ms


def result(index: int, at_s: float, deadline_ms: float, met: bool) -> Result:
    r = Result(index, 0, at_s, "cat", deadline_ms, send_s=at_s)
    r.status, r.latency_ms, r.deadline_met = (
        (200, deadline_ms / 2, True) if met else (503, 1.0, False)
    )
    return r


def test_a_stopped_probe_reports_the_stall() -> None:
    with StallProbe(threshold_ms=20.0) as probe:
        probe.start_at(time.monotonic())
        time.sleep(0.05)  # an undisturbed stretch: the probe sees no stall
        os.kill(probe._proc.pid, signal.SIGSTOP)  # the machine stops running it
        time.sleep(0.15)
        os.kill(probe._proc.pid, signal.SIGCONT)
        time.sleep(0.05)
    longest = max(s.ms for s in probe.stalls)
    assert 120.0 <= longest <= 1000.0
    report = probe.report([])
    assert report["count"] == len(probe.stalls) >= 1
    assert report["longest_ms"] == pytest.approx(longest, abs=0.1)
    assert any(0.1 <= at <= 1.0 for at in report["at_s"])


def test_misses_are_counted_near_a_stall_or_its_aftermath() -> None:
    origin = 100.0
    stalls = [Stall(end_s=origin + 1.0, ms=50.0)]  # from 0.95 s to 1.0 s, aftermath to 1.1 s
    results = [
        result(0, 0.90, 30.0, met=False),  # in flight until 0.93: before the stall
        result(1, 0.93, 30.0, met=False),  # in flight until 0.96: overlaps the stall
        result(2, 1.05, 20.0, met=False),  # inside the aftermath
        result(3, 1.11, 20.0, met=False),  # after the aftermath
        result(4, 0.97, 30.0, met=True),  # a hit is never counted
    ]
    report = stall_report(results, stalls, origin, steal_ms=3.0)
    assert report["misses"] == 4
    assert report["misses_near_stalls"] == 2
    assert report["count"] == 1 and report["longest_ms"] == 50.0 and report["total_ms"] == 50.0
    assert report["at_s"] == [1.0] and report["steal_ms"] == 3.0


def test_the_summary_keeps_the_stall_report_and_prints_it() -> None:
    results = [result(0, 0.0, 10.0, met=False), result(1, 0.1, 10.0, met=True)]
    stalls = stall_report(results, [Stall(0.005, 30.0)], origin_s=0.0)
    summary = summarize(results, 2.0, 1.0, stalls)
    assert summary["stalls"] == stalls
    table = format_table(summary)
    assert "machine stalls >= 20 ms: count, longest (ms)  1, 30" in table
    assert "misses during or just after one" in table and "1 of 1" in table
    assert "stolen by the hypervisor" not in table  # not known: not printed
    stolen = stall_report(results, [], origin_s=0.0, steal_ms=1450.0)
    assert "CPU time stolen by the hypervisor (ms)" in format_table(
        summarize(results, 2.0, 1.0, stolen)
    )
    assert summarize(results, 2.0, 1.0)["stalls"] is None


def test_steal_time_is_read_where_the_kernel_reports_it() -> None:
    stolen = stolen_ms()
    if os.path.exists("/proc/stat"):
        assert stolen is not None and stolen >= 0.0
    else:
        assert stolen is None


def test_the_steal_time_of_a_report_starts_where_the_report_does() -> None:
    """A warm-up left out of a report takes its stolen CPU time along."""
    readings = [(10.0, 100.0), (10.1, 104.0), (10.2, 104.5), (10.3, 110.0)]
    assert steal_since(readings, 0.0) == 10.0
    assert steal_since(readings, 10.15) == 5.5  # from the 10.2 s reading on
    assert steal_since(readings, 10.3) is None and steal_since([], 0.0) is None


def test_the_probe_reads_the_steal_time_through_the_run() -> None:
    with StallProbe() as probe:
        probe.start_at(time.monotonic())
        time.sleep(0.35)
    if stolen_ms() is None:
        assert probe.steal_ms is None and probe.steal_readings == []
        return
    times = [at_s for at_s, _ in probe.steal_readings]
    assert len(times) >= 4 and times == sorted(times)  # start, every 0.1 s, end
    assert probe.steal_ms is not None and probe.steal_ms >= 0.0
    assert probe.report([], skip_s=0.2)["steal_ms"] is not None


def test_the_probe_ends_when_the_harness_is_killed() -> None:
    """A harness killed without its clean-up (SIGKILL, or SIGTERM's default) leaves no
    probe behind spinning on the CPUs that later runs measure."""
    code = (
        "import time\n"
        "from loadtest.stalls import StallProbe\n"
        "probe = StallProbe().__enter__()\n"
        "print(probe._proc.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    harness = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert harness.stdout is not None
    child = int(harness.stdout.readline())
    assert running(child)
    harness.kill()
    harness.wait(timeout=10)
    deadline = time.monotonic() + 10.0
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    if running(child):
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the probe outlived its harness")


def running(pid: int) -> bool:
    """Whether a process runs (an exited one not yet reaped, a zombie, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
