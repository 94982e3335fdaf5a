"""EMA of weights: the update rule, its warm-up, and buffer copying, checked on a
one-parameter module where the closed form is known."""

from __future__ import annotations

import math

import pytest
import torch

from dpsynth.diffusion.ema import EMA


class Scalar(torch.nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([value], dtype=torch.float64))
        self.register_buffer("count", torch.tensor([0.0], dtype=torch.float64))


def set_value(net: Scalar, value: float) -> None:
    with torch.no_grad():
        net.w.fill_(value)


def warmed(decay: float, n: int) -> float:
    return min(decay, (1 + n) / (10 + n))


def test_first_update_uses_the_warm_up_decay() -> None:
    net = Scalar(2.0)
    ema = EMA(net, decay=0.999)
    set_value(net, 13.0)
    ema.update(net)
    # n = 1: d = min(0.999, 2 / 11) = 2/11
    assert ema.num_updates == 1
    assert float(ema.shadow.w) == pytest.approx(2 / 11 * 2.0 + 9 / 11 * 13.0, abs=1e-12)


def test_constant_weights_closed_form() -> None:
    # shadow_n = c + (s_0 - c) * prod_{k<=n} d_k for constant weights c
    decay, s0, c = 0.9, 1.0, -3.0
    net = Scalar(s0)
    ema = EMA(net, decay)
    set_value(net, c)
    prod = 1.0
    for n in range(1, 201):
        ema.update(net)
        prod *= warmed(decay, n)
        assert float(ema.shadow.w) == pytest.approx(c + (s0 - c) * prod, abs=1e-10), n
    # from n = 80 on ((1 + n) / (10 + n) >= 0.9) the decay is exactly `decay`
    assert warmed(decay, 80) == decay and warmed(decay, 79) < decay
    before = float(ema.shadow.w) - c
    ema.update(net)
    assert float(ema.shadow.w) - c == pytest.approx(decay * before, rel=1e-9)


def test_changing_weights_follow_the_recursion() -> None:
    decay = 0.5
    values = [math.sin(k) * 10 for k in range(30)]
    net = Scalar(0.0)
    ema = EMA(net, decay)
    expected = 0.0
    for n, v in enumerate(values, start=1):
        set_value(net, v)
        ema.update(net)
        d = warmed(decay, n)
        expected = d * expected + (1 - d) * v
        assert float(ema.shadow.w) == pytest.approx(expected, abs=1e-10)


def test_zero_decay_copies_the_weights() -> None:
    net = Scalar(1.0)
    ema = EMA(net, 0.0)
    set_value(net, 4.5)
    ema.update(net)
    assert float(ema.shadow.w) == 4.5


def test_buffers_are_copied_not_averaged() -> None:
    net = Scalar(1.0)
    ema = EMA(net, 0.99)
    net.count.fill_(7.0)
    ema.update(net)
    assert float(ema.shadow.count) == 7.0


def test_shadow_is_a_frozen_independent_copy() -> None:
    net = Scalar(1.0)
    ema = EMA(net, 0.9)
    assert ema.shadow is not net and not ema.shadow.training
    assert all(not p.requires_grad for p in ema.shadow.parameters())
    assert net.w.requires_grad  # the trained network is untouched
    set_value(net, 5.0)
    assert float(ema.shadow.w) == 1.0  # no aliasing before an update
    ema.update(net)
    assert float(net.w.detach()) == 5.0  # update reads the network, never writes it


def test_works_on_a_real_module_with_many_parameters() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GroupNorm(2, 4))
    start = {k: v.clone() for k, v in net.state_dict().items()}
    ema = EMA(net, 0.999)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)
    for k, v in ema.shadow.state_dict().items():
        torch.testing.assert_close(v, start[k] + 9 / 11)  # d = 2/11 -> moves 9/11 of the way
