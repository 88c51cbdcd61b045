"""`fractal classify` (service/client.py) against a live `fractal serve`."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service import client

SAMPLE = Path(__file__).parents[2] / "service" / "static" / "samples" / "cat_0000.jpg"
ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(fp32|int8)\s+(\S+)\s+([\d.]+)%\s+([\d.]+)$")


def test_one_answer(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert client.main([str(SAMPLE), "--url", server_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    # The same request made directly: the tool prints what the server answered.
    direct = httpx.post(
        f"{server_url}/v1/classify",
        content=SAMPLE.read_bytes(),
        headers={"Content-Type": "image/jpeg"},
        timeout=10.0,
    ).json()
    assert lines[0].startswith(
        f"{direct['class_name']}  {100 * direct['confidence']:.1f}%  "
        f"column {direct['column']}/{direct['columns']} (depth {direct['depth']}, "
        f"{direct['precision']}, "
    )
    assert lines[1].startswith("time: ") and "(no deadline)" in lines[1]
    assert lines[2].startswith(f"top-5: {direct['class_name']} ")


def test_forced_column(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(SAMPLE), "--url", server_url, "--column", "2", "--deadline-ms", "5000"]
    assert client.main(argv) == 0
    out = capsys.readouterr().out
    assert "column 2/4 " in out
    assert "of a 5000.0 ms deadline (met)" in out


def test_stream_prints_each_column(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert client.main([str(SAMPLE), "--url", server_url, "--stream"]) == 0
    header, *rows, final = capsys.readouterr().out.splitlines()
    assert header.split() == ["column", "depth", "precision", "class", "confidence", "elapsed_ms"]
    parsed = [ROW.match(row) for row in rows]
    assert all(parsed), rows
    columns = [int(m.group(1)) for m in parsed if m]
    assert columns[0] == 1
    assert columns == sorted(set(columns)) and columns[-1] == 4
    assert final.startswith("final: ")
    assert "reason: deepest" in final
    assert f"columns run: {', '.join(map(str, columns))};" in final


def test_stream_cascade_stops_when_confident(
    server_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Any confidence reaches a threshold of 0, so column 1 is the final answer.
    argv = [str(SAMPLE), "--url", server_url, "--stream", "--min-confidence", "0"]
    assert client.main(argv) == 0
    _, *rows, final = capsys.readouterr().out.splitlines()
    assert len(rows) == 1 and rows[0].split()[0] == "1"
    assert "from column 1;" in final and "reason: confident" in final


def test_server_error_exits_non_zero(
    server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert client.main([str(broken), "--url", server_url, "--stream"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("fractal classify: 400 Bad Request: ")


def test_unreachable_server_exits_non_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound but not listening
        assert client.main([str(SAMPLE), "--url", url, "--timeout-s", "5"]) == 1
    assert capsys.readouterr().err.startswith(f"fractal classify: {url}: ")


def test_imports_without_torch_or_onnxruntime() -> None:
    code = "import sys, service.client; print(sorted({'torch', 'onnxruntime'} & set(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    assert done.stdout.strip() == "[]"
