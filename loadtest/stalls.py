"""Stalls of the machine during a run, seen by a process that does nothing but sleep.

A load test that shares its machine with the server (and, on a shared host, with other
tenants) can miss deadlines for reasons neither the server nor the generator controls:
the whole machine, or the server's process, stops for tens of milliseconds. Misses then
come in bursts. To tell those apart from the server's own misses, a probe process sleeps
1 ms at a time and records every wake-up that came `threshold_ms` or more late; the kernel
wakes a sleeping process within a few milliseconds even when both CPUs are busy (measured
here with a training run on both cores: no gap over 10 ms in two minutes), so a longer
gap means the machine itself did not run it. Where the kernel reports it (`/proc/stat`,
Linux), the CPU time stolen by the hypervisor during the run is recorded too.

`stall_report` (pure) then counts the misses whose time in flight overlapped a stall or
its aftermath: a stall leaves a backlog that later requests wait behind.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only the stdlib at import: the probe process starts fast
    from loadtest.generator import Plan, Result, Target
    from loadtest.samples import Sample

SLEEP_S = 0.001
DEFAULT_THRESHOLD_MS = 20.0
READY_TIMEOUT_S = 30.0
AFTERMATH_S = 0.1
"""After a stall, how long its backlog is taken to delay later requests."""
STEAL_EVERY_S = 0.1
"""How often the probe reads the stolen CPU time (so that a report can start late)."""


@dataclass(frozen=True)
class Stall:
    end_s: float
    """time.monotonic() at the late wake-up (system-wide on Linux, shared by processes)."""
    ms: float
    """How much later than asked the probe woke."""

    @property
    def start_s(self) -> float:
        return self.end_s - self.ms / 1000.0


def _watch(threshold_ms: float, ready: Any, stop: Any, out: Any) -> None:
    stalls: list[tuple[float, float]] = []
    steal: list[tuple[float, float]] = []
    parent = os.getppid()
    ready.set()
    before = next_steal = time.monotonic()
    while not stop.is_set():
        time.sleep(SLEEP_S)
        now = time.monotonic()
        late_ms = (now - before - SLEEP_S) * 1000.0
        if late_ms >= threshold_ms:
            stalls.append((now, late_ms))
        if now >= next_steal:
            if os.getppid() != parent:
                return  # the harness was killed: an orphaned probe would spin on forever
            stolen = stolen_ms()
            if stolen is not None:
                steal.append((now, stolen))
            next_steal = now + STEAL_EVERY_S
        before = now
    out.send((stalls, steal))


def stolen_ms() -> float | None:
    """CPU time the hypervisor took from this machine since boot, all CPUs summed (ms);
    None where the kernel does not say."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) * 1000.0 / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def steal_since(readings: Sequence[tuple[float, float]], origin_s: float) -> float | None:
    """The stolen ms from the first reading at or after `origin_s` to the last one
    (readings: (time.monotonic(), `stolen_ms()`) in time order); None with fewer than two."""
    after = [ms for at_s, ms in readings if at_s >= origin_s]
    return round(after[-1] - after[0], 1) if len(after) >= 2 else None


@dataclass
class StallProbe:
    """`with StallProbe() as probe:` around a run; then `probe.stalls`, `probe.steal_ms`.
    `run_load(..., on_start=probe.start_at)` tells it when the schedule starts."""

    threshold_ms: float = DEFAULT_THRESHOLD_MS
    origin_s: float | None = None
    stalls: list[Stall] = field(default_factory=list)
    steal_readings: list[tuple[float, float]] = field(default_factory=list)
    """(time.monotonic(), stolen ms since boot): at the start, every `STEAL_EVERY_S`, at
    the end."""
    _proc: Any = None
    _stop: Any = None
    _conn: Any = None

    @property
    def steal_ms(self) -> float | None:
        """CPU time stolen by the hypervisor during the whole run (None: not reported)."""
        return steal_since(self.steal_readings, 0.0)

    def start_at(self, origin_s: float) -> None:
        self.origin_s = origin_s

    def report(self, results: Sequence[Result], skip_s: float = 0.0) -> dict[str, Any]:
        """The report for `results` timed from `skip_s` into the run (a warm-up left out:
        the stalls before it too)."""
        origin = (self.origin_s if self.origin_s is not None else 0.0) + skip_s
        stalls = [s for s in self.stalls if s.end_s >= origin]
        steal = steal_since(self.steal_readings, origin)
        return stall_report(results, stalls, origin, steal, self.threshold_ms)

    def __enter__(self) -> StallProbe:
        ctx = mp.get_context("spawn")
        ready, self._stop = ctx.Event(), ctx.Event()
        self._conn, child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=_watch, args=(self.threshold_ms, ready, self._stop, child), daemon=True
        )
        self._proc.start()
        ready.wait(READY_TIMEOUT_S)
        self._read_steal()
        return self

    def _read_steal(self) -> None:
        stolen = stolen_ms()
        if stolen is not None:
            self.steal_readings.append((time.monotonic(), stolen))

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._conn.poll(10.0):
            stalls, readings = self._conn.recv()
            self.stalls = [Stall(at_s, ms) for at_s, ms in stalls]
            self.steal_readings = sorted(self.steal_readings + readings)
        self._read_steal()  # the probe has stopped reading: this one is the last
        self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.terminate()


def stall_report(
    results: Sequence[Result],
    stalls: Sequence[Stall],
    origin_s: float,
    steal_ms: float | None = None,
    threshold_ms: float = DEFAULT_THRESHOLD_MS,
    aftermath_s: float = AFTERMATH_S,
) -> dict[str, Any]:
    """The stalls of a run (times relative to the schedule's start) and how many of its
    deadline misses overlapped one: a miss whose time in flight, from its scheduled time
    to its deadline (or its answer when it had none), met a stall or the `aftermath_s`
    after it."""
    spans = [(s.start_s - origin_s, s.end_s - origin_s + aftermath_s) for s in stalls]
    misses = [r for r in results if not r.deadline_met]

    def near(r: Result) -> bool:
        budget_s = (r.deadline_ms if r.deadline_ms is not None else r.latency_ms or 0.0) / 1e3
        begin, end = r.scheduled_s, r.scheduled_s + budget_s
        return any(begin <= hi and lo <= end for lo, hi in spans)

    return {
        "threshold_ms": threshold_ms,
        "count": len(stalls),
        "longest_ms": round(max((s.ms for s in stalls), default=0.0), 1),
        "total_ms": round(sum(s.ms for s in stalls), 1),
        "at_s": [round(s.end_s - origin_s, 3) for s in stalls],
        "steal_ms": steal_ms,
        "misses": len(misses),
        "misses_near_stalls": sum(near(r) for r in misses),
    }


def run_probed(
    target: Target,
    plan: Plan,
    samples: Sequence[Sample],
    concurrency: int,
    workers: int,
    warmup_s: float = 0.0,
) -> tuple[list[Result], dict[str, Any], list[Result]]:
    """`run_load` with a `StallProbe` around it: the results after the plan's first
    `warmup_s` (re-timed from there: `split_warmup`), their stall report, and the
    warm-up's results."""
    from loadtest.generator import run_load, split_warmup

    with StallProbe() as probe:
        results = run_load(target, plan, samples, concurrency, workers, probe.start_at)
    warm, measured = split_warmup(results, warmup_s)
    return measured, probe.report(measured, warmup_s), warm
