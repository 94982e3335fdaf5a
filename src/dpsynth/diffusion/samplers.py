"""Samplers: DDPM (Ho et al. 2020), DDIM (Song et al. 2021, with eta) and
DPM-Solver++ (Lu et al. 2022), all diffusers schedulers built from the same
noise schedule the model was trained with, plus classifier-free guidance."""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       SchedulerMixin)

from dpsynth.choices import SamplerKind


def _dpm_solver(schedule: DDPMScheduler) -> SchedulerMixin:
    # DPM-Solver++ predicts x0 = (x_t - sigma_t eps) / alpha_t. Near t = T of the
    # cosine schedule alpha_t ~ 1e-2, so any error in eps is amplified ~100x and
    # samples saturate. Two guards, as for DDPM/DDIM's `clip_sample`: clip the
    # x0 prediction to the data range (thresholding with max 1.0), and cap
    # lambda = log(alpha/sigma) from below (diffusers' advice for cosine schedules).
    return DPMSolverMultistepScheduler.from_config(
        schedule.config, algorithm_type="dpmsolver++", solver_order=2,
        thresholding=True, sample_max_value=1.0, lambda_min_clipped=-5.1)


# The samplers by name (the names and their descriptions: `dpsynth.choices`).
SCHEDULERS: dict[str, Callable[[DDPMScheduler], SchedulerMixin]] = {
    "ddpm": lambda schedule: DDPMScheduler.from_config(schedule.config),
    "ddim": lambda schedule: DDIMScheduler.from_config(schedule.config),
    "dpmsolver++": _dpm_solver,
}


def make_sampler(kind: SamplerKind, schedule: DDPMScheduler) -> SchedulerMixin:
    """A fresh (stateful) sampling scheduler sharing `schedule`'s betas."""
    return SCHEDULERS[kind](schedule)


def guided_model(net: torch.nn.Module, guidance_scale: float,
                 null_label: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """eps(x, t, y) with classifier-free guidance (Ho & Salimans 2022, eq. 6):
    eps_uncond + w * (eps_cond - eps_uncond). w = 1 is the conditional model alone."""

    def eps(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if guidance_scale == 1.0:
            return net(x, t, class_labels=y).sample
        both = net(torch.cat([x, x]), torch.cat([t, t]),
                   class_labels=torch.cat([y, torch.full_like(y, null_label)])).sample
        cond, uncond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    return eps


@torch.no_grad()
def sample(net: torch.nn.Module, sampler: SchedulerMixin, labels: torch.Tensor,
           shape: tuple[int, int, int], *, num_inference_steps: int, guidance_scale: float,
           null_label: int, generator: torch.Generator, eta: float = 0.0) -> torch.Tensor:
    """Draw one image per label by running the reverse process.

    Args:
        labels: [B] class indices, on the device to sample on (the net's).
        shape: (C, H, W) of one image.
        generator: a CPU generator. The initial noise (and DDPM/DDIM's step noise,
            which diffusers draws on the generator's device) is drawn on the CPU and
            moved to `labels.device`: the same numbers on every device.
        eta: DDIM's stochasticity (ignored by the other samplers).

    Returns:
        [B, C, H, W] images in [-1, 1], on `labels.device`.
    """
    device = labels.device
    eps = guided_model(net, guidance_scale, null_label)
    sampler.set_timesteps(num_inference_steps)  # the schedule stays on the CPU (diffusers' way)
    x = (torch.randn((len(labels), *shape), generator=generator)
         * sampler.init_noise_sigma).to(device)
    extra = {"eta": eta} if isinstance(sampler, DDIMScheduler) else {}
    for t in sampler.timesteps:
        x_in = sampler.scale_model_input(x, t)
        out = eps(x_in, t.expand(len(labels)).to(device), labels)
        x = sampler.step(out, t, x, generator=generator, **extra).prev_sample
    return x.clamp(-1, 1)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] in [-1, 1] -> uint8 NHWC."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float [B, C, H, W] in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1
