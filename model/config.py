"""FractalNet configuration: one dataclass, a table of named presets, CLI overrides.

The config is read by the network and saved in every checkpoint, so a checkpoint alone
rebuilds its model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _paper_dropout(num_blocks: int) -> tuple[float, ...]:
    """The paper's dropout schedule: 0, 0.1, 0.2, ... one rate per block."""
    return tuple(round(0.1 * i, 2) for i in range(num_blocks))


@dataclass(frozen=True)
class FractalConfig:
    num_classes: int = 10
    """Number of output classes."""
    channels: tuple[int, ...] = (64, 128, 256, 512, 512)
    """Output channels of each block; its length is the number of blocks B."""
    columns: int = 3
    """Number of columns C per block; column k holds 2**(k-1) convolutions."""
    in_channels: int = 3
    """Channels of the input image."""
    dropout: tuple[float, ...] | None = None
    """Dropout rate per block, applied after every conv unit; None: 0, .1, .2, ..."""
    local_drop: float = 0.15
    """Local drop-path: probability of dropping each input of each join."""
    global_ratio: float = 0.5
    """Share of mini-batches that use global drop-path (one column for the whole net)."""
    image_size: int = 32
    """Height and width of the (square) input image."""
    init: str = "xavier"
    """Weight init: "xavier" (the paper) or "torch" (PyTorch's defaults)."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Free-form notes saved with the config (never read by the network)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.dropout is None:
            object.__setattr__(self, "dropout", _paper_dropout(len(self.channels)))
        else:
            object.__setattr__(self, "dropout", tuple(float(d) for d in self.dropout))
        if not self.channels:
            raise ValueError("channels must name at least one block")
        if self.columns < 1:
            raise ValueError("columns must be at least 1")
        if len(self.block_dropout) != len(self.channels):
            raise ValueError("dropout needs one rate per block")
        if not all(0.0 <= d < 1.0 for d in self.block_dropout):
            raise ValueError("dropout rates must lie in [0, 1)")
        if not 0.0 <= self.local_drop < 1.0:
            raise ValueError("local_drop must lie in [0, 1)")
        if not 0.0 <= self.global_ratio <= 1.0:
            raise ValueError("global_ratio must lie in [0, 1]")
        if self.init not in ("xavier", "torch"):
            raise ValueError("init must be 'xavier' or 'torch'")

    @property
    def block_dropout(self) -> tuple[float, ...]:
        assert self.dropout is not None
        return self.dropout

    @property
    def num_blocks(self) -> int:
        return len(self.channels)

    def column_depth(self, column: int) -> int:
        """Conv layers on column `column`'s path through the whole network."""
        return self.num_blocks * 2 ** (column - 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FractalConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


PRESETS: dict[str, FractalConfig] = {
    # The paper's 20-layer CIFAR network (B=5, C=3).
    "paper-cifar": FractalConfig(channels=(64, 128, 256, 512, 512), columns=3),
    # C=4 layouts that train on 2 CPU cores: four anytime levels.
    "cifar-c4": FractalConfig(channels=(32, 64, 128, 128), columns=4),
    "small-c4": FractalConfig(channels=(16, 32, 64, 64), columns=4),
    # Seconds to train: tests and the digits default.
    "tiny-c4": FractalConfig(channels=(16, 32), columns=4, image_size=16),
}


def preset(name: str, **overrides: Any) -> FractalConfig:
    """A named preset with `dataclasses.replace` overrides (None values are ignored)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    base = PRESETS[name]
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "channels" in changes and "dropout" not in changes:
        changes["dropout"] = _paper_dropout(len(changes["channels"]))
    return dataclasses.replace(base, **changes)
