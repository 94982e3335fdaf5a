"""The non-private step gradient (`training.gradients.MeanLossGradient`): the clipped
gradient of the mean loss of a batch drawn from the checkpointed generator."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dpsynth.config import DiffusionConfig, ModelConfig
from dpsynth.diffusion.loss import DenoisingLoss
from dpsynth.diffusion.samplers import from_uint8
from dpsynth.diffusion.unet import UNetSpec, build_unet
from dpsynth.training.gradients import MeanLossGradient

SPEC = UNetSpec(8, 1, 3, ModelConfig(block_out_channels=(8, 16), norm_num_groups=4,
                                     attention_levels=(1,)))


@pytest.fixture
def setup() -> tuple[torch.nn.Module, DenoisingLoss, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (20, 8, 8, 1), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (20,), generator=g)
    loss = DenoisingLoss.from_config(DiffusionConfig(num_train_timesteps=50), SPEC.null_label)
    return build_unet(SPEC).train(), loss, x, y


@pytest.mark.parametrize("max_grad_norm", [1e9, 1e-3], ids=["unclipped", "clipped"])
def test_the_gradient_is_the_clipped_gradient_of_the_mean_loss(setup, max_grad_norm: float
                                                               ) -> None:
    net, loss, x, y = setup
    ref = copy.deepcopy(net)
    value = MeanLossGradient(net, loss, x, y, 6, torch.Generator().manual_seed(1),
                             torch.device("cpu"), max_grad_norm)(0)

    gen = torch.Generator().manual_seed(1)  # the same stream: indices, then the loss's draws
    idx = torch.randint(0, len(x), (6,), generator=gen)
    want = loss(ref, from_uint8(x[idx]), y[idx], gen).mean()
    want.backward()
    norm = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm()
    scale = min(1.0, max_grad_norm / (float(norm) + 1e-6))
    assert value == want.item()
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad * scale, rtol=1e-5, atol=1e-8, msg=name)
    total = torch.cat([p.grad.flatten() for p in net.parameters()]).norm()
    assert float(total) <= max_grad_norm * (1 + 1e-4)


def test_a_non_finite_loss_is_returned_without_a_gradient(setup, monkeypatch) -> None:
    net, loss, x, y = setup
    monkeypatch.setattr(DenoisingLoss, "per_example",
                        lambda self, *a, **k: torch.full((6,), float("nan"), requires_grad=True))
    value = MeanLossGradient(net, loss, x, y, 6, torch.Generator().manual_seed(1),
                             torch.device("cpu"))(0)
    assert math.isnan(value)
    assert all(p.grad is None for p in net.parameters())  # the loop stops: nothing to apply


def test_bf16_autocast_keeps_float32_gradients_close_to_float32(setup) -> None:
    """pretrain.precision=bf16: the forward and backward under bfloat16 autocast,
    the weights and the gradients in `.grad` float32, within 3% of float32's."""
    net, loss, x, y = setup
    ref = copy.deepcopy(net)
    grads = {}
    for precision, model in (("fp32", ref), ("bf16", net)):
        value = MeanLossGradient(model, loss, x, y, 6, torch.Generator().manual_seed(1),
                                 torch.device("cpu"), 1e9, precision=precision)(0)
        assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())
        grads[precision] = (value, torch.cat([p.grad.flatten() for p in model.parameters()]))
    (v32, g32), (v16, g16) = grads["fp32"], grads["bf16"]
    assert v16 == pytest.approx(v32, rel=2e-2)
    assert (g16 - g32).norm() <= 3e-2 * g32.norm()
