"""Distances between two feature distributions: Frechet distance, KID and
precision/recall, as thin wrappers around torch-fidelity's reference code.

Wrapping instead of re-implementing keeps our numbers comparable with published
ones. Every torch-fidelity setting is passed explicitly, so a change of its
defaults cannot change our metrics silently.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Protocol

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_kid import (KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD,
                                       kid_features_to_metric)
from torch_fidelity.metric_prc import (KEY_METRIC_PRECISION, KEY_METRIC_RECALL,
                                       prc_features_to_metric)

log = logging.getLogger(__name__)

# torch-fidelity's own defaults (torch_fidelity/defaults.py), pinned here
KID_KERNEL_POLY_DEGREE = 3  # k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018)
KID_KERNEL_POLY_COEF0 = 1
PRC_BATCH_SIZE = 10_000  # rows of the pairwise-distance blocks


class GaussianMoments(Protocol):
    """Anything with a mean `mu` [d] and covariance `sigma` [d, d] (float64)."""

    @property
    def mu(self) -> np.ndarray: ...

    @property
    def sigma(self) -> np.ndarray: ...


class Moments(NamedTuple):
    """A plain (mu, sigma) pair."""

    mu: np.ndarray
    sigma: np.ndarray


class KidResult(NamedTuple):
    mean: float
    std: float
    subset_size: int  # after clipping to the number of features on each side


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def frechet_distance(stats1: GaussianMoments, stats2: GaussianMoments) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017):
    |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    torch-fidelity takes tr((sigma1 sigma2)^(1/2)) as the sum of the square roots
    of the eigenvalues of sigma1 sigma2, which needs no matrix square root
    (`benchmarks/fid.py` compares it with scipy's `sqrtm`). It is "FID" only in
    Inception-v3 feature space; callers name it after their feature space.

    Args:
        stats1: mean [d] and covariance [d, d].
        stats2: the same for the other distribution.

    Returns:
        The distance (>= 0 up to rounding).
    """
    s1 = {"mu": np.asarray(stats1.mu, np.float64), "sigma": np.asarray(stats1.sigma, np.float64)}
    s2 = {"mu": np.asarray(stats2.mu, np.float64), "sigma": np.asarray(stats2.sigma, np.float64)}
    if s1["mu"].shape != s2["mu"].shape or s1["sigma"].shape != s2["sigma"].shape:
        raise ValueError(f"statistics of different dimensions: mu {s1['mu'].shape} vs "
                         f"{s2['mu'].shape}, sigma {s1['sigma'].shape} vs {s2['sigma'].shape}")
    return float(fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID])


def kid(features_syn: torch.Tensor, features_ref: torch.Tensor, *, subsets: int,
        subset_size: int, seed: int) -> KidResult:
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 with a
    cubic polynomial kernel, averaged over `subsets` random subsets.

    Args:
        features_syn: [N1, d] features of the synthetic images.
        features_ref: [N2, d] features of the real reference images.
        subsets: number of random subsets.
        subset_size: images per subset; clipped to min(N1, N2) (logged), since
            subsets are drawn without replacement.
        seed: seeds the subset draws.

    Returns:
        Mean and standard deviation over the subsets, and the subset size used.
    """
    n = min(len(features_syn), len(features_ref))
    if n < 2:
        raise ValueError(f"KID needs >= 2 features per side, got {len(features_syn)=} "
                         f"and {len(features_ref)=}")
    size = min(subset_size, n)
    if size < subset_size:
        log.info("KID: subset size %d clipped to %d, the number of features kept per side",
                 subset_size, size)
    out = kid_features_to_metric(
        features_syn.float().cpu(), features_ref.float().cpu(), kid_subsets=subsets,
        kid_subset_size=size, kid_kernel="poly", kid_kernel_poly_degree=KID_KERNEL_POLY_DEGREE,
        kid_kernel_poly_gamma=None,  # None = 1 / d
        kid_kernel_poly_coef0=KID_KERNEL_POLY_COEF0, rng_seed=seed, verbose=False)
    return KidResult(float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD]), size)


def precision_recall(features_syn: torch.Tensor, features_ref: torch.Tensor, *,
                     neighborhood: int) -> PrecisionRecall:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    Precision: the fraction of synthetic samples inside the real manifold (the
    union of k-NN balls around real samples); recall: the fraction of real
    samples inside the synthetic manifold.

    Args:
        features_syn: [N1, d] synthetic features.
        features_ref: [N2, d] real features.
        neighborhood: k of the k-NN balls; each side needs more than k samples.

    Returns:
        (precision, recall), each in [0, 1].
    """
    n = min(len(features_syn), len(features_ref))
    if n <= neighborhood:
        raise ValueError(f"precision/recall with {neighborhood=} needs more than "
                         f"{neighborhood} features per side, got {n}")
    # save_cpu_ram: blockwise distances, so memory is O(N * block), not O(N^2)
    out = prc_features_to_metric(features_syn.float().cpu(), features_ref.float().cpu(),
                                 prc_neighborhood=neighborhood, prc_batch_size=PRC_BATCH_SIZE,
                                 save_cpu_ram=True, verbose=False)
    return PrecisionRecall(float(out[KEY_METRIC_PRECISION]), float(out[KEY_METRIC_RECALL]))
