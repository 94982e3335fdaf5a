"""The non-private step gradient of `training.loop`: the backward of the mean
denoising loss of a uniformly drawn batch (public pre-training).

DP-SGD's step gradient is `privacy.dp_sgd.PoissonGradient`; it lives with the
mechanism, so that this module (and pre-training) imports nothing private.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dpsynth.diffusion.loss import DenoisingLoss
from dpsynth.diffusion.samplers import from_uint8


@dataclass(frozen=True, eq=False)
class MeanLossGradient:
    """`batch_size` examples drawn uniformly with replacement, the gradient of
    their mean loss, its global norm clipped to `max_grad_norm` (a stabiliser:
    nothing private, so no per-example clipping).

    Attributes:
        net: the model; its `.grad` receives the gradient.
        loss: the denoising loss (per example; reduced here by the mean).
        x: [N, H, W, C] uint8 images, converted a batch at a time (ImageNet32
            as float32 would take 15.7 GB), on the CPU.
        y: [N] int64 labels, on the CPU.
        batch_size: examples per step.
        generator: the CPU generator of the batch indices and the loss's draws
            (t, noise, label dropout): checkpointed, so a resume is exact.
        device: where the net is; each batch is moved there.
        max_grad_norm: the clipping bound of the whole gradient.
    """

    net: torch.nn.Module
    loss: DenoisingLoss
    x: torch.Tensor
    y: torch.Tensor
    batch_size: int
    generator: torch.Generator
    device: torch.device
    max_grad_norm: float = 1.0

    def __call__(self, step: int) -> float:
        """Step `step`'s gradient into `.grad`; its mean loss (public: testing it is free)."""
        idx = torch.randint(0, len(self.x), (self.batch_size,), generator=self.generator)
        loss = self.loss(self.net, from_uint8(self.x[idx]).to(self.device),
                         self.y[idx].to(self.device), self.generator).mean()
        value = loss.item()
        if not math.isfinite(value):  # the loop stops the run: no update to compute
            return value
        self.net.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.max_grad_norm)
        return value
