"""Deadline distributions from a short text spec, sampled with a seed.

Specs (milliseconds):
- `none`: no `X-Deadline-Ms` header (the server's default applies);
- `fixed:50`: every request gets 50 ms;
- `uniform:10:80`: uniform on [10, 80];
- `mixture:0.7*fixed:20,0.3*uniform:50:200`: a weighted mixture of the above (weights
  are normalised; mixtures do not nest).

A sampled deadline of NaN means "no deadline".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NoDeadline:
    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        return np.full(count, np.nan)

    def spec(self) -> str:
        return "none"


@dataclass(frozen=True)
class Fixed:
    ms: float

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        return np.full(count, self.ms)

    def spec(self) -> str:
        return f"fixed:{self.ms:g}"


@dataclass(frozen=True)
class Uniform:
    low_ms: float
    high_ms: float

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(self.low_ms, self.high_ms, count)

    def spec(self) -> str:
        return f"uniform:{self.low_ms:g}:{self.high_ms:g}"


Simple = NoDeadline | Fixed | Uniform


@dataclass(frozen=True)
class Mixture:
    weights: tuple[float, ...]
    """Normalised: they sum to 1."""
    parts: tuple[Simple, ...]

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        which = rng.choice(len(self.parts), size=count, p=np.asarray(self.weights))
        out = np.empty(count)
        for i, part in enumerate(self.parts):
            mask = which == i
            out[mask] = part.sample(int(mask.sum()), rng)
        return out

    def spec(self) -> str:
        return "mixture:" + ",".join(
            f"{w:g}*{p.spec()}" for w, p in zip(self.weights, self.parts, strict=True)
        )


Deadline = Simple | Mixture


def _positive(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"deadline spec {spec!r}: {text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"deadline spec {spec!r}: {text!r} must be a positive number")
    return value


def _simple(spec: str) -> Simple:
    kind, *args = spec.strip().split(":")
    if kind == "none" and not args:
        return NoDeadline()
    if kind == "fixed" and len(args) == 1:
        return Fixed(_positive(args[0], spec))
    if kind == "uniform" and len(args) == 2:
        low, high = _positive(args[0], spec), _positive(args[1], spec)
        if low > high:
            raise ValueError(f"deadline spec {spec!r}: low {low:g} is above high {high:g}")
        return Uniform(low, high)
    raise ValueError(
        f"bad deadline spec {spec!r}: expected none, fixed:MS, uniform:LOW:HIGH or "
        "mixture:W*SPEC,W*SPEC,..."
    )


def parse_deadline(spec: str) -> Deadline:
    """The distribution a spec names; ValueError with the reason when it is malformed."""
    text = spec.strip()
    if not text.startswith("mixture:"):
        return _simple(text)
    weights: list[float] = []
    parts: list[Simple] = []
    for item in text.removeprefix("mixture:").split(","):
        weight, star, part = item.partition("*")
        if not star:
            raise ValueError(f"deadline spec {spec!r}: mixture part {item!r} needs WEIGHT*SPEC")
        if part.strip().startswith("mixture:"):
            raise ValueError(f"deadline spec {spec!r}: mixtures do not nest")
        weights.append(_positive(weight, spec))
        parts.append(_simple(part))
    total = sum(weights)
    return Mixture(tuple(w / total for w in weights), tuple(parts))


def sample_deadlines(dist: Deadline, count: int, seed: int) -> np.ndarray:
    """`count` deadlines in ms (NaN: none), the same for the same seed."""
    return dist.sample(count, np.random.default_rng(seed))
