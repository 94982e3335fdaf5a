"""Does a hyperparameter ranking made on synthetic data hold on real data?
(Ghalebikesabi et al. 2023, Sec. 5.3, Fig. 4.) Pure functions over per-config
scores: rank correlations, the choice, and its regret.

The choice sees the synthetic validation scores only; the real test scores
measure the ranking afterwards and never choose (choosing on the test split
would make the reported real accuracy an optimistic, selected number).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats


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
