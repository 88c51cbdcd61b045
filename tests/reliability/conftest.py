"""Fixtures for the reliability tests: the tiny bundle under a models root, its exporter-
measured latency as a fixed profile, settings, and a module-scoped in-thread server."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.bundle import read_manifest, write_manifest
from service.settings import Settings
from tests.support import (
    ThreadServer,
    free_port,
    manifest_profile,
    serve_in_thread,
)


def copy_bundle(source: Path, dest: Path, version: str) -> Path:
    """A copy of the bundle `source` at `dest`, with manifest version `version`."""
    shutil.copytree(source, dest)
    manifest = read_manifest(dest)
    write_manifest(dest, manifest.model_copy(update={"version": version}))
    return dest


@pytest.fixture(scope="session")
def models_root(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models root holding the tiny bundle as `tiny` (version v1)."""
    root = tmp_path_factory.mktemp("models")
    copy_bundle(tiny_bundle, root / "tiny", "v1")
    return root


@pytest.fixture(scope="session")
def bundle(models_root: Path) -> Path:
    return models_root / "tiny"


@pytest.fixture(scope="session")
def profile(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("profile") / "latency.json"
    path.write_text(json.dumps(manifest_profile(bundle)))
    return path


@pytest.fixture(scope="session")
def make_settings(bundle: Path, profile: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "model_path": bundle,
            "port": free_port(),
            "latency_profile_path": profile,
            "intra_op_threads": 1,
            "log_json": True,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture(scope="module")
def live(make_settings: Callable[..., Settings]) -> Iterator[ThreadServer]:
    """A server with the default limits (those are what the tests check)."""
    with serve_in_thread(make_settings()) as server:
        yield server
