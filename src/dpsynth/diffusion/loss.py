"""The denoising loss, one value per example (the caller reduces: a plain mean
for pre-training, clip-then-sum for DP-SGD)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

from dpsynth.config import DiffusionConfig
from dpsynth.diffusion.timesteps import TimestepDistribution, make_timestep_distribution


def make_noise_schedule(cfg: DiffusionConfig) -> DDPMScheduler:
    """The forward process q(x_t | x_0); samplers are built from its config."""
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps,
                         beta_schedule=cfg.beta_schedule, prediction_type=cfg.prediction_type,
                         clip_sample=True)


@dataclass
class DenoisingLoss:
    """`loss(net, x0, labels, generator) -> [B]`: Ho et al. (2020) eq. 14, with
    classifier-free label dropout and a pluggable timestep distribution.

    Attributes:
        schedule: the forward process (its `add_noise`).
        timesteps: distribution of t.
        label_dropout: probability of replacing a label by `null_label`.
        null_label: the unconditional class index.
    """

    schedule: DDPMScheduler
    timesteps: TimestepDistribution
    label_dropout: float
    null_label: int

    @classmethod
    def from_config(cls, cfg: DiffusionConfig, null_label: int) -> "DenoisingLoss":
        return cls(make_noise_schedule(cfg),
                   make_timestep_distribution(cfg.timesteps, cfg.num_train_timesteps),
                   cfg.label_dropout, null_label)

    def draw(self, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw (t, noise, labels after dropout) for a batch x0 of shape [B, C, H, W].

        `generator` is a CPU generator: the draws are made on the CPU and moved to
        x0's device, so they are the same numbers on every device and a
        checkpointed generator state stays valid wherever the run resumes.
        """
        b, device = x0.shape[0], x0.device
        t = self.timesteps.sample(b, generator).to(device)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(device)
        drop = (torch.rand(b, generator=generator) < self.label_dropout).to(device)
        return t, noise, torch.where(drop, torch.full_like(labels, self.null_label), labels)

    def per_example(self, net: torch.nn.Module, x0: torch.Tensor, labels: torch.Tensor,
                    t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Loss of each example for given draws. Shapes: x0, noise [B,C,H,W]; t, labels [B]."""
        xt = self.schedule.add_noise(x0, noise, t)
        if self.schedule.config.prediction_type == "v_prediction":
            target = self.schedule.get_velocity(x0, noise, t)
        else:
            target = noise
        pred = net(xt, t, class_labels=labels).sample
        return (pred - target).pow(2).flatten(1).mean(1)

    def __call__(self, net: torch.nn.Module, x0: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
        t, noise, labels = self.draw(x0, labels, generator)
        return self.per_example(net, x0, labels, t, noise)
