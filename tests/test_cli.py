"""The `fractal` command lists its subcommands; the serving side imports without torch."""

from __future__ import annotations

import subprocess
import sys

from fractal.cli import COMMANDS, main


def test_help_lists_every_subcommand(capsys: object) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    for name in COMMANDS:
        assert name in out


def test_console_script_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fractal.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "serve" in result.stdout and "train" in result.stdout


def test_unknown_command_fails() -> None:
    assert main(["no-such-command"]) == 2


def test_service_imports_without_torch() -> None:
    """Import every service module with torch made unimportable."""
    code = (
        "import sys, importlib, pkgutil\n"
        "sys.modules['torch'] = None\n"
        "import service\n"
        "for m in pkgutil.walk_packages(service.__path__, 'service.'):\n"
        "    importlib.import_module(m.name)\n"
        "assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
