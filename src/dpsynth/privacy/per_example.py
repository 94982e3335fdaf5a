"""Per-example gradients of the K-averaged loss, and their clipping
(PRIVACY.md rules 2 and 3).

Each example's loss is the mean of its K augmented copies' losses; the
gradient of that mean is the example's gradient, clipped to norm C as one
vector. `torch.func.vmap(grad(...))` over examples computes it with one
gradient per example whatever K is, so per-example gradient memory does not
grow with K (only activations do: the B*K rows are the physical floor of the
work). Clipping the K copies separately would make the sensitivity K*C.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from dpsynth.diffusion.loss import DenoisingLoss
from dpsynth.training.precision import exact_float32

Grads = dict[str, torch.Tensor]


def per_example_grads(net: torch.nn.Module, loss: DenoisingLoss, x0: torch.Tensor,
                      labels: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
                      ) -> tuple[Grads, torch.Tensor]:
    """Gradient of each example's K-averaged loss.

    Args:
        x0: [b, K, C, H, W] the K (augmented) copies of each example.
        labels: [b, K] labels of the copies (after label dropout).
        t: [b, K] timesteps; noise: [b, K, C, H, W].

    Returns:
        (name -> [b, *param.shape] gradients, [b] K-averaged losses).
    """
    params = {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}
    buffers = dict(net.named_buffers())

    def example_loss(p: Grads, x: torch.Tensor, y: torch.Tensor, tt: torch.Tensor,
                     eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def f(xt: torch.Tensor, ts: torch.Tensor, class_labels: torch.Tensor):  # noqa: ANN202
            return functional_call(net, (p, buffers), (xt, ts), {"class_labels": class_labels})

        value = loss.per_example(f, x, y, tt, eps).mean()  # mean over the K copies
        return value, value.detach()

    compute = vmap(grad(example_loss, has_aux=True), in_dims=(None, 0, 0, 0, 0),
                   randomness="different")
    return compute(params, x0, labels, t, noise)


def per_example_norms(grads: Grads) -> torch.Tensor:
    """[b] L2 norms of each example's whole gradient (all parameters as one vector)."""
    # reshape, not flatten(1): a scalar parameter's gradients have shape [b]
    return torch.stack([g.reshape(len(g), -1).pow(2).sum(1) for g in grads.values()]
                       ).sum(0).sqrt()


def clipped_sum(grads: Grads, max_grad_norm: float) -> tuple[Grads, torch.Tensor]:
    """Sum over examples of each gradient scaled to norm <= C (Abadi et al. 2016, Alg. 1).

    Returns:
        (name -> summed clipped gradient, [b] pre-clipping norms).
    """
    norms = per_example_norms(grads)
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    with exact_float32():  # a TF32 matmul would round the sum (to 2**-11 of its norm)
        return {n: torch.einsum("b,b...->...", factor, g) for n, g in grads.items()}, norms


def use_vmap_friendly_attention(net: torch.nn.Module) -> None:
    """Swap diffusers' SDPA attention for the classic processor: the fused CPU
    SDPA kernel has no vmap batching rule and falls back to a slow loop."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    for module in net.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
