"""onnxruntime sessions: execution-provider choice, CPU budget, running and timing.

Shared by the server and by `fractal eval`/`fractal export`, so that every latency figure
comes from the same code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def cgroup_cpu_limit(cpu_max: str | None) -> float | None:
    """CPUs allowed by a cgroup v2 `cpu.max` line ("max 100000" or "150000 100000")."""
    if not cpu_max:
        return None
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        return int(parts[0]) / int(parts[1])
    except (ValueError, ZeroDivisionError):
        return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    try:
        quota = cgroup_cpu_limit(Path("/sys/fs/cgroup/cpu.max").read_text())
    except OSError:
        quota = None
    if quota is not None:
        count = min(count, max(1, int(quota)))
    return max(1, count)


@contextlib.contextmanager
def gil_switch_interval(ms: float | None) -> Iterator[None]:
    """Within the block, a thread that wants the GIL waits at most `ms` for the one that
    holds it (`sys.setswitchinterval`); None leaves Python's setting (5 ms) alone."""
    before_s = sys.getswitchinterval()
    if ms is not None:
        sys.setswitchinterval(ms / 1000.0)
        log.info("GIL switch interval %.3g ms", ms)
    try:
        yield
    finally:
        sys.setswitchinterval(before_s)


def default_intra_op_threads() -> int:
    """Threads per onnxruntime run: the usable CPUs less one, left to the event loop that
    parses requests and feeds the batches (on 2 CPUs this measured 1.66x the saturated
    throughput of 2 threads for the deepest column; docs/serving.md)."""
    return max(1, available_cpus() - 1)


def choose_providers(requested: str, available: Sequence[str], gpu_visible: bool) -> list[str]:
    """Execution providers for `requested` in ("auto", "cuda", "cpu"); CPU is always last.

    "auto" takes CUDA only where the onnxruntime build has it and a GPU is visible;
    "cuda" asks for it and lets onnxruntime fall back to CPU.
    """
    if requested not in ("auto", "cuda", "cpu"):
        raise ValueError(f"unknown provider setting {requested!r}")
    if requested == "cpu":
        return [CPU]
    if CUDA in available and (gpu_visible or requested == "cuda"):
        return [CUDA, CPU]
    return [CPU]


def gpu_visible() -> bool:
    """A cheap check for an NVIDIA device, without importing a CUDA library."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").is_dir()


def describe_machine() -> str:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model or cpu}, {available_cpus()} CPUs, onnxruntime {ort.__version__}"


@dataclass(frozen=True)
class SessionConfig:
    intra_op_threads: int
    providers: tuple[str, ...] = (CPU,)


def create_session(path: str | Path, config: SessionConfig) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads burn the cores the HTTP side needs between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=list(config.providers))


def run_probabilities(session: object, images: np.ndarray) -> np.ndarray:
    """float32 [N, classes] for uint8 NHWC `images`."""
    out = session.run(["probabilities"], {"images": images})  # type: ignore[attr-defined]
    return np.asarray(out[0], dtype=np.float32)


def measure_latency_ms(
    session: object,
    height: int,
    width: int,
    batch_sizes: Sequence[int] = (1, 8, 32),
    repeats: int = 20,
    warmup: int = 3,
) -> dict[int, float]:
    """Median wall milliseconds of one run at each batch size (random pixels)."""
    rng = np.random.default_rng(0)
    result: dict[int, float] = {}
    for n in batch_sizes:
        images = rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8)
        for _ in range(warmup):
            run_probabilities(session, images)
        times = []
        for _ in range(max(repeats, 1)):
            t0 = time.perf_counter()
            run_probabilities(session, images)
            times.append((time.perf_counter() - t0) * 1000.0)
        result[n] = round(statistics.median(times), 4)
    return result


def predicted_classes(session: object, images: np.ndarray, batch: int = 250) -> np.ndarray:
    """The most probable class of every image."""
    parts = [
        run_probabilities(session, images[start : start + batch]).argmax(1)
        for start in range(0, len(images), batch)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def accuracy(session: object, images: np.ndarray, labels: np.ndarray, batch: int = 250) -> float:
    return float((predicted_classes(session, images, batch) == labels).sum()) / max(len(labels), 1)
