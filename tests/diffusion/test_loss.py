"""The per-example denoising loss: its formula, its independence across the
batch (what DP-SGD clips), label dropout, and pinned numbers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DModel

from dpsynth.config import DiffusionConfig, TimestepConfig
from dpsynth.diffusion.loss import DenoisingLoss, make_noise_schedule
from dpsynth.diffusion.timesteps import Piecewise, Uniform

NULL = 3  # tiny_spec has 3 classes


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(b: int = 6, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    return torch.rand(b, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, NULL, (b,), generator=g)


class Fake(torch.nn.Module):
    """A stand-in network whose output is a known function of its inputs."""

    def __init__(self, fn):  # type: ignore[no-untyped-def]
        super().__init__()
        self.fn = fn
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, class_labels):  # type: ignore[no-untyped-def]
        self.calls.append((x, t, class_labels))
        return SimpleNamespace(sample=self.fn(x, t, class_labels))


def alpha_bar(cfg: DiffusionConfig, t: torch.Tensor) -> torch.Tensor:
    return make_noise_schedule(cfg).alphas_cumprod[t].view(-1, 1, 1, 1)


def test_schedule_follows_the_config() -> None:
    cfg = DiffusionConfig(num_train_timesteps=50, beta_schedule="linear",
                          prediction_type="v_prediction")
    s = make_noise_schedule(cfg)
    assert s.config.num_train_timesteps == 50 and len(s.alphas_cumprod) == 50
    assert s.config.beta_schedule == "linear" and s.config.prediction_type == "v_prediction"
    assert (s.alphas_cumprod.diff() < 0).all()
    # diffusers' linear betas (1e-4 .. 0.02) do not rescale with T: at T=50 the
    # forward process ends far from noise; the cosine schedule does not have this issue
    assert s.alphas_cumprod[-1] > 0.5
    cosine = make_noise_schedule(DiffusionConfig(num_train_timesteps=50))
    assert cosine.config.beta_schedule == "squaredcos_cap_v2"
    assert cosine.alphas_cumprod[0] > 0.99 and cosine.alphas_cumprod[-1] < 1e-3
    linear = make_noise_schedule(DiffusionConfig(beta_schedule="linear"))  # T = 1000
    assert linear.alphas_cumprod[0] > 0.99 and linear.alphas_cumprod[-1] < 1e-3


def test_from_config() -> None:
    cfg = DiffusionConfig(label_dropout=0.2, timesteps=TimestepConfig(
        kind="piecewise", intervals=((0, 100), (100, 1000)), weights=(1.0, 1.0)))
    loss = DenoisingLoss.from_config(cfg, null_label=NULL)
    assert loss.label_dropout == 0.2 and loss.null_label == NULL
    assert loss.timesteps == Piecewise(1000, ((0, 100), (100, 1000)), (1.0, 1.0))
    assert DenoisingLoss.from_config(DiffusionConfig(), NULL).timesteps == Uniform(1000)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_formula_with_a_known_network(prediction_type: str) -> None:
    # Ho et al. (2020) eq. 14: || target - net(sqrt(ab) x0 + sqrt(1-ab) eps, t, y) ||^2, mean
    # over pixels; target eps, or v = sqrt(ab) eps - sqrt(1-ab) x0 (Salimans & Ho 2022).
    cfg = DiffusionConfig(prediction_type=prediction_type)  # type: ignore[arg-type]
    loss = DenoisingLoss.from_config(cfg, NULL)
    x0, y = batch()
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    noise = torch.randn(x0.shape, generator=gen(1))
    net = Fake(lambda x, t, y: 0.5 * x)
    got = loss.per_example(net, x0, y, t, noise)
    ab = alpha_bar(cfg, t)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    target = noise if prediction_type == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
    want = (0.5 * xt - target).pow(2).mean(dim=(1, 2, 3))
    assert got.shape == (6,)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # the network saw x_t, the given t and the given labels
    (x_seen, t_seen, y_seen), = net.calls
    torch.testing.assert_close(x_seen, xt, atol=1e-6, rtol=1e-5)
    assert torch.equal(t_seen, t) and torch.equal(y_seen, y)


def test_v_prediction_differs_from_epsilon(tiny_net: UNet2DModel) -> None:
    x0, y = batch()
    eps_loss = DenoisingLoss.from_config(DiffusionConfig(), NULL)
    v_loss = DenoisingLoss.from_config(DiffusionConfig(prediction_type="v_prediction"), NULL)
    draws = eps_loss.draw(x0, y, gen())
    with torch.no_grad():
        a = eps_loss.per_example(tiny_net, x0, draws[2], draws[0], draws[1])
        b = v_loss.per_example(tiny_net, x0, draws[2], draws[0], draws[1])
    assert a.shape == b.shape == (6,)
    assert not torch.allclose(a, b)


def test_per_example_values_do_not_depend_on_the_rest_of_the_batch(
        tiny_net: UNet2DModel) -> None:
    loss = DenoisingLoss.from_config(DiffusionConfig(), NULL)
    x0, y = batch()
    t, noise, y = loss.draw(x0, y, gen())
    with torch.no_grad():
        together = loss.per_example(tiny_net, x0, y, t, noise)
        alone = torch.cat([loss.per_example(tiny_net, x0[i:i + 1], y[i:i + 1], t[i:i + 1],
                                            noise[i:i + 1]) for i in range(len(x0))])
        # changing another example leaves example 0's loss alone
        x_other = x0.clone()
        x_other[1:] = -x_other[1:]
        changed = loss.per_example(tiny_net, x_other, y, t, noise)
    assert together.shape == (6,)
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(changed[0], together[0], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(changed[1:], together[1:])


def test_per_example_gradients_do_not_depend_on_the_rest_of_the_batch(
        tiny_net: UNet2DModel) -> None:
    loss = DenoisingLoss.from_config(DiffusionConfig(), NULL)
    x0, y = batch(3)
    t, noise, y = loss.draw(x0, y, gen())
    params = [p for p in tiny_net.parameters() if p.requires_grad]
    g_batch = torch.autograd.grad(loss.per_example(tiny_net, x0, y, t, noise)[1], params)
    g_alone = torch.autograd.grad(loss.per_example(tiny_net, x0[1:2], y[1:2], t[1:2],
                                                   noise[1:2])[0], params)
    for a, b in zip(g_batch, g_alone):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_call_is_draw_then_per_example(tiny_net: UNet2DModel) -> None:
    loss = DenoisingLoss.from_config(DiffusionConfig(), NULL)
    x0, y = batch()
    with torch.no_grad():
        direct = loss(tiny_net, x0, y, gen(7))
        t, noise, y2 = loss.draw(x0, y, gen(7))
        manual = loss.per_example(tiny_net, x0, y2, t, noise)
        again = loss(tiny_net, x0, y, gen(7))
    assert torch.equal(direct, manual) and torch.equal(direct, again)


def test_draw_shapes_and_timestep_distribution() -> None:
    cfg = DiffusionConfig(timesteps=TimestepConfig(kind="piecewise", intervals=((100, 200),),
                                                   weights=(1.0,)))
    loss = DenoisingLoss.from_config(cfg, NULL)
    x0 = torch.zeros(1000, 1, 8, 8, dtype=torch.float64)
    t, noise, _ = loss.draw(x0, torch.zeros(1000, dtype=torch.long), gen())
    assert t.shape == (1000,) and t.dtype == torch.int64
    assert 100 <= int(t.min()) and int(t.max()) < 200
    assert noise.shape == x0.shape and noise.dtype == torch.float64
    # standard normal noise: mean 0, variance 1 (64,000 draws: s.e. 0.004 and 0.0056)
    assert float(noise.mean()) == pytest.approx(0, abs=0.025)
    assert float(noise.var()) == pytest.approx(1, abs=0.035)


def test_label_dropout_rate() -> None:
    # n = 40,000 Bernoulli(0.1) draws: s.e. = sqrt(0.09 / n) = 0.0015; tolerance 0.008 > 5 s.e.
    loss = DenoisingLoss.from_config(DiffusionConfig(label_dropout=0.1), NULL)
    labels = torch.arange(40_000) % NULL
    _, _, out = loss.draw(torch.zeros(40_000, 1, 1, 1), labels, gen())
    dropped = out != labels
    assert float(dropped.double().mean()) == pytest.approx(0.1, abs=0.008)
    assert (out[dropped] == NULL).all()  # a dropped label becomes exactly the null label
    assert torch.equal(out[~dropped], labels[~dropped])  # the others are untouched


def test_no_label_dropout_never_drops() -> None:
    loss = DenoisingLoss.from_config(DiffusionConfig(label_dropout=0.0), NULL)
    labels = torch.arange(40_000) % NULL
    _, _, out = loss.draw(torch.zeros(40_000, 1, 1, 1), labels, gen())
    assert torch.equal(out, labels)


def test_pinned_numbers_from_a_tiny_deterministic_run(tiny_net: UNet2DModel) -> None:
    # seeded tiny UNet, seeded data and draws: any change in the schedule, the
    # target, the reduction or the draws' order moves these numbers
    loss = DenoisingLoss.from_config(DiffusionConfig(label_dropout=0.5), NULL)
    x0, y = batch(4)
    with torch.no_grad():
        got = loss(tiny_net, x0, y, gen(11))
    t, _, y2 = loss.draw(x0, y, gen(11))
    assert t.tolist() == PINNED_T and y2.tolist() == PINNED_Y
    torch.testing.assert_close(got, torch.tensor(PINNED_LOSS), atol=1e-5, rtol=1e-4)


PINNED_T = [441, 679, 520, 27]
PINNED_Y = [3, 0, 0, 1]  # from [2, 0, 0, 1]: the first label was dropped
PINNED_LOSS = [1.066775, 1.207447, 0.626871, 1.257762]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_draws_are_made_on_the_cpu_and_moved_to_the_batch_device(device: str) -> None:
    loss = DenoisingLoss.from_config(DiffusionConfig(label_dropout=0.5), NULL)
    x, y = batch()
    cpu = loss.draw(x, y, gen(4))
    moved = loss.draw(x.to(device), y.to(device), gen(4))
    for a, b in zip(cpu, moved):
        assert b.device.type == device
        assert torch.equal(a, b.cpu())
