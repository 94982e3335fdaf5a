"""Canaries for the one-run membership audit, the twin training run that
includes half of them, and the score the auditor ranks them by.

The twin run uses the fine-tuning stage's DP mechanism and training loop
unchanged (`PoissonGradient` in `training.loop`: Poisson sampling, K-averaged
per-example clipping, noise once per step) at the same (ε, δ) target, C and K,
on public data plus the included canaries, so it measures the implementation
without touching the private split and without spending its budget. The
non-private control is the same loop with no clipping and no noise
(`plain_gradient`): if the audit cannot tell its members apart either, the
audit has no power and its bound for the DP run means little.
"""

from __future__ import annotations

import numpy as np
import torch

from dpsynth.diffusion.loss import DenoisingLoss
from dpsynth.privacy.dp_sgd import DPStep, PoissonGradient
from dpsynth.privacy.draws import disable_dropout, record_keys
from dpsynth.training.loop import Progress, TrainingLoop


def make_canaries(m: int, shape: tuple[int, int, int], num_classes: int,
                  generator: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """m canaries: i.i.d. uniform-noise images with random labels.

    Independent noise images are the classic input-space canary (Steinke et
    al. 2023, Sec. 6): learning one tells the model nothing about another, so
    a lower loss on a canary is evidence that *it* was trained on.

    Returns:
        images [m, H, W, C] uint8, labels [m] int64.
    """
    images = generator.integers(0, 256, size=(m, *shape), dtype=np.uint8)
    return images, generator.integers(0, num_classes, size=m).astype(np.int64)


def include_half(m: int, generator: np.random.Generator) -> np.ndarray:
    """[m] bool: each canary in the training set independently with probability 1/2."""
    return generator.random(m) < 0.5


def train(net: torch.nn.Module, loss: DenoisingLoss, x: torch.Tensor, y: torch.Tensor, *,
          step: DPStep, sample_rate: float, steps: int, lr: float, private: bool,
          train_generator: torch.Generator, noise_generator: torch.Generator,
          desc: str = "audit twin") -> torch.nn.Module:
    """`steps` Adam steps on Poisson batches of (x, y), as `dpsynth finetune` takes
    them: the same loop (`training.loop`) and the same step (`PoissonGradient`).

    Args:
        x, y: the audit's training set ([N, C, H, W] in [-1, 1], [N]), on the CPU
            (draws are made there and moved to the net's device).
        private: DP-SGD (`noisy_gradient`) if True, the control's plain gradient if not.
        train_generator: each step's seed for the keyed training draws. The canaries
            are public, so the twin's randomness is seeded (reproducible audits).
        noise_generator: Poisson sampling and the Gaussian noise.
        desc: the progress bar's label.
    """
    net.train()
    disable_dropout(net)  # as `dpsynth finetune` trains
    gradient = PoissonGradient(net, loss, x, y, keys=record_keys(x.numpy(), y.numpy()),
                               dp_step=step, sample_rate=sample_rate, batches=noise_generator,
                               draws=train_generator, noise=noise_generator, private=private)
    # no EMA, checkpoints or divergence check: a short twin run that publishes no model
    TrainingLoop(net=net, optimizer=torch.optim.Adam(net.parameters(), lr=lr),
                 gradient=gradient, steps=steps, desc=desc).run(Progress())
    return net.eval()


def denoising_losses(net: torch.nn.Module, loss: DenoisingLoss, x: torch.Tensor, y: torch.Tensor,
                     *, draws: int, seed: int, t_range: tuple[float, float] = (0.05, 0.5),
                     batch_size: int = 256) -> torch.Tensor:
    """[m] each canary's denoising loss averaged over a fixed grid of `draws`
    (t, noise) pairs: t evenly spaced over `t_range` (fractions of the T training
    timesteps), noise seeded, the same grid for every model scored.

    The default range is where membership shows: at small t the model must
    recognise the exact image to predict the noise, at large t the noise
    drowns it (measured on digits: AUC 0.99 at t = 0.05-0.3 T, 0.6 at 0.9 T).
    The grid is made on the CPU and each batch moved to the net's device; the
    result is on the CPU.
    """
    device = next(net.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    steps_total = loss.schedule.config.num_train_timesteps
    grid = torch.linspace(t_range[0] * (steps_total - 1), t_range[1] * (steps_total - 1),
                          draws).round().long()
    noise = torch.randn((len(x), draws, *x.shape[1:]), generator=gen)
    out = torch.zeros(len(x))
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb, yb, nb = x[start:start + batch_size], y[start:start + batch_size], \
                noise[start:start + batch_size]
            b = len(xb)
            t = grid.repeat(b)
            rows = (xb.repeat_interleave(draws, 0), yb.repeat_interleave(draws), t,
                    nb.flatten(0, 1))
            xr, yr, tr, nr = (r.to(device) for r in rows)
            per = loss.per_example(net, xr, yr, tr, nr)
            out[start:start + b] = per.view(b, draws).mean(1).cpu()
    return out
