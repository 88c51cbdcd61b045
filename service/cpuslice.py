"""A shorter CPU time slice for the event loop's thread (Linux 6.12 and later).

When the server's CPUs are shared (the inference thread, log writing, a sidecar, other
tenants), a request the event loop could answer in half a millisecond can wait for a
whole time slice of whatever runs before the loop is picked again: 1.4 ms by default on
a 2-CPU machine, and a few of them in a row in a burst. Since Linux 6.12 the fair
scheduler (EEVDF) lets a thread ask for a shorter slice, with no privilege (`sched_attr.
sched_runtime` for SCHED_OTHER, clamped by the kernel to 0.1-100 ms): its virtual
deadline comes sooner, so it is picked sooner when it wakes, and it gives way sooner when
it runs long. Python has no call for it, so this module makes the `sched_getattr` and
`sched_setattr` system calls through ctypes. Elsewhere (another OS, an older kernel that
ignores the request, a real-time policy) nothing changes and the server says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import platform
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

SCHED_OTHER = 0
SCHED_BATCH = 3
FAIR_POLICIES = (SCHED_OTHER, SCHED_BATCH)

SCHED_FLAG_RESET_ON_FORK = 0x01

SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}
"""(sched_setattr, sched_getattr) by machine."""


class SchedAttr(ctypes.Structure):
    """`struct sched_attr` (include/uapi/linux/sched/types.h), its first version and the
    utilisation clamps: 56 bytes."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
        ("sched_util_min", ctypes.c_uint32),
        ("sched_util_max", ctypes.c_uint32),
    ]


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _syscall(number: int, *args: object) -> None:
    if _libc().syscall(number, *args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def _numbers() -> tuple[int, int]:
    numbers = SYSCALLS.get(platform.machine()) if platform.system() == "Linux" else None
    if numbers is None:
        raise OSError(f"sched_setattr is not known on {platform.system()} {platform.machine()}")
    return numbers


def get_attr(tid: int = 0) -> SchedAttr:
    """The scheduling attributes of thread `tid` (0: the calling thread)."""
    attr = SchedAttr()
    _syscall(_numbers()[1], tid, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    return attr


def set_slice_ns(slice_ns: int, tid: int = 0) -> int:
    """Ask for a time slice of `slice_ns` for thread `tid` (0: the calling thread),
    keeping its policy and nice value; 0 asks for the kernel's default. Returns the slice
    the kernel reports afterwards (0 where it reports none: a kernel before 6.12)."""
    attr = get_attr(tid)
    if attr.sched_policy not in FAIR_POLICIES:
        raise OSError(f"thread {tid} has scheduling policy {attr.sched_policy}, not a fair one")
    attr.size = ctypes.sizeof(attr)
    attr.sched_flags &= SCHED_FLAG_RESET_ON_FORK  # no clamps or other changes asked
    attr.sched_runtime = slice_ns
    _syscall(_numbers()[0], tid, ctypes.byref(attr), 0)
    return int(get_attr(tid).sched_runtime)


@contextlib.contextmanager
def loop_slice(slice_us: float | None) -> Iterator[bool]:
    """Within the block, the calling thread (the event loop's) asks for a `slice_us` time
    slice; None leaves the kernel's default alone. Yields whether the kernel took the
    request (it reports that slice back), and puts the slice it had back on the way out."""
    if slice_us is None:
        yield False
        return
    wanted_ns = round(slice_us * 1000)
    try:
        before_ns = int(get_attr().sched_runtime)
        got_ns = set_slice_ns(wanted_ns)
    except OSError as exc:
        log.warning("event-loop time slice of %g us not set: %s", slice_us, exc)
        yield False
        return
    taken = got_ns == wanted_ns
    if taken:
        log.info("event-loop thread %d: time slice %g us", threading.get_native_id(), slice_us)
    else:
        log.warning(
            "event-loop time slice of %g us not taken by this kernel (%s reports %d ns; "
            "Linux 6.12 or later takes it)",
            slice_us,
            platform.release(),
            got_ns,
        )
    try:
        yield taken
    finally:
        with contextlib.suppress(OSError):
            set_slice_ns(before_ns)
