"""LoRA adapters for DP fine-tuning: start as the pre-trained net, train through
per-example gradients, merge into plain weights."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DModel

from dpsynth.config import DiffusionConfig
from dpsynth.diffusion.lora import adaptable, add_lora, merge_lora
from dpsynth.diffusion.loss import DenoisingLoss
from dpsynth.privacy.draws import draw_copies
from dpsynth.privacy.per_example import per_example_grads, use_vmap_friendly_attention


def outputs(net: UNet2DModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=g)
    return net(x, torch.tensor([5, 400, 900]), class_labels=torch.tensor([0, 1, 2])).sample


def test_adapters_start_at_the_pretrained_net_and_merge_to_plain_weights(
        tiny_net: UNet2DModel) -> None:
    reference = copy.deepcopy(tiny_net)
    with torch.no_grad():
        before = outputs(tiny_net)
    names = add_lora(tiny_net, rank=2, patterns=["*"])
    assert names == adaptable(reference, ["*"]) and len(names) > 10
    params = dict(tiny_net.named_parameters())
    for name in names:  # each adapted weight is frozen, its adapter trained
        assert not params[f"{name}.parametrizations.weight.original"].requires_grad
        assert params[f"{name}.parametrizations.weight.0.lora_B"].requires_grad
    with torch.no_grad():
        torch.testing.assert_close(outputs(tiny_net), before)  # B = 0: the same function
        for n, p in tiny_net.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)  # as if trained
        adapted = outputs(tiny_net)
    assert (adapted - before).abs().max() > 1e-3
    shadow = copy.deepcopy(tiny_net)  # the EMA keeps a deep copy: merging one must not break it
    assert merge_lora(tiny_net) == len(names)
    with torch.no_grad():
        torch.testing.assert_close(outputs(tiny_net), adapted, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outputs(shadow), adapted, atol=1e-5, rtol=1e-5)
    assert set(tiny_net.state_dict()) == set(reference.state_dict())  # an ordinary UNet
    assert type(tiny_net.conv_in) is torch.nn.Conv2d
    # each weight moved by a matrix of rank <= 2
    delta = (tiny_net.conv_in.weight - reference.conv_in.weight).reshape(len(reference.conv_in.weight), -1)
    assert torch.linalg.matrix_rank(delta.detach()) <= 2


def test_per_example_gradients_reach_the_adapters_only(tiny_net: UNet2DModel) -> None:
    use_vmap_friendly_attention(tiny_net)
    tiny_net.requires_grad_(False)  # what finetune.select_trainable does first
    add_lora(tiny_net, rank=2, patterns=["down_blocks.*"])
    for n, p in tiny_net.named_parameters():
        if n.endswith("lora_B"):
            torch.nn.init.normal_(p, 0, 0.05)  # so that A gets a gradient too
    loss = DenoisingLoss.from_config(DiffusionConfig(), null_label=3)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    draws = draw_copies(loss, x, torch.tensor([0, 1, 2, 0]), 2, "none",
                        torch.Generator().manual_seed(0))
    grads, _ = per_example_grads(tiny_net.train(), loss, *draws)
    assert set(grads) == {n for n, p in tiny_net.named_parameters() if p.requires_grad}
    assert all(n.startswith("down_blocks.") and "lora_" in n for n in grads)
    assert all(g.shape[0] == 4 and g.abs().sum() > 0 for g in grads.values())


def test_norms_are_not_adapted_and_merging_a_plain_net_is_a_no_op(tiny_net: UNet2DModel) -> None:
    reference = copy.deepcopy(tiny_net)
    assert add_lora(tiny_net, rank=2, patterns=["*norm*"]) == []  # GroupNorm: no adapter
    assert merge_lora(tiny_net) == 0
    assert all(torch.equal(a, b) for a, b in zip(tiny_net.state_dict().values(),
                                                 reference.state_dict().values()))
