"""Keeping the load generator on CPUs of its own (`fractal loadtest --cpus`).

On one host the generator and the server take turns on the same cores, and the time a
request waits for the generator to send it or to read its answer counts against its
deadline. Pinning the generator to some CPUs and the server to the others
(`taskset -c 1 fractal serve ...`) measures the server as a client on another machine
would see it. The generator's worker processes inherit the mask.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def parse_cpu_list(spec: str) -> frozenset[int]:
    """CPU numbers in taskset's list form ("0", "0,2", "0-3,6"), all among those this
    process may use now; ValueError with the reason otherwise."""
    cpus: set[int] = set()
    for part in spec.split(","):
        text = part.strip()
        low, dash, high = text.partition("-")
        try:
            first = int(low)
            last = int(high) if dash else first
        except ValueError:
            raise ValueError(f"bad CPU list {spec!r}: expected e.g. 0 or 0,2 or 0-3") from None
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {text!r} in {spec!r}")
        cpus.update(range(first, last + 1))
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        raise ValueError(f"CPUs {sorted(cpus - allowed)} are not among {sorted(allowed)}")
    return frozenset(cpus)


@contextlib.contextmanager
def pinned(cpus: frozenset[int] | None) -> Iterator[None]:
    """Within the block, this process (and the workers it starts) runs on `cpus` only
    (from `parse_cpu_list`); None leaves it be."""
    if cpus is None:
        yield
        return
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)
