"""Memorization of the private split by the generator, in aggregate.

A generated sample is a near-copy of a training image when its nearest private
neighbour is much closer than the second nearest: the ratio test of Carlini et
al. (2023, "Extracting Training Data from Diffusion Models", Sec. 4), here in
pixel space with ratio 1/3. The distribution of nearest-neighbour distances to
the private split is compared with that to a held-out split of the same size:
a model that copies its training data lands closer to the private images.

These numbers are computed on private data and are not covered by (ε, δ): only
the aggregates below leave the stage, never an image, a distance or an index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def flat_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float64 [N, H*W*C] in [0, 1]."""
    return torch.from_numpy(images.reshape(len(images), -1)).double() / 255.0


def two_nearest(queries: torch.Tensor, refs: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """[Q, 2] L2 distances from each query to its nearest and second-nearest reference.

    Chunked over queries so memory stays O(chunk * R) (50,000 x 50,000 for the
    CIFAR-10 reproduction is 20 GB at once)."""
    if len(refs) < 2:
        raise ValueError("need at least two reference images for a nearest/second-nearest ratio")
    out = []
    for start in range(0, len(queries), chunk):
        d = torch.cdist(queries[start:start + chunk], refs)
        out.append(d.topk(2, dim=1, largest=False).values)
    return torch.cat(out)


@dataclass(frozen=True)
class Memorization:
    """Aggregates only (see the module docstring)."""

    memorized_fraction: float  # samples with d1 / d2 < ratio against the private split
    heldout_memorized_fraction: float  # the same test against the held-out split (baseline)
    nn_distance_private_median: float  # equal-size subsamples of private and held-out
    nn_distance_heldout_median: float
    closer_to_private_fraction: float  # ~0.5 when the generator does not copy

    def metrics(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in self.__dataclass_fields__}


def memorization(samples: np.ndarray, private: np.ndarray, heldout: np.ndarray, *,
                 ratio: float, seed: int) -> Memorization:
    """Aggregate memorization statistics of `samples` against `private`.

    Args:
        samples, private, heldout: uint8 [N, H, W, C] images.
        ratio: the near-copy threshold on d1 / d2 (1/3 in Carlini et al.).
        seed: for the equal-size subsamples of private and held-out.
    """
    q = flat_unit(samples)
    d_priv = two_nearest(q, flat_unit(private))
    d_held = two_nearest(q, flat_unit(heldout))
    rng = np.random.default_rng(seed)
    n = min(len(private), len(heldout))  # a size derived from N: used, never reported
    priv_n = two_nearest(q, flat_unit(private[rng.choice(len(private), n, replace=False)]))[:, 0]
    held_n = two_nearest(q, flat_unit(heldout[rng.choice(len(heldout), n, replace=False)]))[:, 0]
    return Memorization(
        memorized_fraction=float((d_priv[:, 0] < ratio * d_priv[:, 1]).double().mean()),
        heldout_memorized_fraction=float((d_held[:, 0] < ratio * d_held[:, 1]).double().mean()),
        nn_distance_private_median=float(priv_n.median()),
        nn_distance_heldout_median=float(held_n.median()),
        closer_to_private_fraction=float((priv_n < held_n).double().mean()),
    )
