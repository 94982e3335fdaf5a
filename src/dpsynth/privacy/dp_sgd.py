"""One DP-SGD step's gradient (Abadi et al. 2016, Alg. 1, with augmentation
multiplicity as in Ghalebikesabi et al. 2023, Sec. 3.2 / De et al. 2022).

noisy_grad = (sum_i clip_C(grad mean_k loss(x_i, k)) + N(0, sigma^2 C^2 I)) / (qN)

Noise is added once per logical batch, whatever the number of micro-batches,
and the sum is divided by the *expected* batch size qN, not the realised one
(PRIVACY.md rule 3). `PoissonGradient` is the step as `training.loop` takes it
(Poisson-sampled batch, draw seed, gradient), for fine-tuning and the audit's
twins alike.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import torch
from opacus.validators import ModuleValidator

from dpsynth.choices import PerExampleKind, PrecisionKind
from dpsynth.config import FinetuneConfig
from dpsynth.diffusion.augment import AugmentKind
from dpsynth.diffusion.loss import DenoisingLoss
from dpsynth.errors import InputError
from dpsynth.privacy import bookkeeping
from dpsynth.training.workers import Workers
from dpsynth.privacy.draws import draw_for_examples
from dpsynth.privacy.per_example import Grads, clipped_sum, per_example_grads
from dpsynth.privacy.sampling import micro_batches, poisson_batch


@dataclass(frozen=True)
class DPStep:
    """The settings of a DP-SGD step. `expected_batch_size` = qN is private-derived
    (N): it is a call-time value, never a config field or a logged param."""

    noise_multiplier: float
    max_grad_norm: float
    expected_batch_size: float
    physical_batch_size: int
    aug_multiplicity: int
    augment: AugmentKind = "none"
    # the per-example engine (`finetune.per_example`): the same clipped sum either way
    per_example: PerExampleKind = "bookkeeping"
    # bf16 autocast of the book-keeping engine's forward and backward (`finetune.precision`)
    precision: PrecisionKind = "fp32"


def dp_step(fc: FinetuneConfig, *, noise_multiplier: float, expected_batch_size: float
            ) -> DPStep:
    """The DP-SGD step of the public settings `fc` (C, K, augmentation, physical
    batch) with the call-time sigma and qN: what `dpsynth finetune` trains with,
    and what the audit's twins copy (on their own sigma and qN)."""
    return DPStep(noise_multiplier=noise_multiplier, max_grad_norm=fc.max_grad_norm,
                  expected_batch_size=expected_batch_size,
                  physical_batch_size=fc.physical_batch_size,
                  aug_multiplicity=fc.aug_multiplicity, augment=fc.augment,
                  per_example=fc.per_example, precision=fc.precision)


def secret_generator(seed: int | None) -> tuple[torch.Generator, bool]:
    """One generator for DP randomness.

    Release runs (`seed=None`) seed it with 63 bits from the OS entropy source
    (`secrets`), and its state is never written anywhere. A fixed seed is for
    tests only, and is reported as `seeded_for_test` (PRIVACY.md rule 7).

    Returns:
        (generator, seeded_for_test).
    """
    if seed is None:
        return torch.Generator().manual_seed(secrets.randbits(63)), False
    return torch.Generator().manual_seed(seed), True


def next_draw_seed(generator: torch.Generator) -> int:
    """A step's seed for the per-example training draws (`draws.draw_for_examples`)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


STREAMS = ("batches", "noise", "draws")


@dataclass
class SecretRandomness:
    """The DP mechanism's secret randomness, one independent stream per use.

    - `batches`: Poisson sampling of the logical batches;
    - `noise`: the Gaussian mechanism;
    - `draws`: each step's seed for the per-example training draws (t, noise,
      augmentation, label dropout; `draws.draw_for_examples`).

    Separate streams keep each use independent of the others: how many
    uniforms Poisson sampling consumes (one per record, so N) never shifts the
    noise or the draws. Release runs seed every stream from OS entropy and never
    save their state; a test seed derives the three seeds from it and is
    flagged `seeded_for_test` (PRIVACY.md rule 7).
    """

    batches: torch.Generator
    noise: torch.Generator
    draws: torch.Generator
    seeded_for_test: bool

    @classmethod
    def create(cls, seed: int | None) -> "SecretRandomness":
        """Fresh OS-entropy streams (`seed=None`), or test streams derived from `seed`."""
        if seed is None:
            gens = [secret_generator(None)[0] for _ in STREAMS]
        else:
            gens = [torch.Generator().manual_seed(
                int.from_bytes(hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8
                                               ).digest(), "little") >> 1) for name in STREAMS]
        return cls(*gens, seeded_for_test=seed is not None)

    def draw_seed(self) -> int:
        """The next step's seed for the per-example training draws."""
        return next_draw_seed(self.draws)

    def get_state(self) -> torch.Tensor:
        """[3, S] the streams' states, for a test-seeded checkpoint only."""
        return torch.stack([getattr(self, name).get_state() for name in STREAMS])

    def set_state(self, state: torch.Tensor) -> None:
        for name, row in zip(STREAMS, state):
            getattr(self, name).set_state(row.clone())  # its own storage, offset 0


def gaussian_noise(like: Grads, std: float, generator: torch.Generator) -> Grads:
    """N(0, std^2) for every coordinate of every parameter, on `like`'s devices.

    Drawn on the CPU from the (CPU) secret generator, then moved: the noise is
    the same on every device, and the secret generator never needs a device.
    For the ~80M-parameter paper model that is 0.4-0.6 s once per logical step,
    against ~4 GPU-minutes for the step (measured on an H200, docs/scale.md).
    """
    return {n: (torch.randn(g.shape, generator=generator, dtype=g.dtype) * std).to(g.device)
            for n, g in like.items()}


def noisy_gradient(net: torch.nn.Module, loss: DenoisingLoss, x: torch.Tensor, y: torch.Tensor,
                   indices: torch.Tensor, step: DPStep, *, keys: torch.Tensor, draw_seed: int,
                   noise_generator: torch.Generator, workers: Workers = Workers()) -> Grads:
    """The privatised mean gradient of one logical batch.

    Args:
        x, y: the whole private split ([N, C, H, W] in [-1, 1], [N]), on the CPU;
            each micro-batch is moved to the net's device after its draws.
        indices: the Poisson-sampled logical batch (may be empty).
        keys: [N] the records' `draws.record_keys`: each example's training draws
            are seeded by its key and `draw_seed`, never by its index.
        draw_seed: this step's seed for the training draws (t, diffusion noise,
            augmentations, label dropout), from the secret randomness; the same
            on every worker.
        noise_generator: the secret generator for the Gaussian mechanism (used
            on rank 0 only).
        workers: data-parallel workers; each handles its share of `indices`
            (the same logical batch on every worker) and rank 0 adds the noise.

    Returns:
        name -> gradient, to be set as `.grad` before the optimizer step.
    """
    total = {n: torch.zeros_like(p) for n, p in net.named_parameters() if p.requires_grad}
    device = next(iter(total.values())).device  # the net's: where the gradients are made
    for mb in micro_batches(workers.share(indices), step.physical_batch_size):
        # the draws (augmentation, t, noise, label dropout) are made on the CPU from
        # CPU generators, then moved: the same numbers on every device. Measured for
        # the paper model on an H200: 0.006-0.09 s per micro-batch of 8 x K=32,
        # against 0.44-0.52 s of GPU work (docs/scale.md): not worth a GPU generator.
        draws = draw_for_examples(loss, x[mb], y[mb], keys[mb], step.aug_multiplicity,
                                  step.augment, draw_seed)
        x0, labels, t, noise = (d.to(device) for d in draws)
        if step.per_example == "bookkeeping":
            summed, _ = bookkeeping.clipped_sum(net, loss, x0, labels, t, noise,
                                                step.max_grad_norm, precision=step.precision)
        else:
            grads, _ = per_example_grads(net, loss, x0, labels, t, noise)
            summed, _ = clipped_sum(grads, step.max_grad_norm)
        for n in total:
            total[n] += summed[n]
    if workers.is_main:  # once per logical batch, whatever the number of workers
        std = step.noise_multiplier * step.max_grad_norm
        for n, z in gaussian_noise(total, std, noise_generator).items():
            total[n] += z
    workers.sum(total)
    return {n: total[n] / step.expected_batch_size for n in total}


def plain_gradient(net: torch.nn.Module, loss: DenoisingLoss, x: torch.Tensor, y: torch.Tensor,
                   indices: torch.Tensor, step: DPStep, *, keys: torch.Tensor, draw_seed: int
                   ) -> Grads:
    """The audit's non-private control: `noisy_gradient` with C = inf and sigma = 0,
    i.e. sum_i grad(mean_k loss(x_i, k)) / (qN), from the same (keyed) draws."""
    total = {n: torch.zeros_like(p) for n, p in net.named_parameters() if p.requires_grad}
    device = next(iter(total.values())).device
    for mb in micro_batches(indices, step.physical_batch_size):
        draws = draw_for_examples(loss, x[mb], y[mb], keys[mb], step.aug_multiplicity,
                                  step.augment, draw_seed)  # on the CPU, as `noisy_gradient`
        x0, labels, t, noise = (d.to(device) for d in draws)
        b, k = labels.shape
        per_copy = loss.per_example(net, x0.flatten(0, 1), labels.flatten(), t.flatten(),
                                    noise.flatten(0, 1)).view(b, k)
        net.zero_grad(set_to_none=True)
        per_copy.mean(1).sum().backward()
        for n, p in net.named_parameters():
            if p.grad is not None:
                total[n] += p.grad
    net.zero_grad(set_to_none=True)
    return {n: g / step.expected_batch_size for n, g in total.items()}


@dataclass(frozen=True, eq=False)
class PoissonGradient:
    """A DP-SGD step as `training.loop` takes it: a Poisson-sampled logical batch
    of the records (PRIVACY.md rule 1), the step's seed for their training draws,
    and `noisy_gradient` of that batch set as the trained parameters' `.grad`.

    It returns no loss: the loss of a private batch is never looked at (rule 6).

    Attributes:
        net, loss, x, y, keys: as `noisy_gradient` takes them; all N records
            on the CPU.
        dp_step: the step's settings (`dp_step`).
        sample_rate: q, each record's probability of joining a batch.
        batches, draws, noise: the generators of the Poisson sampling, of the
            draw seeds and of the Gaussian noise (rank 0's; `SecretRandomness`
            in fine-tuning; one may serve two uses, as in the audit's twins).
        workers: the data-parallel workers: rank 0 samples the batch and the
            draw seed and broadcasts them.
        private: False for the audit's non-private control: the same batches
            and draws, `plain_gradient` (no clipping, no noise).
    """

    net: torch.nn.Module
    loss: DenoisingLoss
    x: torch.Tensor
    y: torch.Tensor
    keys: torch.Tensor
    dp_step: DPStep
    sample_rate: float
    batches: torch.Generator
    draws: torch.Generator
    noise: torch.Generator
    workers: Workers = Workers()
    private: bool = True

    def __call__(self, step: int) -> None:
        """Step `step`'s privatised gradient into `.grad`."""
        main = self.workers.is_main
        batch, draw_seed = self.workers.broadcast_step(
            poisson_batch(len(self.x), self.sample_rate, self.batches) if main else None,
            next_draw_seed(self.draws) if main else None)
        if self.private:
            grads = noisy_gradient(self.net, self.loss, self.x, self.y, batch, self.dp_step,
                                   keys=self.keys, draw_seed=draw_seed,
                                   noise_generator=self.noise, workers=self.workers)
        else:
            grads = plain_gradient(self.net, self.loss, self.x, self.y, batch, self.dp_step,
                                   keys=self.keys, draw_seed=draw_seed)
        for name, p in self.net.named_parameters():
            if p.requires_grad:
                p.grad = grads[name]
        return None


def check_model(net: torch.nn.Module) -> None:
    """Refuse modules that mix examples (BatchNorm...): per-example clipping
    would not bound one example's influence."""
    was_training = net.training
    errors = ModuleValidator.validate(net.train(), strict=False)
    net.train(was_training)
    if errors:
        raise InputError("the model cannot be trained with DP-SGD: "
                         + "; ".join(str(e) for e in errors[:3])
                         + " -- use GroupNorm instead of BatchNorm")
