"""`fractal loadtest` against a real `fractal serve` on the tiny test bundle.

The server runs as a subprocess on a free port; requests carry digits test images
(labels "0".."9", the bundle's class names) so that correctness is checked end to end.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from loadtest import sweep
from loadtest.cli import main
from loadtest.generator import Result
from loadtest.report import read_csv, summarize
from tests.support import free_port

START_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("onnxruntime")
    log = tmp_path_factory.mktemp("serve") / "server.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "fractal.cli", "serve", "--model", str(tiny_bundle),
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"fractal serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"fractal serve not ready in {START_TIMEOUT_S} s:\n{log.read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder tree of 100 digits test images, test/<digit>/<n>.png."""
    from model.data import load_split

    split = load_split("digits", "test", image_size=16)
    root = tmp_path_factory.mktemp("digits")
    for i in range(100):
        folder = root / "test" / split.classes[int(split.labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(split.images[i]).save(folder / f"{i}.png")
    return root


def check_accounting(
    summary: dict[str, Any], results: list[Result], rate: float, duration: float
) -> None:
    """Every scheduled request is in the CSV once, and the summary is the CSV's summary."""
    counts = summary["counts"]
    assert [r.index for r in results] == list(range(len(results)))
    assert counts["scheduled"] == len(results)
    assert counts["scheduled"] == counts["sent"] + counts["dropped"]
    assert counts["sent"] == counts["completed"] + counts["shed"] + counts["errors"]
    recomputed = json.loads(json.dumps(summarize(results, rate, duration, summary["stalls"])))
    assert summary["stalls"]["misses"] == sum(not r.deadline_met for r in results)
    assert 0 <= summary["stalls"]["misses_near_stalls"] <= summary["stalls"]["misses"]
    assert {k: v for k, v in summary.items() if k != "run"} == recomputed
    for r in results:
        in_time = r.deadline_ms is None or (r.latency_ms or math.inf) <= r.deadline_ms
        assert r.deadline_met == (r.ok and in_time)
        if r.ok:
            assert r.predicted in {str(d) for d in range(10)}
            assert r.correct == (r.predicted == r.label)
            assert r.column is not None and 1 <= r.column <= 4


def test_single_answers(server: str, digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = main(
        ["--url", server, "--rate", "15", "--duration", "3", "--workers", "2",
         "--deadline", "mixture:0.25*fixed:0.01,0.75*uniform:30:300", "--images", str(digits),
         "--seed", "1", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    results = read_csv(out / "results.csv")
    check_accounting(summary, results, 15.0, 3.0)
    assert summary["counts"]["errors"] == 0, summary["error_kinds"]
    assert summary["counts"]["completed"] > 0 and summary["accuracy"] is not None
    # A 10-microsecond budget fits no column: shed with a 503, and counted as a miss.
    impossible = [r for r in results if r.deadline_ms == 0.01]
    assert impossible and all(r.status == 503 and not r.deadline_met for r in impossible)
    assert summary["counts"]["shed"] >= len(impossible)
    assert sum(summary["columns_served"].values()) == summary["counts"]["completed"]
    # Every answer carries the server's own time, which is part of what the client saw.
    answered = [r for r in results if r.ok]
    assert all(r.server_ms is not None and r.latency_ms is not None for r in answered)
    assert all(0 < r.server_ms <= r.latency_ms for r in answered)  # type: ignore[operator]
    assert summary["outside_server_ms"]["p50"] > 0
    # ... and its split from Server-Timing: the queue and the run are part of that time.
    for r in answered:
        assert r.queue_ms is not None and r.inference_ms is not None and r.server_ms is not None
        assert r.queue_ms >= 0 and r.inference_ms > 0
        assert r.queue_ms + r.inference_ms <= r.server_ms
    assert summary["server_split_ms"]["rest"]["p50"] > 0
    assert (out / "latency_cdf.png").exists() and (out / "accuracy_vs_deadline.png").exists()


def test_streams(server: str, digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "stream"
    code = main(
        ["--url", server, "--rate", "10", "--duration", "2", "--workers", "1", "--stream",
         "--deadline", "uniform:100:400", "--images", str(digits), "--out", str(out),
         "--no-plots"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    results = read_csv(out / "results.csv")
    check_accounting(summary, results, 10.0, 2.0)
    completed = [r for r in results if r.ok]
    assert completed and summary["counts"]["errors"] == 0, summary["error_kinds"]
    for r in completed:
        assert r.first_answer_ms is not None and r.latency_ms is not None
        assert r.first_answer_ms <= r.latency_ms
        assert r.server_ms is not None and r.server_ms <= r.latency_ms
    assert summary["stream_first_answer_ms"]["p50"] is not None


def test_forced_column(server: str, digits: Path, tmp_path: Path) -> None:
    code = main(
        ["--url", server, "--rate", "10", "--duration", "1.5", "--workers", "1", "--column", "2",
         "--deadline", "fixed:500", "--images", str(digits), "--out", str(tmp_path), "--no-plots"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    check_accounting(summary, read_csv(tmp_path / "results.csv"), 10.0, 1.5)
    assert summary["counts"]["completed"] > 0
    assert set(summary["columns_served"]) == {"2"}


@pytest.mark.slow
def test_sweep_against_the_server(
    server: str, digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sweep, "SETTLE_S", 0.2)
    code = main(
        ["--url", server, "--rate", "10", "--duration", "0.8", "--workers", "1", "--sweep",
         "--deadlines", "0.01,500", "--images", str(digits), "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    payload = json.loads((tmp_path / "sweep.json").read_text())
    assert payload["run"]["columns"] == 4
    points = {(p["mode"], p["deadline_ms"]): p for p in payload["points"]}
    modes = ["auto", "column 1", "column 2", "column 3", "column 4"]
    assert set(points) == {(m, d) for m in modes for d in (0.01, 500.0)}
    for mode in modes:
        assert points[(mode, 0.01)]["deadline_hit_rate"] == 0.0
        assert points[(mode, 500.0)]["counts"]["completed"] > 0
    for k in range(1, 5):
        assert set(points[(f"column {k}", 500.0)]["columns_served"]) == {str(k)}
    assert (tmp_path / "sweep.png").exists()


def test_generator_ceiling_against_health(server: str, tmp_path: Path) -> None:
    code = main(
        ["--url", server, "--ceiling", "--rate", "40", "--steps", "1", "--duration", "1",
         "--workers", "1", "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "ceiling.json").read_text())
    (step,) = report["steps"]
    assert step["counts"]["errors"] == 0 and step["achieved_rate_rps"] > 0
    kept_up = step["scheduled_rate_rps"] if not step["falls_short"] else None
    assert report["ceiling_rps"] == kept_up
