"""WRN-d-k: output shapes at any size >= 8 with 1 or 3 channels, and parameter
counts pinned against the WRN paper's (Zagoruyko & Komodakis 2016, Table 2:
WRN-40-4 8.9M, WRN-28-10 36.5M parameters at 32x32x3 with 10 classes)."""

from __future__ import annotations

import pytest
import torch

from dpsynth.eval.wrn import WideResNet


def num_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize(("depth", "widen", "channels", "expected"), [
    (10, 2, 3, 303_706),
    (10, 2, 1, 303_418),  # one input channel: 2 x 16 x 3 x 3 = 288 fewer stem weights
    (40, 4, 3, 8_949_210),  # the paper's CIFAR-10 classifier: "8.9M"
    (28, 10, 3, 36_479_194),  # WRN paper's best CIFAR model: "36.5M"
])
def test_parameter_counts_are_pinned(depth: int, widen: int, channels: int,
                                     expected: int) -> None:
    assert num_params(WideResNet(depth, widen, num_classes=10, channels=channels)) == expected


@pytest.mark.parametrize(("depth", "widen", "channels", "size", "num_classes"), [
    (10, 2, 3, 32, 10), (40, 4, 3, 32, 10), (10, 2, 1, 8, 10), (16, 1, 1, 9, 3),
    (10, 1, 3, 64, 2),
])
def test_logits_have_one_row_per_image_and_one_column_per_class(
        depth: int, widen: int, channels: int, size: int, num_classes: int) -> None:
    net = WideResNet(depth, widen, num_classes, channels).eval()
    out = net(torch.randn(3, channels, size, size))
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()


def test_blocks_per_group_follow_the_depth() -> None:
    # n = (d - 4) / 6 blocks in each of the three groups; two 3x3 convs per block
    for depth, n in [(10, 1), (16, 2), (40, 6)]:
        net = WideResNet(depth, 1, 10, 3)
        assert len(net.blocks) == 3 * n
        convs3 = [m for m in net.modules()
                  if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
        assert len(convs3) == 1 + 2 * 3 * n  # stem + blocks (+ fc = depth layers in all)


def test_dropout_only_acts_in_training_mode() -> None:
    net = WideResNet(10, 1, 10, 1, dropout=0.5)
    x = torch.randn(4, 1, 8, 8)
    net.eval()
    assert torch.equal(net(x), net(x))
    net.train()
    torch.manual_seed(0)
    a = net(x)
    torch.manual_seed(1)
    assert not torch.equal(a, net(x))


@pytest.mark.parametrize("kwargs", [{"depth": 12}, {"depth": 4}, {"widen": 0},
                                    {"channels": 2}])
def test_bad_architectures_are_refused(kwargs: dict) -> None:
    args = {"depth": 10, "widen": 1, "num_classes": 10, "channels": 3} | kwargs
    with pytest.raises(ValueError):
        WideResNet(**args)
