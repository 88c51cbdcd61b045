"""`fractal bench-train`: fair turns, the arithmetic, and a smoke run."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from model.bench import SETUPS, main, ratios, report, run_rounds, setup_config
from model.config import preset


class FakeClock:
    """Time that moves only when a step runs: each set-up has its own step cost."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def step(self, name: str, seconds: float) -> Callable[[], None]:
        def run() -> None:
            self.calls.append(name)
            self.now += seconds

        return run


def test_rounds_take_turns_in_rotating_order() -> None:
    clock = FakeClock()
    costs = {"skip": 0.5, "off": 1.0, "mask": 2.0}
    steps = {name: clock.step(name, cost) for name, cost in costs.items()}
    rates = run_rounds(steps, steps_per_round=2, rounds=3, images_per_step=10, clock=clock)
    assert rates == {"skip": [20.0] * 3, "off": [10.0] * 3, "mask": [5.0] * 3}
    firsts = [clock.calls[i * 6] for i in range(3)]
    assert firsts == ["skip", "off", "mask"]


def test_ratios_and_report() -> None:
    assert ratios({"skip": 30.0, "off": 20.0, "mask": 15.0}) == {
        "skip/off": 1.5,
        "skip/mask": 2.0,
        "mask/off": 0.75,
    }
    text = report({"skip": [30.0, 29.0, 31.0], "off": [20.0] * 3, "mask": [15.0] * 3})
    assert "skip/off 1.50x" in text and "skip/mask 2.00x" in text
    assert [line.split()[0] for line in text.splitlines()[1:4]] == ["skip", "off", "mask"]


def test_setups() -> None:
    config = preset("small-c4")
    by_name = {s.name: s for s in SETUPS}
    off = setup_config(config, by_name["off"])
    assert (off.local_drop, off.global_ratio) == (0.0, 0.0)
    assert setup_config(config, by_name["skip"]) == config
    assert by_name["mask"].mode == "mask" and by_name["skip"].mode == "skip"


def test_smoke_run(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    try:
        argv = ["--preset", "tiny-c4", "--batch-size", "2", "--steps", "1", "--rounds", "1",
                "--warmup", "0", "--threads", "1"]  # fmt: skip
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "images/s" in out and "skip/off" in out and "mask/off" in out
