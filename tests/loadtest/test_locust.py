"""The Locust file runs headless against the stub server and records answers by column."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.samples import load_samples
from tests.loadtest.loadtest_stub import StubServer

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_locust_headless(tmp_path: Path) -> None:
    locust = Path(sys.executable).with_name("locust")
    if not locust.exists() and shutil.which("locust") is None:
        pytest.skip("locust is not installed")
    labels = {s.data: s.label for s in load_samples()}
    env = {
        **os.environ,
        "FRACTAL_LOADTEST_DEADLINE": "mixture:0.5*fixed:1,0.5*fixed:500",
        "FRACTAL_LOADTEST_STREAM": "1",
        "FRACTAL_LOADTEST_USER_RPS": "5",
    }
    with StubServer(column_ms=(2.0, 10.0), labels=labels) as stub:
        subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
             "--headless", "-u", "2", "-r", "2", "-t", "3s", "--host", stub.url,
             "--only-summary", "--exit-code-on-error", "0", "--csv", str(tmp_path / "l")],
            cwd=ROOT, env=env, check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    with (tmp_path / "l_stats.csv").open() as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    classify = rows[("POST", "/v1/classify")]
    assert int(classify["Request Count"]) >= 5
    # Half the deadlines (1 ms) are below every column: shed, reported as failures.
    assert 0 < int(classify["Failure Count"]) < int(classify["Request Count"])
    answers = [name for kind, name in rows if kind == "answer"]
    assert answers and all(name.startswith("column 2: ") for name in answers)
