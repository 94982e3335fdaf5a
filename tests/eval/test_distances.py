"""Frechet distance, KID and precision/recall wrappers (dpsynth.eval.distances)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import calculate_frechet_distance

from dpsynth.config import DomainCnnConfig
from dpsynth.eval.distances import Moments, frechet_distance, kid, precision_recall
from dpsynth.eval.domain_cnn import DomainCnnExtractor, train_domain_cnn


def random_moments(d: int, seed: int) -> Moments:
    """A random mean and a well-conditioned covariance (eigenvalues in [0.5, ~4])."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d))
    return Moments(rng.normal(size=d), a @ a.T / d + 0.5 * np.eye(d))


@pytest.mark.parametrize("d", [64, 256])
def test_frechet_distance_matches_pytorch_fid(d: int) -> None:
    s1, s2 = random_moments(d, seed=1), random_moments(d, seed=2)
    ours = frechet_distance(s1, s2)
    theirs = calculate_frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    assert ours > 1  # not a degenerate comparison of two zeros
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert frechet_distance(s2, s1) == pytest.approx(ours, rel=1e-9)  # symmetric


def test_frechet_distance_of_a_mean_shift_is_its_squared_norm() -> None:
    # same covariance: the trace terms cancel exactly, FD = |delta|^2
    s = random_moments(32, seed=3)
    assert frechet_distance(s, s) == pytest.approx(0.0, abs=1e-9)
    delta = np.random.default_rng(4).normal(size=32)
    for scale in (0.1, 1.0, 10.0):
        shifted = Moments(s.mu + scale * delta, s.sigma)
        assert frechet_distance(s, shifted) == pytest.approx(scale**2 * delta @ delta, rel=1e-7)


def test_frechet_distance_refuses_mismatched_dimensions() -> None:
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(random_moments(4, 0), random_moments(5, 0))


def test_frechet_distance_grows_with_image_noise(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """FD in a (tiny, trained) domain CNN's space between clean digits and copies
    with Gaussian pixel noise of growing std grows monotonically, from ~0."""
    images, labels = digits
    cfg = DomainCnnConfig(steps=60, batch_size=64, width=8, feature_dim=16)
    ext = DomainCnnExtractor(train_domain_cnn(cfg, images[:400], labels[:400], num_classes=10,
                                              seed=0), "digits", "test")
    clean = images[400:900]
    rng = np.random.default_rng(0)
    noise = rng.normal(size=clean.shape)

    def moments(x: np.ndarray) -> Moments:
        f = ext(x).double().numpy()
        return Moments(f.mean(0), np.cov(f, rowvar=False))

    ref = moments(clean)
    fds = [frechet_distance(ref, moments(np.clip(clean + std * noise, 0, 255).astype(np.uint8)))
           for std in (0, 10, 20, 40, 80, 160)]
    assert fds[0] == pytest.approx(0.0, abs=1e-6)
    assert all(a < b for a, b in zip(fds, fds[1:])), fds


SHIFTS = (0.25, 0.5, 1.0)  # per-dimension mean shifts, in standard deviations


@pytest.fixture(scope="module")
def gaussian_features() -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent samples of the same 16-d standard Gaussian."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift(
        gaussian_features: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = gaussian_features
    same = kid(x, x, subsets=20, subset_size=200, seed=0)
    twin = kid(x, y, subsets=20, subset_size=200, seed=0)
    shifted = [kid(x, y + s, subsets=20, subset_size=200, seed=0) for s in SHIFTS]
    # the subsets of one set overlap, so KID(x, x) is slightly negative: still ~0
    assert abs(same.mean) < 0.05 and abs(twin.mean) < 0.05
    assert shifted[0].mean > 0.2 and shifted[-1].mean > 100 * abs(same.mean)
    assert all(a.mean < b.mean for a, b in zip(shifted, shifted[1:]))
    assert all(k.std >= 0 and k.subset_size == 200 for k in shifted)
    assert kid(x, y + 1.0, subsets=20, subset_size=200, seed=0) == shifted[-1]  # seeded


def test_kid_clips_the_subset_size_and_logs_it(
        gaussian_features: tuple[torch.Tensor, torch.Tensor],
        caplog: pytest.LogCaptureFixture) -> None:
    x, y = gaussian_features
    with caplog.at_level(logging.INFO, logger="dpsynth.eval.distances"):
        out = kid(x[:50], y[:80], subsets=5, subset_size=1000, seed=0)
    assert out.subset_size == 50
    assert "subset size 1000 clipped to 50" in caplog.text
    with pytest.raises(ValueError, match=">= 2 features"):
        kid(x[:1], y, subsets=5, subset_size=10, seed=0)


def test_precision_recall_high_for_the_same_set_and_fall_with_a_shift(
        gaussian_features: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = gaussian_features
    assert precision_recall(x, x, neighborhood=3) == (1.0, 1.0)  # every point in its own ball
    twin = precision_recall(x, y, neighborhood=3)
    shifted = [precision_recall(x, y + s, neighborhood=3) for s in SHIFTS]
    assert min(twin) > 0.7
    for before, after in zip([twin] + shifted, shifted):
        assert after.precision < before.precision and after.recall < before.recall
    assert max(shifted[-1]) < 0.5 * min(twin)
    with pytest.raises(ValueError, match="more than 3 features"):
        precision_recall(x[:3], y, neighborhood=3)
