"""The non-private step gradient of `training.loop`: the backward of the mean
denoising loss of a uniformly drawn batch (public pre-training), split over
torchrun's workers when there are several.

DP-SGD's step gradient is `privacy.dp_sgd.PoissonGradient`; it lives with the
mechanism, so that this module (and pre-training) imports nothing private.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dpsynth.choices import PrecisionKind
from dpsynth.diffusion.loss import DenoisingLoss
from dpsynth.diffusion.samplers import from_uint8
from dpsynth.training.precision import autocast
from dpsynth.training.workers import Workers


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
        max_grad_norm: the clipping bound of the whole (summed) gradient.
        workers: the data-parallel workers that share each batch (default: this
            process alone).
        precision: "bf16": the forward and backward under bfloat16 autocast
            (`pretrain.precision`; the gradients reach `.grad` in float32).
    """

    net: torch.nn.Module
    loss: DenoisingLoss
    x: torch.Tensor
    y: torch.Tensor
    batch_size: int
    generator: torch.Generator
    device: torch.device
    max_grad_norm: float = 1.0
    workers: Workers = field(default_factory=Workers)
    precision: PrecisionKind = "fp32"

    def __call__(self, step: int) -> float:
        """Step `step`'s gradient into `.grad`; its mean loss (public: testing it is free).

        Every worker draws the whole batch and its (t, noise, label dropout) from the
        same generator, then computes the loss of its share only (`Workers.share`):
        the gradients summed over workers are the one-process gradient of the same
        batch, and the generator stays in step everywhere (checkpoints, resume).
        """
        idx = torch.randint(0, len(self.x), (self.batch_size,), generator=self.generator)
        x0 = from_uint8(self.x[idx]).to(self.device)
        t, noise, y = self.loss.draw(x0, self.y[idx].to(self.device), self.generator)
        mine = self.workers.share(torch.arange(self.batch_size))
        # the mean of this share, weighted by its part of the batch (x 1.0 alone)
        with autocast(self.precision, self.device):
            loss = self.loss.per_example(self.net, x0[mine], y[mine], t[mine],
                                         noise[mine]).mean() * (len(mine) / self.batch_size)
        value = self.workers.sum_value(loss.item())  # the batch's mean loss, on every worker
        if not math.isfinite(value):  # the loop stops the run: no update to compute
            return value
        self.net.zero_grad(set_to_none=True)
        loss.backward()
        self.workers.sum_gradients(list(self.net.parameters()))
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.max_grad_norm)
        return value
