"""Low-rank adapters (LoRA, Hu et al. 2022) for DP fine-tuning.

DP-SGD adds noise of norm ~ sigma C sqrt(d) / B to every update, so training d
coordinates instead of all the network's costs less noise for the same signal
(DP-LoRA, Yu et al. 2022; DP-LDM, Lyu et al. 2023). `add_lora` freezes the
chosen weights W and trains W + (alpha / r) B A instead, with B zero at the
start (the adapted net starts as the pre-trained one); `merge_lora` folds the
adapters back into plain weights, so the published model is an ordinary UNet
that `sample` and every other stage read as before.

Adapters are `torch.nn.utils.parametrize` parametrizations: the adapted
weight is computed in the forward pass, so `torch.func.functional_call` and
`vmap` (the per-example gradients) see the adapter matrices as parameters.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Sequence

import torch
from torch.nn.utils import parametrize


class LowRankDelta(torch.nn.Module):
    """`weight -> weight + scale * (B @ A).view(weight.shape)` for a Linear or Conv2d."""

    def __init__(self, shape: torch.Size, rank: int, alpha: float,
                 generator: torch.Generator) -> None:
        super().__init__()
        out, fan_in = shape[0], math.prod(shape[1:])
        self.rank = min(rank, out, fan_in)
        self.scale = alpha / self.rank
        # A ~ Kaiming-uniform as in the LoRA paper's reference code, B = 0
        bound = 1 / math.sqrt(fan_in)
        self.lora_A = torch.nn.Parameter(
            (torch.rand(self.rank, fan_in, generator=generator) * 2 - 1) * bound)
        self.lora_B = torch.nn.Parameter(torch.zeros(out, self.rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.lora_B @ self.lora_A).view(weight.shape)


def adaptable(net: torch.nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the modules (Linear, Conv2d) whose `<name>.weight` matches `patterns`."""
    return [name for name, module in net.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
            and any(fnmatch.fnmatchcase(f"{name}.weight", p) for p in patterns)]


def add_lora(net: torch.nn.Module, rank: int, patterns: Sequence[str], alpha: float | None = None,
             seed: int = 0) -> list[str]:
    """Put a rank-`rank` adapter on every Linear/Conv2d weight matching `patterns`
    and freeze that weight; returns the adapted modules' names.

    The adapter starts at zero (B = 0), so the adapted net computes exactly what
    the pre-trained one does. `alpha` defaults to `rank` (scale 1). `seed` draws
    the A matrices (public randomness: nothing about the data).
    """
    generator = torch.Generator().manual_seed(seed)
    names = adaptable(net, patterns)
    modules = dict(net.named_modules())
    for name in names:
        module = modules[name]
        module.weight.requires_grad_(False)
        delta = LowRankDelta(module.weight.shape, rank, float(alpha or rank), generator)
        parametrize.register_parametrization(module, "weight", delta.to(module.weight.device))
        module.parametrizations.weight.original.requires_grad_(False)
    return names


def merge_lora(net: torch.nn.Module) -> int:
    """Fold every adapter into its weight (in place); returns how many were merged.

    Done by hand rather than with `parametrize.remove_parametrizations`: that one
    deletes the weight property from the parametrized *class*, which a deep copy
    (the EMA's shadow net) shares, so merging one net would break the other.
    Here each module gets its plain class and a plain `weight` back.
    """
    merged = 0
    for module in net.modules():
        if not parametrize.is_parametrized(module, "weight"):
            continue
        weight = module.weight.detach().clone()  # W + scale * B A
        requires_grad = module.parametrizations.weight.original.requires_grad
        module.__class__ = module.__class__.__bases__[0]  # the original Linear/Conv2d
        del module._modules["parametrizations"]
        module.weight = torch.nn.Parameter(weight, requires_grad=requires_grad)
        merged += 1
    return merged
