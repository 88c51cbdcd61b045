"""The open-loop arrival schedule: when each request is due, fixed before the run starts.

Arrivals are a homogeneous Poisson process (exponential gaps with mean 1/rate), a pure
function of (rate, duration, seed). Because the whole schedule exists before the first
request is sent, a slow server cannot slow the sender down: that is what makes the test
open-loop. The schedule is split between worker processes by dealing arrivals out in
turn, so each worker's share is itself a Poisson process at rate / workers.
"""

from __future__ import annotations

import math

import numpy as np


def poisson_arrivals(rate_rps: float, duration_s: float, seed: int) -> np.ndarray:
    """Sorted arrival times in seconds, in [0, duration_s), of a Poisson process."""
    if rate_rps <= 0:
        raise ValueError(f"rate must be positive, got {rate_rps}")
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    rng = np.random.default_rng(seed)
    expected = rate_rps * duration_s
    # Draw enough gaps in one go that the loop almost never runs twice.
    chunk = int(expected + 6.0 * math.sqrt(expected) + 16)
    times = np.cumsum(rng.exponential(1.0 / rate_rps, chunk))
    while times[-1] < duration_s:
        more = times[-1] + np.cumsum(rng.exponential(1.0 / rate_rps, chunk))
        times = np.concatenate([times, more])
    return times[times < duration_s]


def deal(count: int, workers: int) -> list[np.ndarray]:
    """Indices 0..count-1 dealt round-robin to `workers` shares."""
    if workers < 1:
        raise ValueError(f"need at least one worker, got {workers}")
    return [np.arange(w, count, workers) for w in range(workers)]


def split_bound(total: int, workers: int) -> list[int]:
    """A concurrency bound shared out between workers (each gets at least 1)."""
    base, extra = divmod(max(total, workers), workers)
    return [base + (1 if w < extra else 0) for w in range(workers)]
