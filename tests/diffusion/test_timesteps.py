"""Timestep distributions: `probs()` is the exact pmf and `sample()` follows it.

Sampling-error argument used below: with n = 200,000 draws, the count in a bin
of probability p is Binomial(n, p). Pearson's statistic over the k bins with
p > 0 is then approximately chi-square with k - 1 degrees of freedom; we accept
below its 1 - 1e-6 quantile, so a correct sampler fails with probability about
1e-6 (and, the generator being seeded, the outcome is fixed). For the mass of a
whole interval, the standard error is sqrt(p(1-p)/n) <= 0.0011, so a tolerance
of 0.006 is more than 5 standard errors. A test on a deliberately wrong pmf
shows that these checks have the power to catch a 2 % mistake.
"""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from dpsynth.config import TimestepConfig
from dpsynth.diffusion.timesteps import Piecewise, Uniform, make_timestep_distribution

N = 200_000
PIECEWISE = Piecewise(100, intervals=((0, 10), (10, 40), (70, 100), (40, 45)),
                      weights=(0.5, 0.2, 0.3, 0.0))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def chi2_accepts(samples: torch.Tensor, probs: torch.Tensor) -> tuple[bool, float, float]:
    counts = torch.bincount(samples, minlength=len(probs)).double()
    support = probs > 0
    assert counts[~support].sum() == 0, "samples outside the support"
    expected = probs[support] * len(samples)
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    limit = float(stats.chi2.ppf(1 - 1e-6, int(support.sum()) - 1))
    return stat < limit, stat, limit


@pytest.mark.parametrize("dist", [Uniform(1000), Uniform(2), PIECEWISE],
                         ids=["uniform1000", "uniform2", "piecewise"])
def test_probs_is_a_pmf(dist: Uniform | Piecewise) -> None:
    p = dist.probs()
    assert p.dtype == torch.float64 and p.shape == (dist.num_train_timesteps,)
    assert (p >= 0).all()
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)


def test_uniform_probs_are_flat() -> None:
    assert torch.equal(Uniform(4).probs(), torch.full((4,), 0.25, dtype=torch.float64))


def test_piecewise_probs_are_flat_inside_each_interval_with_its_weight() -> None:
    p = PIECEWISE.probs()
    torch.testing.assert_close(p[0:10], torch.full((10,), 0.5 / 10, dtype=torch.float64))
    torch.testing.assert_close(p[10:40], torch.full((30,), 0.2 / 30, dtype=torch.float64))
    torch.testing.assert_close(p[70:100], torch.full((30,), 0.3 / 30, dtype=torch.float64))
    assert (p[40:70] == 0).all()  # the gap and the zero-weight interval


def test_piecewise_weights_need_not_sum_to_one() -> None:
    a = Piecewise(10, ((0, 5), (5, 10)), (1.0, 3.0))
    b = Piecewise(10, ((0, 5), (5, 10)), (0.25, 0.75))
    torch.testing.assert_close(a.probs(), b.probs())
    assert float(a.probs()[:5].sum()) == pytest.approx(0.25)


def test_overlapping_intervals_add_up() -> None:
    p = Piecewise(10, ((0, 10), (0, 5)), (0.5, 0.5)).probs()
    torch.testing.assert_close(p[:5], torch.full((5,), 0.05 + 0.1, dtype=torch.float64))
    torch.testing.assert_close(p[5:], torch.full((5,), 0.05, dtype=torch.float64))


@pytest.mark.parametrize("dist", [Uniform(1000), PIECEWISE], ids=["uniform", "piecewise"])
def test_samples_follow_probs(dist: Uniform | Piecewise) -> None:
    t = dist.sample(N, gen())
    assert t.shape == (N,) and t.dtype == torch.int64
    assert int(t.min()) >= 0 and int(t.max()) < dist.num_train_timesteps
    ok, stat, limit = chi2_accepts(t, dist.probs())
    assert ok, f"chi-square {stat:.1f} >= {limit:.1f}"


def test_piecewise_interval_masses_match_weights() -> None:
    t = PIECEWISE.sample(N, gen(1))
    for (lo, hi), w in zip(PIECEWISE.intervals, PIECEWISE.weights):
        frac = float(((t >= lo) & (t < hi)).double().mean())
        assert frac == pytest.approx(w, abs=0.006), (lo, hi)
    assert int(((t >= 40) & (t < 70)).sum()) == 0  # never outside the positive-weight intervals


def test_the_histogram_check_has_power() -> None:
    # shift 2 % of the mass from the first interval to the second: must be rejected
    t = PIECEWISE.sample(N, gen())
    wrong = Piecewise(100, PIECEWISE.intervals, (0.48, 0.22, 0.3, 0.0)).probs()
    ok, stat, limit = chi2_accepts(t, wrong)
    assert not ok, f"chi-square {stat:.1f} < {limit:.1f}: the check cannot see a 2% error"


def test_interval_edges_are_reachable_and_half_open() -> None:
    t = Piecewise(1000, ((997, 1000), (5, 6)), (1.0, 1.0)).sample(20_000, gen())
    assert set(t.tolist()) == {5, 997, 998, 999}  # hi is excluded, a width-1 interval works


@pytest.mark.parametrize("dist", [Uniform(1000), PIECEWISE], ids=["uniform", "piecewise"])
def test_deterministic_given_the_generator(dist: Uniform | Piecewise) -> None:
    a, b = dist.sample(500, gen(3)), dist.sample(500, gen(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, dist.sample(500, gen(4)))
    g = gen(3)
    assert not torch.equal(dist.sample(500, g), dist.sample(500, g))  # it advances the generator


def test_pinned_draws() -> None:
    # exact values from this seed: a change in the sampling algorithm shows up here
    assert Uniform(1000).sample(5, gen(0)).tolist() == UNIFORM_PINNED
    assert PIECEWISE.sample(5, gen(0)).tolist() == PIECEWISE_PINNED


UNIFORM_PINNED = [44, 239, 933, 760, 963]
PIECEWISE_PINNED = [93, 75, 3, 87, 18]


def test_made_from_config() -> None:
    assert make_timestep_distribution(TimestepConfig(), 50) == Uniform(50)
    cfg = TimestepConfig(kind="piecewise", intervals=((0, 10), (10, 50)), weights=(1.0, 2.0))
    assert make_timestep_distribution(cfg, 50) == Piecewise(50, ((0, 10), (10, 50)), (1.0, 2.0))
