"""One DP-SGD step's gradient (PRIVACY.md rules 2, 3 and 7).

The contract checks below take the step function as an argument: each passes
for `noisy_gradient` and fails for a deliberately wrong variant with the
published bug it guards against (per-copy clipping, noise per micro-batch,
dividing by the realised batch size, no noise on an empty batch). Every test
of `noisy_gradient` runs with both per-example engines (`finetune.per_example`):
the vmap reference and book-keeping.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch
from diffusers import UNet2DModel

from dpsynth.diffusion.loss import DenoisingLoss
from dpsynth.privacy import bookkeeping
from dpsynth.config import FinetuneConfig
from dpsynth.privacy.dp_sgd import (DPStep, PoissonGradient, dp_step, gaussian_noise,
                                    next_draw_seed, noisy_gradient, plain_gradient,
                                    secret_generator)
from dpsynth.privacy.draws import draw_copies, draw_for_examples, record_keys
from dpsynth.privacy.per_example import (Grads, clipped_sum, per_example_grads,
                                         per_example_norms, use_vmap_friendly_attention)
from dpsynth.privacy.sampling import micro_batches, poisson_batch

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # the checks' vmap references on the book-keeping (SDPA) net hit vmap's
              # slow fallback loop, correct but slow
              pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")]

Split = tuple[torch.Tensor, torch.Tensor]
StepFn = Callable[..., Grads]
Z = 5.0  # statistical tolerances are Z standard errors


ENGINES = ("vmap", "bookkeeping")


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """The per-example engine under test (`DPStep.per_example`)."""
    return request.param


@pytest.fixture
def net(dp_net: UNet2DModel, engine: str) -> UNet2DModel:
    """The tiny UNet as `dpsynth finetune` prepares it for `engine`: the classic
    attention processor for vmap, diffusers' fused SDPA for book-keeping."""
    if engine == "vmap":
        use_vmap_friendly_attention(dp_net)
    return dp_net


def engine_clipped_sum(engine: str, net: torch.nn.Module, loss: DenoisingLoss,
                       x0: torch.Tensor, labels: torch.Tensor, t: torch.Tensor,
                       noise: torch.Tensor, max_grad_norm: float) -> Grads:
    """The clipped sum of the K-averaged per-example gradients, by `engine`."""
    if engine == "bookkeeping":
        return bookkeeping.clipped_sum(net, loss, x0, labels, t, noise, max_grad_norm)[0]
    return clipped_sum(per_example_grads(net, loss, x0, labels, t, noise)[0], max_grad_norm)[0]


@dataclass
class PositionalDraws(DenoisingLoss):
    """The real loss, but each copy's (t, noise) is a pure function of its image
    and copy index rather than of the generator's stream, and labels are kept.

    `draw_copies` draws per micro-batch, so with the real loss the draws (hence
    the gradient) depend on how a logical batch is split; this stand-in removes
    that, so the split's effect on clipping, noise and scaling can be isolated.
    """

    k: int = 1

    def draw(self, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        copy = torch.arange(len(x0)) % self.k  # rows are example-major (repeat_interleave)
        key = (x0.flatten(1).sum(1).abs() * 1000).long()
        t = (key + 7 * copy) % self.schedule.config.num_train_timesteps
        noise = torch.sin(x0 * 13 + copy.view(-1, 1, 1, 1).to(x0) + 1) * 1.5
        return t, noise, labels


def positional(loss: DenoisingLoss, k: int) -> PositionalDraws:
    return PositionalDraws(loss.schedule, loss.timesteps, 0.0, loss.null_label, k=k)


def flat(grads: Grads) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads.values()])


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def call(fn: StepFn, net: torch.nn.Module, loss: DenoisingLoss, split: Split,
         indices: list[int] | torch.Tensor, step: DPStep, train_seed: int = 0,
         noise_seed: int = 1) -> torch.Tensor:
    """One step's gradient as a flat vector: draws seeded by `train_seed` and the
    records' keys, noise from a fresh generator seeded by `noise_seed`."""
    x, y = split
    out = fn(net, loss, x, y, torch.as_tensor(indices, dtype=torch.int64), step,
             keys=record_keys(x, y), draw_seed=train_seed,
             noise_generator=torch.Generator().manual_seed(noise_seed))
    assert list(out) == [n for n, _ in net.named_parameters()]
    return flat(out)


def assert_standard_normal_energy(z: torch.Tensor) -> None:
    """||z||^2 / P ~ chi^2_P / P: mean 1, standard deviation sqrt(2/P)."""
    p = z.numel()
    assert abs(z.pow(2).sum().item() / p - 1) < Z * math.sqrt(2 / p), z.pow(2).mean()
    assert abs(z.mean().item()) < Z / math.sqrt(p)


def buggy(bug: str) -> StepFn:
    """`noisy_gradient` with one published bug put back in."""

    def step_fn(net: torch.nn.Module, loss: DenoisingLoss, x: torch.Tensor, y: torch.Tensor,
                indices: torch.Tensor, step: DPStep, *, keys: torch.Tensor, draw_seed: int,
                noise_generator: torch.Generator) -> Grads:
        total = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
        std = step.noise_multiplier * step.max_grad_norm
        for mb in micro_batches(indices, step.physical_batch_size):
            x0, labels, t, noise = draw_for_examples(loss, x[mb], y[mb], keys[mb],
                                                     step.aug_multiplicity, step.augment,
                                                     draw_seed)
            if bug == "per_copy_clipping":  # each copy clipped on its own, then averaged
                # (for book-keeping: each row its own group, the grouping bug)
                summed = engine_clipped_sum(step.per_example, net, loss,
                                            x0.flatten(0, 1).unsqueeze(1),
                                            labels.reshape(-1, 1), t.reshape(-1, 1),
                                            noise.flatten(0, 1).unsqueeze(1),
                                            step.max_grad_norm)
                summed = {n: s / step.aug_multiplicity for n, s in summed.items()}
            else:
                summed = engine_clipped_sum(step.per_example, net, loss, x0, labels, t, noise,
                                            step.max_grad_norm)
            for n in total:
                total[n] += summed[n]
            if bug == "noise_per_micro_batch":
                for n, z in gaussian_noise(total, std, noise_generator).items():
                    total[n] += z
        if bug != "noise_per_micro_batch" and not (bug == "no_noise_on_empty"
                                                   and len(indices) == 0):
            for n, z in gaussian_noise(total, std, noise_generator).items():
                total[n] += z
        divisor = max(len(indices), 1) if bug == "realised_divisor" else step.expected_batch_size
        return {n: g / divisor for n, g in total.items()}

    return step_fn


# -- contract checks: each takes the step function under test ------------------------


def check_average_before_clipping(fn: StepFn, net: UNet2DModel, loss: DenoisingLoss,
                                  split: Split, engine: str) -> None:
    """The K copies' gradients are averaged, then that one vector is clipped.

    Construction: C just below the smallest single-copy gradient norm, so every
    copy clipped alone would be scaled down, while the K-averaged gradients
    (copies pointing different ways partly cancel) are below C and untouched.
    """
    b, k, expected_b = 3, 4, 2.5
    x, y = split
    idx = torch.arange(b)
    keys = record_keys(x, y)
    for train_seed in range(50):  # the construction needs draws whose copies disagree
        x0, labels, t, noise = draw_for_examples(loss, x[idx], y[idx], keys[idx], k, "none",
                                                 train_seed)  # = call()'s draws
        per_copy, _ = per_example_grads(net, loss, x0.flatten(0, 1).unsqueeze(1),
                                        labels.reshape(-1, 1), t.reshape(-1, 1),
                                        noise.flatten(0, 1).unsqueeze(1))
        copy_norms = per_example_norms(per_copy)
        averaged = {n: g.view(b, k, *g.shape[1:]).mean(1) for n, g in per_copy.items()}
        avg_norms = per_example_norms(averaged)
        c = 0.99 * copy_norms.min().item()
        if avg_norms.max() < c:
            break
    assert avg_norms.max() < c, "construction needs averaged norms below every copy norm"

    right = flat({n: g.sum(0) for n, g in averaged.items()}) / expected_b  # nothing clipped
    clipped_copies, _ = clipped_sum(per_copy, c)
    wrong = flat(clipped_copies) / k / expected_b
    assert (right - wrong).norm() > 0.1 * right.norm()  # the two really differ

    step = DPStep(noise_multiplier=0.0, max_grad_norm=c, expected_batch_size=expected_b,
                  physical_batch_size=b, aug_multiplicity=k, per_example=engine)
    got = call(fn, net, loss, split, idx, step, train_seed=train_seed)
    torch.testing.assert_close(got, right, atol=1e-6, rtol=1e-4)


def check_noise_added_once(fn: StepFn, net: UNet2DModel, loss: DenoisingLoss,
                           split: Split, engine: str) -> None:
    """Noise = (result(sigma) - result(0)) * qN / (sigma C) is one N(0, I) draw per
    logical batch: the same vector whether the batch is run as 1 or 3 micro-batches,
    from the noise generator alone (not the training draws)."""
    sigma, c, expected_b = 2.0, 0.5, 4.0
    step = DPStep(noise_multiplier=sigma, max_grad_norm=c, expected_batch_size=expected_b,
                  physical_batch_size=3, aug_multiplicity=2, per_example=engine)
    noise = {}
    for physical, train_seed in ((3, 0), (1, 0), (1, 9)):
        s = replace(step, physical_batch_size=physical)
        noisy = call(fn, net, loss, split, [0, 1, 2], s, train_seed=train_seed)
        clean = call(fn, net, loss, split, [0, 1, 2], replace(s, noise_multiplier=0.0),
                     train_seed=train_seed)
        noise[physical, train_seed] = (noisy - clean) * expected_b / (sigma * c)
    for z in noise.values():
        assert_standard_normal_energy(z)
    torch.testing.assert_close(noise[1, 0], noise[3, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(noise[1, 9], noise[1, 0], atol=1e-4, rtol=0)


def check_expected_batch_size_divisor(fn: StepFn, net: UNet2DModel, loss: DenoisingLoss,
                                      split: Split, engine: str) -> None:
    """sigma = 0: result * qN is the clipped sum, for realised sizes 2 and 5 alike."""
    k, c, expected_b = 2, 1.0, 3.0
    fixed = positional(loss, k)
    x, y = split
    step = DPStep(noise_multiplier=0.0, max_grad_norm=c, expected_batch_size=expected_b,
                  physical_batch_size=8, aug_multiplicity=k, per_example=engine)
    for indices in ([0, 1], [0, 1, 2, 3, 4]):
        idx = torch.tensor(indices)
        grads, _ = per_example_grads(net, fixed, *draw_copies(fixed, x[idx], y[idx], k, "none",
                                                              torch.Generator()))
        summed = flat(clipped_sum(grads, c)[0])
        got = call(fn, net, fixed, split, indices, step)
        torch.testing.assert_close(got * expected_b, summed, atol=1e-6, rtol=1e-4)
        assert (got * len(indices) - summed).norm() > 0.1 * summed.norm()  # b != qN matters
    doubled = call(fn, net, fixed, split, [0, 1], replace(step, expected_batch_size=6.0))
    torch.testing.assert_close(doubled * 2, call(fn, net, fixed, split, [0, 1], step))


def check_empty_batch_adds_noise(fn: StepFn, net: UNet2DModel, loss: DenoisingLoss,
                                 split: Split, engine: str) -> None:
    """No example: the result is N(0, sigma^2 C^2 I) / qN, norm ~ sigma C sqrt(P) / qN."""
    sigma, c, expected_b = 1.3, 0.7, 5.0
    step = DPStep(noise_multiplier=sigma, max_grad_norm=c, expected_batch_size=expected_b,
                  physical_batch_size=4, aug_multiplicity=2, per_example=engine)
    got = call(fn, net, loss, split, [], step)
    p = n_params(net)
    # ||z|| for z ~ N(0, I_P) has mean ~ sqrt(P) and standard deviation ~ 1/sqrt(2)
    expected_norm = sigma * c * math.sqrt(p) / expected_b
    assert abs(got.norm().item() - expected_norm) < Z * sigma * c / math.sqrt(2) / expected_b
    assert_standard_normal_energy(got * expected_b / (sigma * c))


CHECKS = {
    "per_copy_clipping": check_average_before_clipping,
    "noise_per_micro_batch": check_noise_added_once,
    "realised_divisor": check_expected_batch_size_divisor,
    "no_noise_on_empty": check_empty_batch_adds_noise,
}


@pytest.mark.parametrize("check", CHECKS.values(), ids=CHECKS.keys())
def test_noisy_gradient_meets_the_contract(check: Callable[..., None], net: UNet2DModel,
                                           dp_loss: DenoisingLoss, private_split: Split,
                                           engine: str) -> None:
    check(noisy_gradient, net, dp_loss, private_split, engine)


@pytest.mark.parametrize("bug", CHECKS.keys())
def test_contract_check_catches_the_bug(bug: str, net: UNet2DModel, dp_loss: DenoisingLoss,
                                        private_split: Split, engine: str) -> None:
    with pytest.raises(AssertionError):
        CHECKS[bug](buggy(bug), net, dp_loss, private_split, engine)


# -- further properties of noisy_gradient ----------------------------------------------


def test_sigma_zero_single_example_has_norm_at_most_c(net: UNet2DModel, dp_loss: DenoisingLoss,
                                                      private_split: Split, engine: str) -> None:
    c, expected_b = 0.05, 2.0  # far below the tiny UNet's gradient norms (~3)
    step = DPStep(noise_multiplier=0.0, max_grad_norm=c, expected_batch_size=expected_b,
                  physical_batch_size=4, aug_multiplicity=3, per_example=engine)
    for i in range(3):
        contribution = call(noisy_gradient, net, dp_loss, private_split, [i], step) * expected_b
        assert contribution.norm() <= c * (1 + 1e-5)
        assert contribution.norm() >= c * (1 - 1e-4)  # clipped *to* C, not below
    batch = call(noisy_gradient, net, dp_loss, private_split, list(range(6)), step)
    assert (batch * expected_b).norm() <= 6 * c * (1 + 1e-5)


def test_result_does_not_depend_on_the_physical_batch_size(net: UNet2DModel,
                                                           dp_loss: DenoisingLoss,
                                                           private_split: Split,
                                                           engine: str) -> None:
    """Micro-batching is memory only: the draws do not depend on the split, so
    sigma = 0 gives the same gradient, and sigma > 0 with the same noise seed too
    (noise drawn once per logical batch, same shape)."""
    k = 2
    # the real loss: draws are seeded per (step, record key), not per micro-batch
    fixed = dp_loss
    indices = [1, 4, 6, 9, 10]
    step = DPStep(noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4.0,
                  physical_batch_size=1, aug_multiplicity=k, per_example=engine)
    for sigma in (0.0, 1.5):
        s = replace(step, noise_multiplier=sigma)
        results = [call(noisy_gradient, net, fixed, private_split, indices,
                        replace(s, physical_batch_size=physical)) for physical in (1, 2, 5)]
        for other in results[1:]:
            torch.testing.assert_close(other, results[0], atol=1e-6, rtol=1e-5)


def test_noise_changes_every_step(net: UNet2DModel, dp_loss: DenoisingLoss,
                                  private_split: Split, engine: str) -> None:
    """Two consecutive steps with one secret generator: independent noise."""
    x, y = private_split
    step = DPStep(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1.0,
                  physical_batch_size=4, aug_multiplicity=1, per_example=engine)
    noise_gen = torch.Generator().manual_seed(3)
    first, second = (flat(noisy_gradient(net, dp_loss, x, y, torch.tensor([], dtype=torch.int64),
                                         step, keys=record_keys(x, y), draw_seed=0,
                                         noise_generator=noise_gen)) for _ in range(2))
    assert_standard_normal_energy(first)
    assert_standard_normal_energy(second)
    correlation = torch.corrcoef(torch.stack([first, second]))[0, 1]
    assert abs(correlation) < Z / math.sqrt(first.numel())


def test_gaussian_noise_has_the_right_shape_and_scale() -> None:
    like = {"w": torch.zeros(300, 100), "b": torch.zeros(7), "s": torch.zeros(())}
    noise = gaussian_noise(like, 2.5, torch.Generator().manual_seed(0))
    assert {n: z.shape for n, z in noise.items()} == {n: g.shape for n, g in like.items()}
    assert_standard_normal_energy(flat(noise) / 2.5)
    again = gaussian_noise(like, 2.5, torch.Generator().manual_seed(0))
    assert all(torch.equal(noise[n], again[n]) for n in like)


# -- the secret generator ----------------------------------------------------------------


def test_secret_generator_without_seed_is_fresh_each_time() -> None:
    torch.manual_seed(0)  # the global seed must not determine the secret stream
    g1, seeded1 = secret_generator(None)
    torch.manual_seed(0)
    g2, seeded2 = secret_generator(None)
    assert seeded1 is False and seeded2 is False
    assert not torch.equal(torch.rand(16, generator=g1), torch.rand(16, generator=g2))


def test_secret_generator_with_seed_is_reproducible_and_flagged() -> None:
    g1, seeded1 = secret_generator(1234)
    g2, seeded2 = secret_generator(1234)
    assert seeded1 is True and seeded2 is True
    assert torch.equal(torch.rand(16, generator=g1), torch.rand(16, generator=g2))
    g3, _ = secret_generator(1235)
    assert not torch.equal(torch.rand(16, generator=secret_generator(1234)[0]),
                           torch.rand(16, generator=g3))


# -- augmentation multiplicity: the K copies ------------------------------------------------


def test_draw_copies_shapes_and_shared_image(dp_loss: DenoisingLoss,
                                             private_split: Split) -> None:
    """K copies of one example: the same image (no augmentation), its label, and
    their own timestep, noise and label dropout."""
    x, y = private_split
    b, k = 6, 5
    x0, labels, t, noise = draw_copies(dp_loss, x[:b], y[:b], k, "none",
                                       torch.Generator().manual_seed(0))
    assert x0.shape == noise.shape == (b, k, 1, 8, 8)
    assert labels.shape == t.shape == (b, k)
    assert torch.equal(x0, x[:b].unsqueeze(1).expand(-1, k, -1, -1, -1))
    for i in range(b):
        assert len(set(t[i].tolist())) > 1  # with T = 50 and K = 5, not all equal
        for j in range(k):
            for m in range(j + 1, k):
                assert not torch.allclose(noise[i, j], noise[i, m])
    # label dropout (p = 0.2) per copy: each label is the example's or the null label
    kept = labels == y[:b].unsqueeze(1)
    assert (kept | (labels == dp_loss.null_label)).all()
    assert (~kept).any() and kept.any()


def test_draw_copies_augments_each_copy_on_its_own(dp_loss: DenoisingLoss,
                                                   private_split: Split) -> None:
    x, y = private_split
    k = 8
    x0, _, _, _ = draw_copies(dp_loss, x[:4], y[:4], k, "flip", torch.Generator().manual_seed(0))
    for i in range(4):
        flipped = torch.tensor([torch.equal(c, x[i].flip(-1)) for c in x0[i]])
        same = torch.tensor([torch.equal(c, x[i]) for c in x0[i]])
        assert (flipped | same).all()
    flipped_any = [any(torch.equal(c, x[i].flip(-1)) for c in x0[i]) for i in range(4)]
    same_any = [any(torch.equal(c, x[i]) for c in x0[i]) for i in range(4)]
    assert any(flipped_any) and any(same_any)  # P(fail) = 2 * 2^-32


def test_draw_copies_is_reproducible(dp_loss: DenoisingLoss, private_split: Split) -> None:
    x, y = private_split
    a = draw_copies(dp_loss, x[:3], y[:3], 2, "flip_crop", torch.Generator().manual_seed(4))
    b = draw_copies(dp_loss, x[:3], y[:3], 2, "flip_crop", torch.Generator().manual_seed(4))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


# -- devices: the DP randomness is drawn on the CPU, the work runs on the net's device ----

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_noisy_gradient_on_a_device_matches_the_cpu(device: str, net: UNet2DModel,
                                                    dp_loss: DenoisingLoss,
                                                    private_split: Split, engine: str) -> None:
    """The same generators give the same step on any device: the batch draws and the
    noise come from the CPU generators (so, bit for bit, the same noise), and the
    gradients are made and returned on the net's device. Data stays on the CPU."""
    import copy

    moved = copy.deepcopy(net).to(device)
    step = DPStep(noise_multiplier=1.3, max_grad_norm=0.5, expected_batch_size=4.0,
                  physical_batch_size=2, aug_multiplicity=3, per_example=engine)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # compare float32 with float32
        for indices in ([0, 3, 5, 7, 11], []):  # empty: noise only, on the device too
            on_cpu = call(noisy_gradient, net, dp_loss, private_split, indices, step)
            on_device = call(noisy_gradient, moved, dp_loss, private_split, indices, step)
            assert on_device.device.type == device
            torch.testing.assert_close(on_device.cpu(), on_cpu, atol=1e-5, rtol=1e-4)
    noise_only = call(noisy_gradient, moved, dp_loss, private_split, [], step).cpu()
    assert torch.equal(noise_only, call(noisy_gradient, net, dp_loss, private_split, [], step))


@pytest.mark.parametrize("device", DEVICES)
def test_gaussian_noise_is_drawn_on_the_cpu_and_moved(device: str) -> None:
    like = {"w": torch.zeros(30, 10, device=device), "b": torch.zeros(7, device=device)}
    noise = gaussian_noise(like, 2.5, torch.Generator().manual_seed(0))
    on_cpu = gaussian_noise({n: g.cpu() for n, g in like.items()}, 2.5,
                            torch.Generator().manual_seed(0))
    for n in like:
        assert noise[n].device == like[n].device
        assert torch.equal(noise[n].cpu(), on_cpu[n])


# --------------------------------------------------------------------------- the loop's step


def test_dp_step_takes_the_public_settings_and_the_call_time_values() -> None:
    fc = FinetuneConfig(max_grad_norm=0.7, physical_batch_size=5, aug_multiplicity=3,
                        augment="flip")
    step = dp_step(fc, noise_multiplier=1.25, expected_batch_size=12.5)
    assert step == DPStep(noise_multiplier=1.25, max_grad_norm=0.7, expected_batch_size=12.5,
                          physical_batch_size=5, aug_multiplicity=3, augment="flip")


@pytest.mark.parametrize("private", [True, False], ids=["dp", "control"])
def test_poisson_gradient_sets_the_mechanisms_gradient_of_a_poisson_batch(
        net: UNet2DModel, dp_loss: DenoisingLoss, private_split: Split, private: bool) -> None:
    """Each call: a Poisson batch from `batches`, then a draw seed from `draws`, then
    `noisy_gradient` (noise from `noise`) -- or, for the audit's control,
    `plain_gradient` -- of that batch, as the trained parameters' `.grad`; frozen
    parameters get none, and no loss is returned (a private batch's is never read)."""
    x, y = private_split
    keys = record_keys(x, y)
    step = DPStep(noise_multiplier=1.1, max_grad_norm=0.5, expected_batch_size=4.0,
                  physical_batch_size=3, aug_multiplicity=2)
    frozen = "conv_in.weight"
    net.get_parameter(frozen).requires_grad_(False)
    gradient = PoissonGradient(net, dp_loss, x, y, keys=keys, dp_step=step, sample_rate=0.25,
                               batches=torch.Generator().manual_seed(1),
                               draws=torch.Generator().manual_seed(2),
                               noise=torch.Generator().manual_seed(3), private=private)
    batches, draws, noise = (torch.Generator().manual_seed(s) for s in (1, 2, 3))
    sizes = []
    for i in range(2):
        batch = poisson_batch(len(x), 0.25, batches)
        sizes.append(len(batch))
        seed = next_draw_seed(draws)
        want = (noisy_gradient(net, dp_loss, x, y, batch, step, keys=keys, draw_seed=seed,
                               noise_generator=noise) if private else
                plain_gradient(net, dp_loss, x, y, batch, step, keys=keys, draw_seed=seed))
        assert gradient(i) is None
        for name, p in net.named_parameters():
            if name == frozen:
                assert p.grad is None
            else:
                assert torch.equal(p.grad, want[name]), name
    assert sum(sizes) > 0  # some examples' gradients, not only noise
