"""Overload: `fractal serve` (latency profile measured at start) offered about three times
the load it can serve, for a fixed time, by wrk. The process stays up with bounded memory;
what it admits is answered within the deadline; the excess gets a fast 503 with
Retry-After, counted as shed; and it serves normally as soon as the load is gone.

The figures are printed (`pytest -s`); docs/reliability.md quotes them.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import (
    ProcessServer,
    image_bytes,
    metric_value,
    serve_process,
)

pytestmark = pytest.mark.slow

# The shipped model, not the tiny test bundle: with a model that costs next to nothing an
# answer costs little more than a refusal, and three times the saturated rate (over 4000
# requests/s here) is more than two CPUs shared by wrk and the server can even refuse.
SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "cifar10"
DEADLINE_MS = 100.0
MULTIPLE = 3.0  # offered load, in units of the saturated throughput
SATURATION_S = 3
OVERLOAD_S = 12
CONNECTIONS = 512  # enough that a free one is at hand for each arrival: open loop
WRK_THREADS = 2

# One POST of the image per request. Each wrk thread keeps a Poisson schedule of arrivals
# (exponential gaps on the monotonic clock, read through LuaJIT's FFI) and a connection that
# is free takes the next arrival, waiting for its time: the offered rate does not depend on
# how long the answers take (a schedule that has fallen behind is caught up at once).
# `done` prints one JSON line. No per-response callback: it would cost the generator more
# than the server's refusals do (statuses come from the server's metrics).
LOAD_SCRIPT = r"""
local f = assert(io.open(os.getenv("LOAD_IMAGE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "image/png"
local deadline = os.getenv("LOAD_DEADLINE_MS") or ""
if deadline ~= "" then wrk.headers["X-Deadline-Ms"] = deadline end
local mean_gap_ms = tonumber(os.getenv("LOAD_MEAN_GAP_MS") or "0")  -- per thread

local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } load_timespec;
int clock_gettime(int clock_id, load_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local now_spec = ffi.new("load_timespec")
local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, now_spec)
  return tonumber(now_spec.tv_sec) * 1000 + tonumber(now_spec.tv_nsec) / 1e6
end
local next_arrival_ms = nil

function init(args)
  math.randomseed(os.time() + math.floor(os.clock() * 1000000))
end

function delay()
  if mean_gap_ms <= 0 then return 0 end
  local now = now_ms()
  next_arrival_ms = (next_arrival_ms or now) - math.log(1 - math.random()) * mean_gap_ms
  return math.max(next_arrival_ms - now, 0)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %d, "seconds": %f, "non_2xx": %d, "socket_errors": %d, ' ..
    '"p50_ms": %f, "p99_ms": %f, "max_ms": %f}\n',
    summary.requests, summary.duration / 1e6, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
"""


@dataclass
class WrkResult:
    requests: int
    seconds: float
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def run_wrk(
    url: str,
    script: Path,
    image: Path,
    connections: int,
    seconds: int,
    deadline_ms: float | None = None,
    mean_gap_ms: float = 0.0,
) -> WrkResult:
    env = {
        "LOAD_IMAGE": str(image),
        "LOAD_DEADLINE_MS": "" if deadline_ms is None else f"{deadline_ms:g}",
        "LOAD_MEAN_GAP_MS": f"{mean_gap_ms:.3f}",
        "PATH": os.environ.get("PATH", ""),
    }
    result = subprocess.run(
        [
            "wrk",
            f"-t{WRK_THREADS}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            f"{url}/v1/classify",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=seconds + 60,
        check=True,
    )
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("RESULT "))
    raw: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    return WrkResult(**raw)


@dataclass
class Probe:
    """One request every `every_s` on its own connection pool, timed by the client."""

    url: str
    image: bytes
    every_s: float = 0.05
    seen: list[tuple[int, float, bool, str | None]] | None = None  # status, ms, met, retry

    def run(self, stop: threading.Event) -> None:
        self.seen = []
        headers = {"Content-Type": "image/png", "X-Deadline-Ms": f"{DEADLINE_MS:g}"}
        with httpx.Client(base_url=self.url, timeout=10.0) as client:
            time.sleep(1.0)  # wrk opens all its connections at once: not a steady state
            while not stop.is_set():
                start = time.monotonic()
                r = client.post("/v1/classify", content=self.image, headers=headers)
                ms = (time.monotonic() - start) * 1000.0
                met = r.status_code == 200 and r.json()["deadline_met"] and ms <= DEADLINE_MS
                self.seen.append((r.status_code, ms, met, r.headers.get("retry-after")))
                time.sleep(max(self.every_s - ms / 1000.0, 0.0))


def watch_rss(server: ProcessServer, stop: threading.Event, into: list[float]) -> None:
    while not stop.is_set():
        into.append(server.rss_mb())
        time.sleep(0.25)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q / 100 * len(ordered)), len(ordered) - 1)] if ordered else 0.0


def classify_count(metrics: str, status: int) -> float:
    name = "fractal_requests_total"
    try:
        return metric_value(metrics, name, f'endpoint="/v1/classify",status="{status}"')
    except KeyError:
        return 0.0


def refused_p99_ms(before: str, after: str) -> float:
    """The server's p99 time to answer a request that got no answer (the 503s here), as
    the upper bound of its histogram bucket."""
    prefix = 'fractal_request_duration_seconds_bucket{column="none",endpoint="/v1/classify",le="'

    def buckets(text: str) -> dict[float, float]:
        out = {}
        for line in text.splitlines():
            if line.startswith(prefix):
                bound, count = line[len(prefix) :].split('"} ')
                out[float(bound)] = float(count)
        return out

    b, a = buckets(before), buckets(after)
    counts = sorted((bound, a[bound] - b.get(bound, 0.0)) for bound in a)
    total = counts[-1][1]
    return next(bound for bound, n in counts if n >= 0.99 * total) * 1000.0


def classify_in_time(url: str, image: Path) -> tuple[int, bool]:
    r = httpx.post(
        f"{url}/v1/classify",
        content=image.read_bytes(),
        timeout=10.0,
        headers={"Content-Type": "image/png", "X-Deadline-Ms": f"{DEADLINE_MS:g}"},
    )
    return r.status_code, r.status_code == 200 and r.json()["deadline_met"]


def test_three_times_saturation(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (scripts/install-system.sh installs it)")
    image = tmp_path / "image.png"
    image.write_bytes(image_bytes())
    script = tmp_path / "load.lua"
    script.write_text(LOAD_SCRIPT)
    with serve_process(
        SHIPPED_MODEL, tmp_path / "server.log", FRACTAL_PROFILE_REPEATS="5"
    ) as server:
        # Warm up, then the saturated throughput: closed loop, no deadline, nothing shed.
        run_wrk(server.url, script, image, connections=16, seconds=1)
        rss_before = server.rss_mb()
        saturated = run_wrk(server.url, script, image, connections=16, seconds=SATURATION_S)
        assert saturated.non_2xx == 0 and saturated.socket_errors == 0
        capacity = saturated.rate
        target = MULTIPLE * capacity
        metrics_before = server.metrics()

        stop = threading.Event()
        rss_during: list[float] = []
        probe = Probe(server.url, image.read_bytes())
        threads = [
            threading.Thread(target=watch_rss, args=(server, stop, rss_during)),
            threading.Thread(target=probe.run, args=(stop,)),
        ]
        for t in threads:
            t.start()
        overload = run_wrk(
            server.url,
            script,
            image,
            connections=CONNECTIONS,
            seconds=OVERLOAD_S,
            deadline_ms=DEADLINE_MS,
            mean_gap_ms=WRK_THREADS / target * 1000.0,
        )
        stop.set()
        for t in threads:
            t.join(timeout=30)
        metrics_after = server.metrics()

        # Right after: low load is served normally, each request within its deadline.
        time.sleep(1.0)
        after_ms = []
        with httpx.Client(base_url=server.url, timeout=10.0) as client:
            for _ in range(20):
                start = time.monotonic()
                r = client.post(
                    "/v1/classify",
                    content=image.read_bytes(),
                    headers={"Content-Type": "image/png", "X-Deadline-Ms": f"{DEADLINE_MS:g}"},
                )
                after_ms.append((time.monotonic() - start) * 1000.0)
                assert r.status_code == 200 and r.json()["deadline_met"], r.text
                time.sleep(0.05)
        # And a few at once.
        with ThreadPoolExecutor(4) as pool:
            burst = list(pool.map(lambda _: classify_in_time(server.url, image), range(8)))
        rss_after = server.rss_mb()
        assert server.process.poll() is None, "the server died"

    def delta(outcome: str) -> float:
        name, labels = "fractal_deadline_outcomes_total", f'outcome="{outcome}"'
        return metric_value(metrics_after, name, labels) - metric_value(
            metrics_before, name, labels
        )

    def answered(status: int) -> float:
        return classify_count(metrics_after, status) - classify_count(metrics_before, status)

    met, missed, shed = delta("met"), delta("missed"), delta("shed")
    n200, n503 = answered(200), answered(503)
    others = {s: answered(s) for s in (400, 413, 415, 429, 500) if answered(s)}
    seen = probe.seen or []
    probe_ok = [ms for status, ms, _, _ in seen if status == 200]
    probe_met = sum(1 for status, _, ok, _ in seen if status == 200 and ok)
    probe_503 = [ms for status, ms, _, _ in seen if status == 503]
    figures = {
        "saturated_per_s": round(capacity, 1),
        "offered_per_s": round(overload.rate, 1),
        "offered_multiple": round(overload.rate / capacity, 2),
        "answered_200_per_s": round(n200 / overload.seconds, 1),
        "refused_503_per_s": round(n503 / overload.seconds, 1),
        "hit_rate_admitted_server": round(met / max(met + missed, 1), 4),
        "hit_rate_admitted_probe": round(probe_met / max(len(probe_ok), 1), 4),
        "probe_requests": len(seen),
        "probe_answered": len(probe_ok),
        "refused_p99_ms_server": refused_p99_ms(metrics_before, metrics_after),
        "refused_p50_ms_probe": round(statistics.median(probe_503), 1) if probe_503 else None,
        "refused_p99_ms_probe": round(percentile(probe_503, 99), 1),
        "answered_p99_ms_probe": round(percentile(probe_ok, 99), 1),
        "wrk_p50_ms": overload.p50_ms,
        "wrk_p99_ms": overload.p99_ms,
        "shed_counted": shed,
        "rss_mb_before": round(rss_before, 1),
        "rss_mb_max_during": round(max(rss_during), 1),
        "rss_mb_after": round(rss_after, 1),
        "after_max_ms": round(max(after_ms), 1),
    }
    print("\noverload:", json.dumps(figures))

    assert burst == [(200, True)] * 8, burst
    assert overload.rate >= 2.5 * capacity, "the generator could not offer the load"
    assert overload.socket_errors == 0 and not others, others
    # The server counts a few more refusals than wrk: those in flight when it stopped.
    assert 0 <= n503 - len(probe_503) - overload.non_2xx <= CONNECTIONS
    # What is admitted is answered in time, by the server's clock (arrival to answer). Runs
    # here give 93.5-99.9%: the concurrency limit is cut only while a fifth of recent
    # answers run late, and two CPUs shared with wrk and the probe stall now and then.
    # (Without the limit, FRACTAL_ADAPTIVE_ADMISSION=false, the test fails earlier: the
    # server takes every request and wrk cannot even offer the load.)
    assert met / (met + missed) >= 0.90, (met, missed)
    # The excess is refused at once, with Retry-After, and counted as shed.
    assert n503 > n200 and abs(shed - n503) <= 0.01 * n503
    assert all(retry == "1" for status, _, _, retry in seen if status == 503)
    assert refused_p99_ms(metrics_before, metrics_after) <= 5.0
    # Memory stays bounded.
    assert max(rss_during) <= rss_before + 300
    assert rss_after <= rss_before + 100
