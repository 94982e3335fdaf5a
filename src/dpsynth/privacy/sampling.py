"""Poisson sampling of logical batches (PRIVACY.md rule 1).

Each example joins each logical batch independently with probability q, which
is what the PRV and RDP accountants assume. The batch size varies, and may be
zero: an empty batch still adds noise and still counts as a step.
"""

from __future__ import annotations

import torch

from dpsynth.errors import InputError


def sample_rate(expected_batch_size: int, dataset_size: int) -> float:
    """q = B / N. `dataset_size` is private: it never appears in messages."""
    if expected_batch_size > dataset_size:
        raise InputError(f"finetune.batch_size={expected_batch_size} is larger than the private "
                         "split; lower finetune.batch_size")
    return expected_batch_size / dataset_size


def poisson_batch(dataset_size: int, q: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of one logical batch: each of `dataset_size` examples with prob. `q`.

    Returns:
        Sorted int64 indices, shape [b] with b ~ Binomial(N, q) (possibly 0).
    """
    return torch.nonzero(torch.rand(dataset_size, generator=generator) < q).flatten()


def micro_batches(indices: torch.Tensor, physical_batch_size: int) -> list[torch.Tensor]:
    """Split a logical batch into physical micro-batches (memory only: clipping
    is per example and noise is added once per logical batch, whatever the split)."""
    return list(indices.split(physical_batch_size)) if len(indices) else []
