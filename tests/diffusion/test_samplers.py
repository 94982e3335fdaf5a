"""Samplers: one contract for DDPM, DDIM and DPM-Solver++, checked against
networks whose exact output is known (an oracle denoiser for a point mass and
for a Gaussian), plus classifier-free guidance and the uint8 conversion."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel

from dpsynth.choices import SamplerKind
from dpsynth.config import DiffusionConfig
from dpsynth.diffusion.loss import make_noise_schedule
from dpsynth.diffusion.samplers import from_uint8, guided_model, make_sampler, sample, to_uint8

KINDS = ["ddpm", "ddim", "dpmsolver++"]
NULL = 3
SHAPE = (1, 8, 8)
SCHEDULE = make_noise_schedule(DiffusionConfig())
ALPHA_BAR = SCHEDULE.alphas_cumprod


class Fake(torch.nn.Module):
    """Records every call; returns `fn(x, t, y)` as diffusers' output object."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
                 ) -> None:
        super().__init__()
        self.fn = fn
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, class_labels):  # type: ignore[no-untyped-def]
        self.calls.append((x.clone(), t.clone(), class_labels.clone()))
        return SimpleNamespace(sample=self.fn(x, t, class_labels))


def point_mass_oracle(x_star: torch.Tensor, t_shift: int = 0) -> Fake:
    """The exact eps-prediction when the data is the single image `x_star`:
    eps = (x_t - sqrt(ab_t) x*) / sqrt(1 - ab_t). `t_shift` breaks it on purpose."""

    def eps(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = ALPHA_BAR[(t + t_shift).clamp(max=999)].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x_star) / (1 - a).sqrt()

    return Fake(eps)


def gaussian_oracle(mu: float, s: float) -> Fake:
    """The exact eps-prediction when every pixel of the data is N(mu, s^2):
    E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a)."""

    def eps(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = ALPHA_BAR[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s * s + 1 - a)

    return Fake(eps)


def run(net: torch.nn.Module, kind: SamplerKind, *, seed: int = 0, n: int = 4, steps: int = 5,
        guidance_scale: float = 1.0, eta: float = 0.0,
        generator: torch.Generator | None = None) -> torch.Tensor:
    return sample(net, make_sampler(kind, SCHEDULE), torch.arange(n) % NULL, SHAPE,
                  num_inference_steps=steps, guidance_scale=guidance_scale, null_label=NULL,
                  generator=generator or torch.Generator().manual_seed(seed), eta=eta)


def test_make_sampler_shares_the_training_schedule() -> None:
    schedule = make_noise_schedule(DiffusionConfig(num_train_timesteps=200,
                                                   prediction_type="v_prediction"))
    types = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler,
             "dpmsolver++": DPMSolverMultistepScheduler}
    for kind, cls in types.items():
        s = make_sampler(kind, schedule)  # type: ignore[arg-type]
        assert type(s) is cls
        assert s is not make_sampler(kind, schedule)  # fresh: schedulers are stateful
        assert s.config.num_train_timesteps == 200
        assert s.config.prediction_type == "v_prediction"
        torch.testing.assert_close(s.alphas_cumprod, schedule.alphas_cumprod)
    dpm = make_sampler("dpmsolver++", schedule)
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2


@pytest.mark.parametrize("kind", KINDS)
def test_shape_range_and_determinism(kind: SamplerKind, tiny_net: UNet2DModel) -> None:
    a = run(tiny_net, kind, seed=1)
    assert a.shape == (4, *SHAPE) and a.dtype == torch.float32
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    assert torch.equal(a, run(tiny_net, kind, seed=1))
    assert not torch.equal(a, run(tiny_net, kind, seed=2))


@pytest.mark.parametrize("kind", KINDS)
def test_a_reused_sampler_is_reset(kind: SamplerKind) -> None:
    net = gaussian_oracle(0.2, 0.3)
    sampler = make_sampler(kind, SCHEDULE)
    outs = [sample(net, sampler, torch.zeros(3, dtype=torch.long), SHAPE, num_inference_steps=5,
                   guidance_scale=1.0, null_label=NULL,
                   generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_point_mass_oracle_is_recovered(kind: SamplerKind, prediction_type: str) -> None:
    # with the exact denoiser for data = {x*}, every sampler must return x*: this
    # checks the timesteps handed to the net, the step maths and the return value
    x_star = torch.linspace(-0.9, 0.9, 64).view(1, *SHAPE)
    cfg = DiffusionConfig(prediction_type=prediction_type)  # type: ignore[arg-type]
    schedule = make_noise_schedule(cfg)
    eps_net = point_mass_oracle(x_star)

    def out(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        eps = eps_net.fn(x, t, y)
        if prediction_type == "epsilon":
            return eps
        a = ALPHA_BAR[t].view(-1, 1, 1, 1)
        return a.sqrt() * eps - (1 - a).sqrt() * x_star  # v (Salimans & Ho 2022)

    got = sample(Fake(out), make_sampler(kind, schedule), torch.zeros(8, dtype=torch.long), SHAPE,
                 num_inference_steps=25, guidance_scale=1.0, null_label=NULL,
                 generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, x_star.expand(8, *SHAPE), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_point_mass_check_has_power(kind: SamplerKind) -> None:
    # the same oracle evaluated at the wrong timestep must miss x*
    x_star = torch.linspace(-0.9, 0.9, 64).view(1, *SHAPE)
    got = run(point_mass_oracle(x_star, t_shift=30), kind, n=8, steps=25)
    assert (got - x_star).abs().max() > 0.05


# mean and std of 512 x 64 pixels drawn with the exact Gaussian denoiser, 25 steps,
# seed 0. The exact answer is (0.2, 0.3); what is left is each sampler's own
# discretisation error at 25 steps (all approach 0.3 at 250 steps): ancestral
# sampling (DDPM, DDIM eta=1) under-disperses most, DPM-Solver++ least.
GAUSSIAN_PINNED = {
    ("ddpm", 0.0): (0.1999, 0.2526),
    ("ddim", 0.0): (0.1931, 0.2746),
    ("ddim", 1.0): (0.1999, 0.2526),
    ("dpmsolver++", 0.0): (0.1960, 0.2946),
}


@pytest.mark.parametrize("kind, eta", list(GAUSSIAN_PINNED))
def test_gaussian_oracle_statistics_are_pinned(kind: SamplerKind, eta: float) -> None:
    x = run(gaussian_oracle(0.2, 0.3), kind, n=512, steps=25, eta=eta)
    mean, std = GAUSSIAN_PINNED[(kind, eta)]
    assert float(x.mean()) == pytest.approx(mean, abs=2e-3)
    assert float(x.std()) == pytest.approx(std, abs=2e-3)
    assert abs(float(x.mean()) - 0.2) < 0.01 and abs(float(x.std()) - 0.3) < 0.05


@pytest.mark.parametrize("kind", KINDS)
def test_an_imperfect_denoiser_does_not_saturate_samples(kind: SamplerKind) -> None:
    # A trained net is never exact. With a small constant error in eps, a sampler
    # that divides by alpha_t ~ 1e-2 near t = T without clipping x0 (DPM-Solver++
    # before the fix) pushed 60% of pixels to -1 or +1 on real digits models.
    base = gaussian_oracle(0.0, 0.3).fn
    x = run(Fake(lambda x, t, y: base(x, t, y) + 0.1), kind, n=256, steps=25)
    saturated = float((x.abs() > 0.99).float().mean())
    assert saturated < 0.02, f"{kind}: {saturated:.1%} of pixels saturated"
    assert float(x.std()) < 0.45


def draws_after(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    torch.randn(shape, generator=g)
    return g.get_state()


@pytest.mark.parametrize("kind, eta, consumes", [
    ("ddpm", 0.0, True),          # ancestral: fresh noise at every step but the last
    ("ddim", 0.0, False),         # deterministic DDIM draws no step noise
    ("ddim", 1.0, True),
    ("dpmsolver++", 0.0, False),  # the ODE solver draws no step noise
])
def test_step_noise_use_of_the_generator(kind: SamplerKind, eta: float, consumes: bool) -> None:
    # DDIM with eta = 0 and DPM-Solver++ draw only the initial noise x_T from the
    # generator (diffusers skips the step-noise draw when eta = 0), so their output is
    # a function of x_T alone; DDPM and DDIM with eta > 0 draw fresh noise per step.
    g = torch.Generator().manual_seed(5)
    run(gaussian_oracle(0.2, 0.3), kind, n=4, steps=10, eta=eta, generator=g)
    only_initial = torch.equal(g.get_state(), draws_after((4, *SHAPE), 5))
    assert only_initial is not consumes


@pytest.mark.parametrize("kind", KINDS)
def test_guidance_scale_one_is_the_conditional_model_alone(kind: SamplerKind) -> None:
    net = Fake(lambda x, t, y: 0.1 * x + 0.01 * y.view(-1, 1, 1, 1))
    labels = torch.arange(4) % NULL
    run(net, kind, n=4, steps=6, guidance_scale=1.0)
    assert len(net.calls) == 6  # one forward per step, no unconditional pass
    for x, t, y in net.calls:
        assert x.shape == (4, *SHAPE) and t.shape == (4,)
        assert torch.equal(y, labels)
    steps = [int(t[0]) for _, t, _ in net.calls]
    assert steps == sorted(steps, reverse=True) and len(set(steps)) == 6


@pytest.mark.parametrize("kind", KINDS)
def test_guidance_runs_cond_and_uncond_in_one_batch(kind: SamplerKind) -> None:
    net = Fake(lambda x, t, y: 0.1 * x + 0.01 * y.view(-1, 1, 1, 1))
    labels = torch.arange(4) % NULL
    run(net, kind, n=4, steps=6, guidance_scale=3.0)
    assert len(net.calls) == 6
    for x, t, y in net.calls:
        assert x.shape == (8, *SHAPE)
        assert torch.equal(x[:4], x[4:]) and torch.equal(t[:4], t[4:])
        assert torch.equal(y, torch.cat([labels, torch.full((4,), NULL)]))


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5, 7.0])
def test_guidance_combines_uncond_plus_w_times_the_difference(w: float) -> None:
    # net output = 10 * label + x: cond = 10 y + x, uncond = 10 * null + x
    net = Fake(lambda x, t, y: 10.0 * y.view(-1, 1, 1, 1).float() + x)
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2])
    got = guided_model(net, w, NULL)(x, torch.full((3,), 500), y)
    cond = 10.0 * y.view(-1, 1, 1, 1) + x
    uncond = 10.0 * NULL + x
    torch.testing.assert_close(got, uncond + w * (cond - uncond))
    assert len(net.calls) == 1


def test_guidance_scale_one_output_is_the_net_output_exactly(tiny_net: UNet2DModel) -> None:
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    t, y = torch.full((3,), 500), torch.tensor([0, 1, 2])
    with torch.no_grad():
        assert torch.equal(guided_model(tiny_net, 1.0, NULL)(x, t, y),
                           tiny_net(x, t, class_labels=y).sample)


def test_guidance_changes_the_samples(tiny_net: UNet2DModel) -> None:
    a = run(tiny_net, "ddim", guidance_scale=1.0)
    b = run(tiny_net, "ddim", guidance_scale=3.0)
    assert not torch.allclose(a, b)


def test_uint8_round_trip_is_exact_for_every_value() -> None:
    values = torch.arange(256, dtype=torch.uint8)
    images = values.view(2, 4, 32, 1).repeat(1, 1, 1, 3)  # NHWC, 3 channels
    x = from_uint8(images)
    assert x.shape == (2, 3, 4, 32) and x.dtype == torch.float32
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert torch.equal(to_uint8(x), images)


def test_uint8_layout_and_clamping() -> None:
    x = torch.zeros(1, 3, 2, 4)
    x[0, 0, 1, 3] = 1.0   # channel 0, row 1, column 3
    x[0, 2, 0, 0] = -5.0  # out of range: clamped to 0
    x[0, 1, 0, 1] = 5.0   # clamped to 255
    out = to_uint8(x)
    assert out.shape == (1, 2, 4, 3) and out.dtype == torch.uint8
    assert int(out[0, 1, 3, 0]) == 255 and int(out[0, 0, 0, 2]) == 0
    assert int(out[0, 0, 1, 1]) == 255
    assert int(out[0, 0, 0, 0]) == 128  # 0.0 -> 127.5 -> rounds to even 128


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, eta", [("ddpm", 0.0), ("ddim", 1.0), ("dpmsolver++", 0.0)])
def test_sampling_on_a_device_matches_the_cpu(device: str, kind: SamplerKind, eta: float,
                                              tiny_net: UNet2DModel) -> None:
    """Labels on the device put the work there; the initial and the step noise come
    from the CPU generator, so the samples are those of a CPU run (up to float error),
    with and without guidance."""
    import copy

    moved = copy.deepcopy(tiny_net).to(device)
    for w in (1.0, 2.0):
        cpu = run(tiny_net, kind, seed=3, guidance_scale=w, eta=eta)
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # float32 throughout
            got = sample(moved, make_sampler(kind, SCHEDULE),
                         (torch.arange(4) % NULL).to(device), SHAPE, num_inference_steps=5,
                         guidance_scale=w, null_label=NULL,
                         generator=torch.Generator().manual_seed(3), eta=eta)
        assert got.device.type == device
        torch.testing.assert_close(got.cpu(), cpu, atol=1e-4, rtol=0)
