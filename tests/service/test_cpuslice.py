"""The event loop's time slice (`FRACTAL_LOOP_SLICE_US`): asked of the kernel through
sched_setattr, read back through sched_getattr, put back after serving."""

from __future__ import annotations

import concurrent.futures
import os
import platform
import re
import threading
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from service.cpuslice import get_attr, loop_slice, set_slice_ns
from service.settings import Settings
from tests.service.tests_support import png_bytes
from tests.support import serve_in_thread


def kernel_takes_slices() -> bool:
    """Linux 6.12 added sched_attr.sched_runtime as the slice of a fair thread."""
    found = re.match(r"(\d+)\.(\d+)", platform.release())
    version = (int(found[1]), int(found[2])) if found else (0, 0)
    return platform.system() == "Linux" and version >= (6, 12)


def in_thread(work: Callable[[], Any]) -> Any:
    """`work()` on a thread of its own, so that the test's thread keeps its settings."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(work).result()  # re-raises what `work` raised


def test_the_slice_is_taken_while_asked_and_put_back_after() -> None:
    def work() -> tuple[int, bool, int, int]:
        before = int(get_attr().sched_runtime)
        with loop_slice(300) as taken:
            during = int(get_attr().sched_runtime)
        return before, taken, during, int(get_attr().sched_runtime)

    before, taken, during, after = in_thread(work)
    assert taken is kernel_takes_slices()
    if taken:
        assert during == 300_000
    assert after == before


def test_the_thread_keeps_its_nice_value_and_policy() -> None:
    def work() -> tuple[int, int, int]:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 5)  # this thread only
        set_slice_ns(250_000)
        attr = get_attr()
        return os.getpriority(os.PRIO_PROCESS, 0), attr.sched_nice, attr.sched_policy

    assert in_thread(work) == (5, 5, 0)


def test_no_slice_asked_leaves_the_kernel_default() -> None:
    def work() -> tuple[bool, int, int]:
        before = int(get_attr().sched_runtime)
        with loop_slice(None) as taken:
            return taken, before, int(get_attr().sched_runtime)

    taken, before, during = in_thread(work)
    assert not taken and during == before


def test_the_setting_keeps_to_what_the_kernel_allows() -> None:
    for bad in (50, 200_000):  # 0.1-100 ms
        with pytest.raises(ValidationError):
            Settings(loop_slice_us=bad)
    assert Settings(loop_slice_us=100).loop_slice_us == 100


@pytest.mark.skipif(not kernel_takes_slices(), reason="the kernel ignores slice requests")
def test_the_server_s_event_loop_runs_with_the_slice_set(
    make_settings: Callable[..., Settings],
) -> None:
    with serve_in_thread(make_settings(loop_slice_us=400)) as server:
        (loop_thread,) = [t for t in threading.enumerate() if t.name.endswith("(run)")]
        assert loop_thread.native_id is not None
        assert get_attr(loop_thread.native_id).sched_runtime == 400_000
        assert get_attr().sched_runtime != 400_000  # the test's own thread: untouched
        with server.client() as client:
            answer = client.post(
                "/v1/classify", content=png_bytes(seed=1), headers={"Content-Type": "image/png"}
            )
            assert answer.status_code == 200
