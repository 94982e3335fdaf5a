"""Does a hyperparameter ranking made on synthetic data hold on real data?
(Ghalebikesabi et al. 2023, Sec. 5.3, Fig. 4.) Pure functions over per-config
scores: rank correlations, the choice, its regret, and a bootstrap interval of a
correlation over the test examples (is the ranking more than test-set noise?).

The choice sees the synthetic validation scores only; the real test scores
measure the ranking afterwards and never choose (choosing on the test split
would make the reported real accuracy an optimistic, selected number).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from scipy import stats

# a rank correlation of paired score lists, in [-1, 1] or NaN: `spearman`, `kendall`
Correlation = Callable[[Sequence[float], Sequence[float]], float]


def _paired(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(x, float), np.asarray(y, float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"need two score lists of the same length >= 2, got {a.shape} and "
                         f"{b.shape}")
    return a, b


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation rho of paired scores (ties get mean ranks).

    NaN when undefined: one of the lists is constant.

    >>> round(spearman([0.1, 0.2, 0.3, 0.4], [0.5, 0.9, 0.7, 0.8]), 6)  # 1 - 6*6/(4*15)
    0.4
    """
    a, b = _paired(x, y)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(stats.spearmanr(a, b).statistic)


def kendall(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of paired scores (tie-corrected). NaN when a list is constant.

    >>> round(kendall([0.1, 0.2, 0.3, 0.4], [0.5, 0.9, 0.7, 0.8]), 6)  # (4 - 2) / 6 pairs
    0.333333
    """
    a, b = _paired(x, y)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(stats.kendalltau(a, b).statistic)


def choose(synthetic_val: Sequence[float]) -> int:
    """The index of the best config on synthetic validation (the first on ties).

    Takes the synthetic validation scores alone, so nothing real can leak into
    the choice.
    """
    scores = np.asarray(synthetic_val, float)
    if scores.ndim != 1 or len(scores) == 0 or np.isnan(scores).any():
        raise ValueError(f"need a non-empty list of scores without NaN, got {synthetic_val!r}")
    return int(np.argmax(scores))


def regret(real_test: Sequence[float], chosen: int) -> float:
    """How much real accuracy the choice loses: max(real_test) - real_test[chosen] >= 0."""
    scores = np.asarray(real_test, float)
    if not 0 <= chosen < len(scores):
        raise ValueError(f"{chosen=} is not an index into {len(scores)} scores")
    return float(scores.max() - scores[chosen])


def bootstrap_interval(val_scores: Sequence[float], correct: np.ndarray,
                       stat: Correlation, *,
                       draws: int, confidence: float, seed: int | Sequence[int]
                       ) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat(val_scores, real accuracies)` over test
    examples (Efron & Tibshirani 1993, Sec. 13.3).

    Each draw resamples the test examples with replacement, recomputes every
    config's real accuracy on that resample and the correlation against the
    synthetic validation scores, which stay fixed: the interval measures the
    test split's sampling noise, the noise a ranking on a few hundred test images
    has to rise above. Synthetic-side noise is not in it.

    A correlation is undefined (NaN) when a list is constant:
    - constant `val_scores`: undefined whatever the test data, so the interval
      is (NaN, NaN), like the point estimate;
    - a resample on which all configs tie: that draw could be anything in
      [-1, 1], so it counts as -1 for the lower bound and +1 for the upper.
      Undefined draws can only widen the interval, never make it look tight.

    Args:
        val_scores: per config, the synthetic validation score, shape (C,).
        correct: per config and test example, whether the config's prediction is
            right; bool, shape (C, N), N >= 1. Per-example values of the test
            split: keep them in memory, never write or log them.
        stat: a rank correlation with values in [-1, 1] (`spearman`, `kendall`).
        draws: number of bootstrap resamples, >= 1.
        confidence: coverage of the interval, in (0, 1).
        seed: seeds `numpy.random.default_rng`; the same seed gives the same
            resamples, so two statistics with one seed share them.

    Returns:
        (low, high): the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles.

    A ranking that holds on every resample, and configs that cannot be told apart:

    >>> apart = np.array([[True] * 10, [True] * 5 + [False] * 5, [False] * 10])
    >>> bootstrap_interval([0.9, 0.5, 0.1], apart, spearman, draws=200, confidence=0.95,
    ...                    seed=0)
    (1.0, 1.0)
    >>> same = np.array([[True] * 5 + [False] * 5] * 3)
    >>> bootstrap_interval([0.9, 0.5, 0.1], same, kendall, draws=200, confidence=0.95,
    ...                    seed=0)
    (-1.0, 1.0)
    """
    val = np.asarray(val_scores, float)
    hits = np.asarray(correct)
    if hits.dtype != bool or hits.ndim != 2 or hits.shape[0] != len(val) or hits.shape[1] == 0:
        raise ValueError(f"correct must be bool of shape (len(val_scores), N >= 1) = "
                         f"({len(val)}, N), got {hits.dtype} {hits.shape}")
    if draws < 1:
        raise ValueError(f"{draws=}: need at least 1 bootstrap resample")
    if not 0 < confidence < 1:
        raise ValueError(f"{confidence=}: must be in (0, 1)")
    if np.ptp(val) == 0:
        return math.nan, math.nan
    n = hits.shape[1]
    hits_f = hits.astype(float)  # integer counts: tied accuracies tie exactly in float
    rng = np.random.default_rng(seed)
    values = np.empty(draws)
    for b in range(draws):
        counts = np.bincount(rng.integers(0, n, size=n), minlength=n)  # multiplicity of each
        values[b] = stat(val, hits_f @ counts / n)
    undefined = np.isnan(values)
    alpha = 1 - confidence
    low = np.quantile(np.where(undefined, -1.0, values), alpha / 2)
    high = np.quantile(np.where(undefined, 1.0, values), 1 - alpha / 2)
    return float(low), float(high)
