"""A real uvicorn server on 127.0.0.1, in a thread of the test process (so tests can also
look at its engine), serving the tiny bundle."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.settings import Settings
from tests.support import ThreadServer, copy_with_accuracies, free_port, serve_in_thread

# Deliberately far above the real cost of the tiny model (well under 1 ms), so that
# which column fits a deadline depends only on these numbers.
# The gaps leave tens of ms for request handling on a busy machine.
FIXED_PROFILE_MS = {
    "column_1": {1: 20.0, 32: 40.0},
    "column_2": {1: 100.0, 32: 150.0},
    "column_3": {1: 300.0, 32: 400.0},
    "column_4": {1: 700.0, 32: 900.0},
    "column_1_int8": {1: 25.0, 32: 45.0},
    "column_2_int8": {1: 110.0, 32: 160.0},
    "column_3_int8": {1: 320.0, 32: 420.0},
    "column_4_int8": {1: 750.0, 32: 950.0},
}


LiveServer = ThreadServer


@pytest.fixture(scope="session")
def fixed_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("profile") / "latency.json"
    path.write_text(json.dumps(FIXED_PROFILE_MS))
    return path


@pytest.fixture(scope="session")
def service_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle with manifest accuracies set to rise with depth (int8 a little
    below fp32), so variant choice is predictable whatever the tiny training reached."""
    return copy_with_accuracies(
        tiny_bundle,
        tmp_path_factory.mktemp("service-bundle") / "tiny",
        lambda v: 0.5 + 0.1 * v.column - (0.01 if v.precision == "int8" else 0.0),
    )


@pytest.fixture(scope="session")
def make_settings(service_bundle: Path, fixed_profile: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "model_path": service_bundle,
            "port": free_port(),
            "latency_profile_path": fixed_profile,
            "latency_learning": False,
            "deadline_margin_ms": 0.0,
            # The fixed profile is far slower than the requests come: no arrival bound.
            "deeper_max_arrivals": math.inf,
            "log_json": False,
            "intra_op_threads": 1,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture(scope="module")
def live(make_settings: Callable[..., Settings]) -> Iterator[LiveServer]:
    with serve_in_thread(make_settings()) as server:
        yield server
