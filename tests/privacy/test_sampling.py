"""Poisson sampling of logical batches (PRIVACY.md rule 1): batch sizes have
mean qN and variance qN(1-q), each example joins with probability q
independently of the others, batches may be empty, and q = B/N refuses B > N
without revealing N."""

from __future__ import annotations

import math

import pytest
import torch

from dpsynth.errors import InputError
from dpsynth.privacy.sampling import micro_batches, poisson_batch, sample_rate

N, Q, DRAWS = 1000, 0.05, 2000
Z = 5.0  # tolerances are Z standard errors: a false alarm is a ~1e-6 event


def draw_many(n: int = N, q: float = Q, draws: int = DRAWS, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [poisson_batch(n, q, g) for _ in range(draws)]


def assert_poisson_sizes(sizes: torch.Tensor, n: int, q: float) -> None:
    """Binomial(n, q) moments within sampling error.

    The mean of D sizes has standard error sqrt(qN(1-q)/D); the sample variance
    has standard error ~ var * sqrt(2/(D-1)) (normal approximation, fine for
    qN = 50).
    """
    d = len(sizes)
    mean, var = n * q, n * q * (1 - q)
    sizes = sizes.double()
    assert abs(sizes.mean().item() - mean) < Z * math.sqrt(var / d), sizes.mean()
    assert abs(sizes.var().item() - var) < Z * var * math.sqrt(2 / (d - 1)), sizes.var()


def test_batch_size_has_binomial_mean_and_variance() -> None:
    sizes = torch.tensor([len(b) for b in draw_many()])
    assert_poisson_sizes(sizes, N, Q)


def test_size_check_has_power() -> None:
    """Fixed-size shuffled batches (variance 0) or a wrong q are rejected."""
    with pytest.raises(AssertionError):
        assert_poisson_sizes(torch.full((DRAWS,), int(N * Q)), N, Q)
    wrong_q = torch.tensor([len(b) for b in draw_many(q=0.055)])
    with pytest.raises(AssertionError):
        assert_poisson_sizes(wrong_q, N, Q)


def test_each_example_is_included_with_probability_q() -> None:
    counts = torch.zeros(N)
    for batch in draw_many():
        counts[batch] += 1
    # each count ~ Binomial(DRAWS, q); Z = 5.5 keeps 1000 simultaneous checks quiet
    sd = math.sqrt(DRAWS * Q * (1 - Q))
    assert (counts - DRAWS * Q).abs().max() < 5.5 * sd
    # independence across draws: the spread of the counts is binomial too (a sampler
    # that favours a fixed subset, or an epoch-wise shuffle, would not match)
    assert abs(counts.var().item() / sd**2 - 1) < Z * math.sqrt(2 / (N - 1))


def test_inclusions_are_independent_between_examples() -> None:
    """Two examples are in the same batch with probability q^2 (not q, not 0)."""
    both = sum(int(bool((b == 0).any() and (b == 1).any())) for b in draw_many(n=20, q=0.3))
    p = 0.3**2
    assert abs(both - DRAWS * p) < Z * math.sqrt(DRAWS * p * (1 - p))


def test_batches_are_sorted_unique_indices_from_the_generator() -> None:
    g = torch.Generator().manual_seed(7)
    batch = poisson_batch(N, Q, g)
    assert batch.dtype == torch.int64 and batch.dim() == 1
    assert (batch.diff() > 0).all() and batch.min() >= 0 and batch.max() < N
    # the caller's generator is the only source of randomness
    torch.manual_seed(1)
    again = poisson_batch(N, Q, torch.Generator().manual_seed(7))
    assert torch.equal(batch, again)
    assert not torch.equal(batch, poisson_batch(N, Q, torch.Generator().manual_seed(8)))


def test_batches_can_be_empty() -> None:
    """With qN = 0.1, about 90% of batches are empty (P = (1-q)^N)."""
    sizes = torch.tensor([len(b) for b in draw_many(n=100, q=0.001)])
    p_empty = (1 - 0.001) ** 100
    empty = (sizes == 0).sum().item()
    assert abs(empty - DRAWS * p_empty) < Z * math.sqrt(DRAWS * p_empty * (1 - p_empty))
    batch = poisson_batch(100, 0.0, torch.Generator().manual_seed(0))
    assert batch.shape == (0,) and batch.dtype == torch.int64
    assert micro_batches(batch, 4) == []


def test_micro_batches_split_in_order() -> None:
    indices = torch.tensor([2, 3, 5, 7, 11, 13, 17])
    parts = micro_batches(indices, 3)
    assert [p.tolist() for p in parts] == [[2, 3, 5], [7, 11, 13], [17]]
    assert [p.tolist() for p in micro_batches(indices, 100)] == [indices.tolist()]
    assert len(micro_batches(indices, 1)) == 7


def test_sample_rate() -> None:
    assert sample_rate(50, 1000) == 0.05
    assert sample_rate(37, 37) == 1.0


def test_sample_rate_refuses_a_batch_larger_than_the_split_without_naming_its_size() -> None:
    with pytest.raises(InputError) as err:
        sample_rate(50, 37)
    message = str(err.value)
    assert "37" not in message  # N is private (PRIVACY.md rule 6)
    assert "batch_size=50" in message  # names the public setting to change
