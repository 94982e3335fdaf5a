"""Per-example gradients of the K-averaged loss and their clipping (PRIVACY.md
rules 2 and 3): they equal a loop over single examples for every layer type of
the real UNet, their memory does not grow with K, and clipping bounds each
example's contribution by C as one vector."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor

from dpsynth.diffusion.loss import DenoisingLoss
from dpsynth.privacy.draws import draw_copies
from dpsynth.privacy.per_example import (Grads, clipped_sum, per_example_grads,
                                         per_example_norms, use_vmap_friendly_attention)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # the SDPA variant is *meant* to hit vmap's slow fallback loop
              pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")]

Split = tuple[torch.Tensor, torch.Tensor]


def copies(loss: DenoisingLoss, split: Split, b: int, k: int, seed: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = split
    return draw_copies(loss, x[:b], y[:b], k, "none", torch.Generator().manual_seed(seed))


def flat(grads: Grads, i: int) -> torch.Tensor:
    """Example i's whole gradient as one vector."""
    return torch.cat([g[i].flatten() for g in grads.values()])


@pytest.mark.parametrize("attention", ["classic", "sdpa"])
def test_per_example_grads_equal_a_loop_over_examples(dp_net: UNet2DModel, dp_loss: DenoisingLoss,
                                                      private_split: Split,
                                                      attention: str) -> None:
    """Every parameter of every layer type, with (x, t, y) inputs and K = 3 copies."""
    layer_types = {type(m) for m in dp_net.modules()}
    for kind in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.Embedding,
                 Attention):
        assert kind in layer_types, f"the tiny UNet lost its {kind.__name__} layers"
    if attention == "classic":
        use_vmap_friendly_attention(dp_net)
    b, k = 3, 3
    x0, labels, t, noise = copies(dp_loss, private_split, b, k)
    assert (labels == dp_loss.null_label).any() and (labels != dp_loss.null_label).any()
    grads, losses = per_example_grads(dp_net, dp_loss, x0, labels, t, noise)

    params = dict(dp_net.named_parameters())
    assert grads.keys() == params.keys()
    for i in range(b):
        dp_net.zero_grad()
        value = dp_loss.per_example(dp_net, x0[i], labels[i], t[i], noise[i]).mean()
        value.backward()
        torch.testing.assert_close(losses[i], value.detach(), atol=1e-6, rtol=1e-5)
        for name, p in params.items():
            assert grads[name].shape == (b, *p.shape)
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient"
            torch.testing.assert_close(grads[name][i], p.grad, atol=1e-5, rtol=1e-4,
                                       msg=lambda m, n=name, j=i: f"{n}[{j}]: {m}")
    # the examples' gradients really differ, so a batch gradient broadcast to every
    # example (or examples mixed by a batch statistic) could not pass the loop above
    assert not torch.allclose(flat(grads, 0), flat(grads, 1), atol=1e-3)


def test_k_averaged_gradient_is_mean_of_copy_gradients(dp_net: UNet2DModel,
                                                       dp_loss: DenoisingLoss,
                                                       private_split: Split) -> None:
    """The gradient of the mean of K losses: what clipping then bounds as one vector."""
    use_vmap_friendly_attention(dp_net)
    b, k = 2, 4
    x0, labels, t, noise = copies(dp_loss, private_split, b, k)
    grads, losses = per_example_grads(dp_net, dp_loss, x0, labels, t, noise)
    # each copy treated as its own example (K = 1)
    per_copy, copy_losses = per_example_grads(
        dp_net, dp_loss, x0.flatten(0, 1).unsqueeze(1), labels.reshape(-1, 1),
        t.reshape(-1, 1), noise.flatten(0, 1).unsqueeze(1))
    torch.testing.assert_close(losses, copy_losses.view(b, k).mean(1))
    for name, g in grads.items():
        torch.testing.assert_close(g, per_copy[name].view(b, k, *g.shape[1:]).mean(1),
                                   atol=1e-6, rtol=1e-4)


def test_per_example_gradient_memory_does_not_grow_with_k(dp_net: UNet2DModel,
                                                          dp_loss: DenoisingLoss,
                                                          private_split: Split) -> None:
    """One gradient per example, [b, *param], whatever K (K=1 and K=8)."""
    use_vmap_friendly_attention(dp_net)
    b = 2
    n_params = sum(p.numel() for p in dp_net.parameters())
    shapes = {}
    for k in (1, 8):
        grads, losses = per_example_grads(dp_net, dp_loss, *copies(dp_loss, private_split, b, k))
        assert losses.shape == (b,)
        shapes[k] = {n: g.shape for n, g in grads.items()}
        assert sum(g.numel() * g.element_size() for g in grads.values()) == b * n_params * 4
    assert shapes[1] == shapes[8]
    assert all(s[0] == b for s in shapes[8].values())


def test_per_example_norms_is_the_norm_of_the_whole_vector() -> None:
    g = torch.Generator().manual_seed(0)
    grads = {"a": torch.randn(4, 3, 2, generator=g), "b": torch.randn(4, 5, generator=g),
             "c": torch.randn(4, generator=g)}
    expected = torch.stack([flat(grads, i).norm() for i in range(4)])
    torch.testing.assert_close(per_example_norms(grads), expected)


def per_tensor_clipped_sum(grads: Grads, max_grad_norm: float) -> Grads:
    """A deliberately wrong clipping: each parameter tensor clipped to C on its own,
    so an example's whole gradient can reach C * sqrt(number of tensors)."""
    out = {}
    for n, g in grads.items():
        norms = g.flatten(1).norm(dim=1)
        factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        out[n] = torch.einsum("b,b...->...", factor, g)
    return out


def test_each_example_contribution_has_norm_at_most_c(dp_net: UNet2DModel,
                                                      dp_loss: DenoisingLoss,
                                                      private_split: Split) -> None:
    """Fed one example at a time: norm <= C, exactly C (same direction) when the
    example was above C, and untouched when it was below; a batch's sum <= b*C."""
    use_vmap_friendly_attention(dp_net)
    b = 6
    grads, _ = per_example_grads(dp_net, dp_loss, *copies(dp_loss, private_split, b, 2))
    norms = per_example_norms(grads)
    c = norms.median().item()  # some examples above C, some below
    above, below = norms > c, norms < c
    assert above.any() and below.any()

    for i in range(b):
        one = {n: g[i:i + 1] for n, g in grads.items()}
        summed, pre_norm = clipped_sum(one, c)
        torch.testing.assert_close(pre_norm, norms[i:i + 1])
        vec = torch.cat([s.flatten() for s in summed.values()])
        assert vec.norm() <= c * (1 + 1e-6)
        if above[i]:
            torch.testing.assert_close(vec.norm(), torch.tensor(c), rtol=1e-5, atol=0)
            cosine = torch.nn.functional.cosine_similarity(vec, flat(grads, i), dim=0)
            assert cosine > 1 - 1e-5
        else:
            torch.testing.assert_close(vec, flat(grads, i), rtol=1e-6, atol=0)

    summed, _ = clipped_sum(grads, c)
    assert torch.cat([s.flatten() for s in summed.values()]).norm() <= b * c * (1 + 1e-6)
    # a C larger than every norm leaves the batch sum untouched
    unclipped, _ = clipped_sum(grads, norms.max().item() * 2)
    for n, g in grads.items():
        torch.testing.assert_close(unclipped[n], g.sum(0), rtol=1e-6, atol=1e-7)

    # power: clipping tensor by tensor instead of the whole vector breaks the bound
    wrong = per_tensor_clipped_sum({n: g[:1] for n, g in grads.items()}, c / 10)
    assert torch.cat([s.flatten() for s in wrong.values()]).norm() > c / 10 * 1.5


def test_clipped_sum_of_zero_gradients_is_zero() -> None:
    """A zero gradient (norm 0) must not divide by zero."""
    summed, norms = clipped_sum({"w": torch.zeros(3, 4)}, 1.0)
    assert torch.equal(summed["w"], torch.zeros(4)) and torch.equal(norms, torch.zeros(3))


def test_vmap_friendly_attention_swaps_every_processor_and_keeps_the_output(
        dp_net: UNet2DModel, private_split: Split) -> None:
    x, y = private_split
    t = torch.arange(len(x)) % 50
    with torch.no_grad():
        before = dp_net(x, t, class_labels=y).sample
    use_vmap_friendly_attention(dp_net)
    attentions = [m for m in dp_net.modules() if isinstance(m, Attention)]
    assert attentions and all(type(m.processor) is AttnProcessor for m in attentions)
    with torch.no_grad():
        after = dp_net(x, t, class_labels=y).sample
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
