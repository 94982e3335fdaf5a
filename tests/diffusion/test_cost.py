"""FLOPs and activation memory of the UNet, counted on the meta device, equal
hand counts and counts on a real model."""

from __future__ import annotations

import doctest

import torch
from torch.utils.flop_counter import FlopCounterMode

from dpsynth.config import ModelConfig
from dpsynth.diffusion import cost
from dpsynth.diffusion.cost import forward_backward_flops, saved_activation_bytes, unet_cost
from dpsynth.diffusion.unet import UNetSpec, build_unet
from dpsynth.privacy.per_example import use_vmap_friendly_attention

TINY = ModelConfig(block_out_channels=(16, 32), attention_levels=(1,), norm_num_groups=8)


def test_flops_match_a_hand_count() -> None:
    conv = torch.nn.Conv2d(2, 3, kernel_size=3, padding=1)
    lin = torch.nn.Linear(3 * 5 * 5, 4)
    net = torch.nn.Sequential(conv, torch.nn.Flatten(), lin)
    b = 2
    conv_fwd = 2 * b * (3 * 5 * 5) * (2 * 3 * 3)  # 2 FLOPs per multiply-add, per output
    lin_fwd = 2 * b * 75 * 4
    fwd, total = forward_backward_flops(lambda: net(torch.ones(b, 2, 5, 5)))
    assert fwd == conv_fwd + lin_fwd
    # backward: weight gradients of both, input gradient of the linear layer only
    # (the conv's input is data, which needs no gradient); biases are not counted
    assert total - fwd == conv_fwd + 2 * lin_fwd


def test_saved_activations_match_a_hand_count() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(75, 4))
    # the conv keeps its input (2x2x5x5 floats); ReLU its output (2x3x5x5), which the
    # linear layer keeps too, as a view: one storage, counted once; weights not at all
    assert saved_activation_bytes(net, lambda: net(torch.ones(2, 2, 5, 5))) == 4 * (100 + 150)


def test_unet_cost_on_meta_equals_counting_a_real_model() -> None:
    spec = UNetSpec(image_size=8, channels=3, num_classes=10, model=TINY)
    c = unet_cost(spec)
    net = build_unet(spec).train()  # real weights on the CPU, attention as in fine-tuning
    use_vmap_friendly_attention(net)  # (CPU's fused SDPA kernel is not counted)
    b = 3  # per image the same as unet_cost's batch of 2 (a batch of 1 saves views)
    x, t, y = torch.randn(b, 3, 8, 8), torch.tensor([10, 500, 999]), torch.tensor([3, 0, 10])
    with FlopCounterMode(display=False) as counter:
        out = net(x, t, class_labels=y)
    fwd = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        out.sample.sum().backward()
    assert (c.forward_flops * b, c.train_flops * b) == (fwd, fwd + counter.get_total_flops())
    assert c.num_parameters == sum(p.numel() for p in net.parameters())
    assert c.activation_bytes * b == saved_activation_bytes(
        net, lambda: net(x, t, class_labels=y).sample)


def test_cost_per_image_grows_with_the_image() -> None:
    small = unet_cost(UNetSpec(image_size=8, channels=3, num_classes=10, model=TINY))
    big = unet_cost(UNetSpec(image_size=16, channels=3, num_classes=10, model=TINY))
    assert big.num_parameters == small.num_parameters
    # convolutions scale with pixels (4x); attention at the coarse level with pixels^2
    assert 4 * small.forward_flops <= big.forward_flops <= 5 * small.forward_flops
    assert 3.5 * small.activation_bytes <= big.activation_bytes <= 5 * small.activation_bytes


def test_docstring_examples() -> None:
    result = doctest.testmod(cost)
    assert result.attempted >= 3 and result.failed == 0
