"""FractalNet invariants over every column: shapes, gradients, layout, skipped paths."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from model.config import PRESETS, FractalConfig
from model.droppath import DropPlan, full_keep, needed_depths, sample_plan
from model.network import ColumnNet, ConvUnit, FractalBlock, FractalNet, column_parameters

# (channels, columns, image size): final maps of 1x1 and larger, C = 1..4.
TINY = [
    FractalConfig(channels=(4,), columns=1, image_size=4),
    FractalConfig(channels=(4, 8), columns=2, image_size=4),
    FractalConfig(channels=(4, 8), columns=3, image_size=8),
    FractalConfig(channels=(4, 6, 8), columns=4, image_size=8, num_classes=5),
]
IDS = [f"C{c.columns}-B{c.num_blocks}-{c.image_size}px" for c in TINY]


def make_net(config: FractalConfig, seed: int = 0) -> FractalNet:
    torch.manual_seed(seed)
    return FractalNet(config, seed=seed)


def images(config: FractalConfig, n: int = 4, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, config.in_channels, config.image_size, config.image_size, generator=gen)


def block_of(net: FractalNet, i: int) -> FractalBlock:
    block = net.blocks[i]
    assert isinstance(block, FractalBlock)
    return block


def units_of(block: FractalBlock, column: int) -> list[nn.Module]:
    units = block.columns[column - 1]
    assert isinstance(units, nn.ModuleList)
    return list(units)


def classify(net: FractalNet, x: torch.Tensor) -> torch.Tensor:
    """The network's tail: global average pool when larger than 1x1, then the head."""
    return net.head(x.mean(dim=(2, 3)))


def reference_block(block: FractalBlock, z: torch.Tensor) -> torch.Tensor:
    """The expansion rule written as a recursion, independent of `join_layout`:
    f1 = conv, f(c+1)(z) = join(fc(fc(z)), conv(z)), the outer join merged with the
    second fc's last join. A sub-fractal of size c uses the block's deepest c columns;
    units of each column are consumed in order of depth."""
    columns = block.num_columns
    next_unit = dict.fromkeys(range(1, columns + 1), 0)

    def conv(column: int, x: torch.Tensor) -> torch.Tensor:
        unit = units_of(block, column)[next_unit[column]]
        next_unit[column] += 1
        return unit(x)

    def join_inputs(c: int, x: torch.Tensor) -> list[torch.Tensor]:
        shallow = columns - c + 1
        if c == 1:
            return [conv(shallow, x)]
        middle = torch.stack(join_inputs(c - 1, x)).mean(dim=0)
        return [*join_inputs(c - 1, middle), conv(shallow, x)]

    out = torch.stack(join_inputs(columns, z)).mean(dim=0)
    assert all(next_unit[k] == 2 ** (k - 1) for k in next_unit), "every unit used once"
    return out


@pytest.mark.parametrize("config", TINY, ids=IDS)
def test_shapes_and_finite_outputs(config: FractalConfig) -> None:
    net = make_net(config)
    x = images(config)
    for mode in (True, False):
        net.train(mode)
        for column in [None, *range(1, config.columns + 1)]:
            out = net(x, column=column)
            assert out.shape == (len(x), config.num_classes)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("config", TINY, ids=IDS)
def test_gradients_reach_exactly_the_column(config: FractalConfig) -> None:
    for column in range(1, config.columns + 1):
        net = make_net(config)
        net.train()
        net(images(config), column=column).logsumexp(dim=1).mean().backward()
        used = {id(p) for p in net.head.parameters()}
        for i in range(config.num_blocks):
            used |= {id(p) for p in block_of(net, i).columns[column - 1].parameters()}
        for name, p in net.named_parameters():
            if id(p) in used:
                assert p.grad is not None, f"column {column}: {name} got no gradient"
                assert torch.isfinite(p.grad).all()
                assert p.grad.abs().sum() > 0, f"column {column}: {name} has a zero gradient"
            else:
                assert p.grad is None, f"column {column}: {name} is outside it yet got a gradient"
        assert column_parameters(net, column) == sum(
            p.numel() for p in net.parameters() if id(p) in used
        )


def test_whole_network_gradients_reach_every_parameter() -> None:
    config = TINY[-1]
    net = make_net(config)
    net.train()
    plan = DropPlan(global_column=None, local_keep=(full_keep(config.columns),) * 3)
    net(images(config), plan=plan).logsumexp(dim=1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


@pytest.mark.parametrize("config", TINY, ids=IDS)
def test_column_forward_is_the_plain_chain(config: FractalConfig) -> None:
    net = make_net(config).eval()
    x = images(config)
    for column in range(1, config.columns + 1):
        h = x
        for i in range(config.num_blocks):
            for unit in units_of(block_of(net, i), column):
                h = unit(h)
            h = net.pool(h)
        with torch.no_grad():
            torch.testing.assert_close(net(x, column=column), classify(net, h))
            torch.testing.assert_close(ColumnNet(net, column)(x), classify(net, h))


@pytest.mark.parametrize("config", TINY, ids=IDS)
def test_whole_network_matches_the_expansion_rule(config: FractalConfig) -> None:
    net = make_net(config).eval()
    x = images(config)
    with torch.no_grad():
        h = x
        for i in range(config.num_blocks):
            h = net.pool(reference_block(block_of(net, i), h))
        torch.testing.assert_close(net(x), classify(net, h))


def count_unit_calls(net: FractalNet, x: torch.Tensor, plan: DropPlan) -> int:
    calls = 0

    def hook(*_: object) -> None:
        nonlocal calls
        calls += 1

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, ConvUnit)]
    try:
        with torch.no_grad():
            net(x, plan=plan)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def expected_unit_calls(config: FractalConfig, plan: DropPlan) -> int:
    total = 0
    for i in range(config.num_blocks):
        keep = plan.keep_for_block(i, config.columns)
        needed = needed_depths(config.columns, keep)
        total += sum(len(keep[d - 1]) for d in needed if d > 0)
    return total


def local_plans(config: FractalConfig, count: int) -> list[DropPlan]:
    """Seeded local plans with a high drop rate, so that many paths are dropped."""
    rng = random.Random(4)
    return [sample_plan(rng, config.columns, config.num_blocks, 0.5, 0.0) for _ in range(count)]


def test_dropped_paths_do_no_work() -> None:
    config = FractalConfig(channels=(4, 4, 4), columns=4, image_size=8)
    net = make_net(config).eval()
    x = images(config, n=2)
    full_units = config.num_blocks * (2**config.columns - 1)
    for column in range(1, config.columns + 1):
        plan = DropPlan(global_column=column)
        assert count_unit_calls(net, x, plan) == config.num_blocks * 2 ** (column - 1)
        assert expected_unit_calls(config, plan) == config.num_blocks * 2 ** (column - 1)
    calls = [count_unit_calls(net, x, plan) for plan in local_plans(config, 40)]
    assert calls == [expected_unit_calls(config, plan) for plan in local_plans(config, 40)]
    assert min(calls) < full_units, "no sampled plan skipped any unit"
    net.drop_mode = "mask"
    assert count_unit_calls(net, x, DropPlan(global_column=1)) == full_units


@pytest.mark.parametrize("config", TINY[1:], ids=IDS[1:])
def test_mask_mode_equals_skip_mode(config: FractalConfig) -> None:
    net = make_net(config).eval()
    x = images(config)
    plans = [DropPlan(global_column=k) for k in range(1, config.columns + 1)]
    plans += local_plans(config, 10)
    with torch.no_grad():
        for plan in plans:
            net.drop_mode = "skip"
            skipped = net(x, plan=plan)
            net.drop_mode = "mask"
            masked = net(x, plan=plan)
            torch.testing.assert_close(masked, skipped)


def test_training_mode_samples_a_plan_per_call() -> None:
    config = TINY[-1]
    net = make_net(config).train()
    for module in net.modules():  # isolate drop-path from dropout
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    x = images(config)
    with torch.no_grad():
        outs = [net(x) for _ in range(6)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    off = make_net(
        FractalConfig(
            channels=(4, 6, 8),
            columns=4,
            image_size=8,
            num_classes=5,
            local_drop=0.0,
            global_ratio=0.0,
        )
    )
    assert not off.drop_path_enabled


def test_paper_preset_parameter_count() -> None:
    with torch.device("meta"):
        net = FractalNet(PRESETS["paper-cifar"])
    assert sum(p.numel() for p in net.parameters()) == 33_724_618
    assert net.config.column_depth(3) == 20


def first_conv(net: FractalNet) -> nn.Conv2d:
    return next(m for m in net.modules() if isinstance(m, nn.Conv2d))


def test_xavier_and_torch_init() -> None:
    xavier = make_net(TINY[1])
    default = make_net(FractalConfig(channels=(4, 8), columns=2, image_size=4, init="torch"))
    # 3 -> 4 channels, 3x3: Xavier's bound sqrt(6 / (27 + 36)) = 0.31 exceeds PyTorch's
    # default bound 1 / sqrt(27) = 0.19.
    assert first_conv(xavier).weight.abs().max() > 0.25 > first_conv(default).weight.abs().max()
