"""`fractal bench`: the serving benchmark, in one run on this machine.

1. The floor: onnxruntime in-process, per column: latency at batch 1 and images/s at the
   best batch size, with the server's thread settings. The deepest column's batched floor
   is measured again right before and after its saturated server run: the shared
   machine's speed drifts, and only figures taken side by side compare. Beside the tight
   loop's latency, the latency of a run that follows an idle millisecond (as a server's
   run follows the wait for its request): on a virtual machine a CPU that went idle runs
   slower for a while after it wakes.
2. The server at low load (wrk, one connection, one request at a time, column forced):
   p50/p99 per column and the overhead over the floor.
3. The server saturated (wrk, many connections, column forced) with batching on and off
   (max batch 1, same threads): requests/s for column 1 and the deepest column, and where
   a request's CPU time goes (server CPU per request, the event loop's share of it, and
   the onnxruntime runs' wall time).
4. The load generator's own ceiling against a trivial endpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from service.bundle import load_bundle, variant_key
from service.runtime import (
    SessionConfig,
    create_session,
    default_intra_op_threads,
    describe_machine,
    run_probabilities,
)

WRK_SCRIPT = """
local f = assert(io.open(os.getenv("BENCH_IMAGE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "image/png"
local column = os.getenv("BENCH_COLUMN")
if column and column ~= "" then wrk.headers["X-Column"] = column end
"""

BATCH_SIZES = (1, 8, 16, 32, 64)
"""Batch sizes of the in-process floor (the first is the unbatched case)."""
IDLE_GAP_S = 0.001
"""The sleep before each run of the floor after idle."""


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def floor(
    bundle: Path, threads: int, repeats: int, batch_sizes: tuple[int, ...]
) -> dict[str, dict[str, float]]:
    """In-process onnxruntime figures per fp32 column."""
    manifest = load_bundle(bundle)
    h, w = manifest.input.height, manifest.input.width
    rng = np.random.default_rng(0)
    out: dict[str, dict[str, float]] = {}
    for v in manifest.variants:
        if v.key != variant_key(v.column):
            continue
        session = create_session(bundle / v.file, SessionConfig(intra_op_threads=threads))
        one = rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8)
        for _ in range(10):
            run_probabilities(session, one)
        times = run_times_ms(session, one, repeats)
        after_idle = run_times_ms(session, one, repeats, IDLE_GAP_S)
        rates = {
            n: images_per_s(session, rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8), repeats)
            for n in batch_sizes
        }
        best_n = max(rates, key=lambda n: rates[n])
        out[f"column_{v.column}"] = {
            "p50_ms": statistics.median(times),
            "p99_ms": percentile(times, 99),
            "after_idle_p50_ms": statistics.median(after_idle),
            "best_images_per_s": rates[best_n],
            "best_batch": best_n,
            "batch_gain": rates[best_n] / rates[min(rates)],
        }
    return out


def run_times_ms(
    session: Any, images: np.ndarray, repeats: int, idle_s: float = 0.0
) -> list[float]:
    """Wall ms of each of `repeats` runs, back to back or each after `idle_s` of sleep."""
    times = []
    for _ in range(repeats):
        if idle_s:
            time.sleep(idle_s)
        t0 = time.perf_counter()
        run_probabilities(session, images)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def images_per_s(session: Any, images: np.ndarray, repeats: int) -> float:
    """In-process throughput of one batch shape: one warm-up run, then timed runs (fewer
    for large batches)."""
    n = int(images.shape[0])
    run_probabilities(session, images)
    runs = max(3, repeats // max(n // 4, 1))
    t0 = time.perf_counter()
    for _ in range(runs):
        run_probabilities(session, images)
    return n * runs / (time.perf_counter() - t0)


def batched_floor(
    bundle: Path, column: int, threads: int, batch: int, repeats: int
) -> Callable[[], float]:
    """A measure of one fp32 column's in-process images/s at one batch size (the session
    and the batch built once): the floor again, taken right beside a server run, so that a
    drift of the shared machine's speed between the start of the benchmark and that run
    does not pass for the server's overhead."""
    manifest = load_bundle(bundle)
    v = manifest.variant(column)
    session = create_session(bundle / v.file, SessionConfig(intra_op_threads=threads))
    shape = (batch, manifest.input.height, manifest.input.width, 3)
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    return lambda: images_per_s(session, images, repeats)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_s(stat_path: str) -> float:
    """User + system CPU seconds from a /proc stat file."""
    fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU seconds used so far by the whole server process and by its main thread
        (the event loop)."""
        pid = self.process.pid
        return _cpu_s(f"/proc/{pid}/stat"), _cpu_s(f"/proc/{pid}/task/{pid}/stat")

    def metric_sum(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", re.M)
        return sum(float(m) for m in pattern.findall(text))


@contextlib.contextmanager
def server(bundle: Path, env: dict[str, str]) -> Iterator[Server]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "fractal.cli",
        "serve",
        "--model",
        str(bundle),
        "--port",
        str(port),
    ]
    full_env = {**os.environ, "FRACTAL_LOG_JSON": "true", "FRACTAL_LOG_LEVEL": "warning", **env}
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not become ready")
            time.sleep(0.2)
        yield Server(url, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def low_load(
    srv: Server, image_path: Path, script: Path, columns: int, seconds: int
) -> dict[str, dict[str, float]]:
    """One connection, one request at a time (wrk -c1): latency without client overhead."""
    out = {}
    for column in range(1, columns + 1):
        env = {"BENCH_IMAGE": str(image_path), "BENCH_COLUMN": str(column)}
        res = wrk(srv.url, "/v1/classify", seconds, 1, env, script, threads=1)
        out[f"column_{column}"] = {"p50_ms": res["p50_ms"], "p99_ms": res["p99_ms"]}
    return out


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(
    url: str,
    path: str,
    seconds: int,
    connections: int,
    env: dict[str, str],
    script: Path | None,
    threads: int = 2,
) -> dict[str, float]:
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if script is not None:
        cmd += ["-s", str(script)]
    result = subprocess.run(
        [*cmd, url + path],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
        timeout=seconds + 60,
    )
    text = result.stdout
    rate = float(re.search(r"Requests/sec:\s+([0-9.]+)", text).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    total = re.search(r"(\d+) requests in", text)
    quantiles = dict(re.findall(r"^\s+(50|99)%\s+([0-9.]+(?:us|ms|s))\s*$", text, re.M))
    if len(quantiles) < 2:
        print(f"wrk output without its latency quantiles:\n{text}", file=sys.stderr)
    return {
        "requests_per_s": rate,
        "requests": float(total.group(1)) if total else 0.0,
        "non_2xx": float(errors.group(1)) if errors else 0.0,
        # wrk leaves out a quantile it has no sample for (e.g. every request timed out).
        "p50_ms": _ms(quantiles["50"]) if "50" in quantiles else float("nan"),
        "p99_ms": _ms(quantiles["99"]) if "99" in quantiles else float("nan"),
    }


def saturated(
    srv: Server, image_path: Path, script: Path, column: int, seconds: int, connections: int
) -> dict[str, float]:
    cpu0, runs0 = srv.cpu_seconds(), srv.metric_sum("fractal_inference_duration_seconds_sum")
    batches0 = srv.metric_sum("fractal_batch_size_count")
    images0 = srv.metric_sum("fractal_batch_size_sum")
    res = wrk(
        srv.url,
        "/v1/classify",
        seconds,
        connections,
        {"BENCH_IMAGE": str(image_path), "BENCH_COLUMN": str(column)},
        script,
    )
    cpu1 = srv.cpu_seconds()
    inference = srv.metric_sum("fractal_inference_duration_seconds_sum") - runs0
    n = max(res["requests"], 1.0)
    # The counters are cumulative since start-up: this run's share is the difference.
    batches = srv.metric_sum("fractal_batch_size_count") - batches0
    images = srv.metric_sum("fractal_batch_size_sum") - images0
    return {
        **res,
        "server_cpu_ms_per_request": 1000 * (cpu1[0] - cpu0[0]) / n,
        "event_loop_cpu_ms_per_request": 1000 * (cpu1[1] - cpu0[1]) / n,
        "inference_wall_ms_per_request": 1000 * inference / n,
        "mean_batch_size": images / max(batches, 1.0),
    }


def sample_image(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def run(args: argparse.Namespace) -> dict[str, Any]:
    bundle: Path = args.model
    manifest = load_bundle(bundle)
    threads = args.threads or default_intra_op_threads()
    columns = manifest.columns
    report: dict[str, Any] = {
        "machine": describe_machine(),
        "threads": threads,
        "model": f"{manifest.name} {manifest.version}",
    }
    print(
        f"# fractal bench: {report['model']} on {report['machine']}, {threads} threads", flush=True
    )
    report["floor"] = floor(bundle, threads, args.repeats, BATCH_SIZES)
    image = sample_image((manifest.input.width, manifest.input.height))
    tmp = Path(tempfile.mkdtemp(prefix="fractal-bench-"))
    image_path, script = tmp / "image.png", tmp / "post.lua"
    image_path.write_bytes(image)
    script.write_text(WRK_SCRIPT)
    base_env = {"FRACTAL_INTRA_OP_THREADS": str(threads), "FRACTAL_PROFILE_REPEATS": "10"}
    try:
        with server(bundle, base_env) as srv:
            report["generator_ceiling"] = wrk(
                srv.url, "/v2/health/live", args.seconds, args.connections, {}, None
            )
            report["low_load"] = low_load(srv, image_path, script, columns, args.seconds)
            deep = report["floor"][f"column_{columns}"]
            beside = batched_floor(bundle, columns, threads, int(deep["best_batch"]), args.repeats)
            before = beside()
            report["saturated_batched"] = {
                f"column_{k}": saturated(srv, image_path, script, k, args.seconds, args.connections)
                for k in (1, columns)
            }
            report["deepest_floor_beside"] = {"before": before, "after": beside()}
        with server(bundle, {**base_env, "FRACTAL_MAX_BATCH_SIZE": "1"}) as srv:
            report["saturated_unbatched"] = {
                f"column_{k}": saturated(srv, image_path, script, k, args.seconds, args.connections)
                for k in (1, columns)
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_report(report, columns)
    return report


def print_report(r: dict[str, Any], columns: int) -> None:
    print("\n## floor (onnxruntime in-process)")
    print(
        "| column | p50 ms (batch 1) | p99 ms | p50 ms after 1 ms idle | best images/s | at batch |"
    )
    print("|---|---|---|---|---|---|")
    for key, f in r["floor"].items():
        print(
            f"| {key} | {f['p50_ms']:.3f} | {f['p99_ms']:.3f} | {f['after_idle_p50_ms']:.3f} | "
            f"{f['best_images_per_s']:.0f} | {f['best_batch']} |"
        )
    print("\n## server at low load (one request at a time)")
    print(
        "| column | p50 ms | p99 ms | p50 overhead over floor ms | over the floor after idle ms |"
    )
    print("|---|---|---|---|---|")
    for key, s in r["low_load"].items():
        f = r["floor"][key]
        print(
            f"| {key} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | {s['p50_ms'] - f['p50_ms']:.3f} | "
            f"{s['p50_ms'] - f['after_idle_p50_ms']:.3f} |"
        )
    print("\n## server saturated (wrk)")
    print(
        "| column | batching | requests/s | mean batch | server CPU ms/request | "
        "event loop CPU ms/request | onnxruntime wall ms/request | non-2xx |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mode in ("batched", "unbatched"):
        for key, s in r[f"saturated_{mode}"].items():
            print(
                f"| {key} | {mode} | {s['requests_per_s']:.0f} | {s['mean_batch_size']:.1f} | "
                f"{s['server_cpu_ms_per_request']:.3f} | "
                f"{s['event_loop_cpu_ms_per_request']:.3f} | "
                f"{s['inference_wall_ms_per_request']:.3f} | {s['non_2xx']:.0f} |"
            )
    deep = f"column_{columns}"
    b, u = r["saturated_batched"][deep], r["saturated_unbatched"][deep]
    beside = r["deepest_floor_beside"]
    near = (beside["before"] + beside["after"]) / 2
    print(
        f"\n{deep}: batched / unbatched = {b['requests_per_s'] / u['requests_per_s']:.2f}x; "
        f"batched / in-process batched floor = "
        f"{b['requests_per_s'] / r['floor'][deep]['best_images_per_s']:.2f} "
        f"(floor at the start), {b['requests_per_s'] / near:.2f} (floor measured beside the "
        f"run: {beside['before']:.0f} before, {beside['after']:.0f} after)"
    )
    print(
        f"{deep}: in-process, best batch / batch {min(BATCH_SIZES)} = "
        f"{r['floor'][deep]['batch_gain']:.2f}x (what batching can gain at most; the server's "
        f"batched / unbatched ratio is bounded by it when its unbatched runs are near the floor)"
    )
    print(
        f"load generator ceiling (GET /v2/health/live): "
        f"{r['generator_ceiling']['requests_per_s']:.0f} requests/s"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fractal bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("models/cifar10"))
    p.add_argument("--threads", type=int, help="onnxruntime threads (default: as the server)")
    p.add_argument("--repeats", type=int, default=200, help="floor runs per column")
    p.add_argument("--seconds", type=int, default=10, help="each saturated wrk run")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        print("fractal bench: needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    report = run(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0
