"""Memorization statistics: a copying generator is caught, a fresh one is not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from dpsynth.audit.memorization import flat_unit, memorization, two_nearest


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    d = load_digits()
    images = np.round(d.images * 255 / 16).astype(np.uint8)[..., None]
    return images[np.random.default_rng(0).permutation(len(images))]


def test_two_nearest_matches_brute_force_in_any_chunking() -> None:
    rng = np.random.default_rng(0)
    q, r = torch.from_numpy(rng.random((37, 5))), torch.from_numpy(rng.random((23, 5)))
    full = torch.cdist(q, r).sort(1).values[:, :2]
    for chunk in (1, 7, 1024):
        assert torch.allclose(two_nearest(q, r, chunk=chunk), full)


def test_copies_of_private_images_are_caught(digits: np.ndarray) -> None:
    private, heldout = digits[:600], digits[600:1200]
    copies = private[:100]  # a generator that replays its training data
    m = memorization(copies, private, heldout, ratio=1 / 3, seed=0)
    assert m.memorized_fraction == 1.0  # d1 = 0 < d2 / 3
    assert m.heldout_memorized_fraction < 0.05
    assert m.closer_to_private_fraction > 0.9
    assert m.nn_distance_private_median < 0.5 * m.nn_distance_heldout_median


def test_fresh_samples_of_the_same_distribution_are_not(digits: np.ndarray) -> None:
    private, heldout, fresh = digits[:600], digits[600:1200], digits[1200:1500]
    m = memorization(fresh, private, heldout, ratio=1 / 3, seed=0)
    assert m.memorized_fraction < 0.05
    assert 0.35 < m.closer_to_private_fraction < 0.65  # no side is special
    assert m.nn_distance_private_median == pytest.approx(m.nn_distance_heldout_median, rel=0.15)


def test_only_aggregates_come_out(digits: np.ndarray) -> None:
    m = memorization(digits[:50], digits[100:300], digits[300:400], ratio=1 / 3, seed=0)
    assert all(isinstance(v, float) for v in m.metrics().values())
    assert set(m.metrics()) == {"memorized_fraction", "heldout_memorized_fraction",
                                "nn_distance_private_median", "nn_distance_heldout_median",
                                "closer_to_private_fraction"}


def test_flat_unit_scales_to_unit_interval() -> None:
    x = flat_unit(np.array([[[[0], [255]]]], dtype=np.uint8))
    assert x.tolist() == [[0.0, 1.0]]
