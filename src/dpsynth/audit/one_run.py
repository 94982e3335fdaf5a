"""The statistics of a one-run membership audit (Steinke, Nasr & Jagielski 2023,
"Privacy Auditing with One (1) Training Run", Sec. 3 and Alg. 1/Prop. 5).

m canaries are each included in training independently with probability 1/2.
An auditor scores every canary, guesses "in" for the k+ highest scores and
"out" for the k- lowest, and abstains on the rest. Under (ε, δ)-DP the number
of correct guesses among r is (up to a δ term) dominated by Binomial(r,
e^ε / (1 + e^ε)); a count too high for that is evidence against the claimed
ε, and the largest ε it rejects at confidence 1 - p is the audit's lower bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from dpsynth.errors import InputError


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least `v` of `r` guesses correct] under an (ε, δ)-DP null.

    The paper's Proposition 5 / Algorithm 2: the binomial tail of ε-DP
    randomised response, plus a term that charges δ (at most 2mδ in total,
    spread over the most favourable shift of the count).

    >>> round(p_value(1000, 100, 100, 0.0, 0.0), 30) == round(0.5 ** 100, 30)
    True
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= {v=} <= {r=} <= {m=}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need {epsilon=} >= 0 and 0 <= {delta=} <= 1")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of ε-DP randomised response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if v == 0 or delta == 0:
        return min(beta, 1.0)
    # alpha = max_i P[v - i <= Binomial(r, q) < v] / i
    below = np.cumsum(stats.binom.pmf(v - np.arange(1, v + 1), r, q))
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float, p: float) -> float:
    """The largest ε rejected at level `p` by `v` correct guesses out of `r`
    (0 when nothing is rejected): "not (ε, δ)-DP, with confidence 1 - p".

    >>> round(epsilon_lower_bound(1000, 100, 100, delta=0.0, p=0.05), 2)
    3.49
    """
    if not 0 < p < 1:
        raise ValueError(f"need 0 < {p=} < 1")
    if p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0  # keep p_value(lo) < p <= p_value(hi)
    while p_value(m, r, v, hi, delta) < p:
        lo, hi = hi, hi * 2
        if hi > 1e3:
            return math.inf
    for _ in range(50):  # bisection to ~1e-12 relative
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < p else (lo, mid)
    return lo


@dataclass(frozen=True)
class AuditBound:
    """The best lower bound over the planned guess counts, Bonferroni-corrected."""

    epsilon_lower_bound: float
    guesses: int  # r = k+ + k- of the best choice
    correct: int  # v


def audit_bound(scores: np.ndarray, included: np.ndarray, *, guess_fractions: Sequence[float],
                delta: float, confidence: float) -> AuditBound:
    """Lower bound on ε from canary scores (higher score = "more likely in").

    For each fraction f, guess "in" for the top f·m/2 scores and "out" for the
    bottom f·m/2. The fractions are fixed in advance and the bound is taken at
    level (1 - confidence) / len(fractions) for each (Bonferroni), so taking the
    best of them keeps the stated confidence.

    Args:
        scores: [m] one score per canary.
        included: [m] bool, whether the canary was in the training set.
    """
    scores, included = np.asarray(scores, float), np.asarray(included, bool)
    m = len(scores)
    if m == 0 or scores.shape != included.shape or not np.all(np.isfinite(scores)):
        raise InputError(f"canary scores must be {m} finite values, one per canary")
    order = np.argsort(-scores, kind="stable")
    level = (1.0 - confidence) / len(guess_fractions)
    best = AuditBound(0.0, 0, 0)
    for f in guess_fractions:
        k = max(1, min(m // 2, int(round(f * m / 2))))
        v = int(included[order[:k]].sum() + (~included[order[m - k:]]).sum())
        bound = epsilon_lower_bound(m, 2 * k, v, delta=delta, p=level)
        if bound > best.epsilon_lower_bound:
            best = AuditBound(bound, 2 * k, v)
    return best


def max_certifiable_epsilon(included: np.ndarray, *, guess_fractions: Sequence[float],
                            delta: float, confidence: float) -> float:
    """The largest ε `audit_bound` can return for these canaries, whatever the
    scores: that of a perfect attack (every member ranked above every
    non-member), which gets the most correct guesses possible at every planned
    guess count, at the same Bonferroni level.

    A claim at or above it cannot be refuted by this audit: the audit is then
    inconclusive, not passed. It depends on how many canaries were included (a
    perfect attack guessing k "in" is wrong when fewer than k are), grows with
    their number m, and the δ term caps it: at δ = 1e-5 and 95%, 256 canaries
    split exactly in half certify at most 4.05 (the default's seeded draw: 3.34),
    1,000 at most 5.4, 10,000 at most 6.8, and more canaries no more.

    Args:
        included: [m] bool, whether each canary was in the training set.

    >>> half = np.arange(256) < 128
    >>> round(max_certifiable_epsilon(half, guess_fractions=(0.1, 0.2, 0.5, 1.0),
    ...                               delta=1e-5, confidence=0.95), 2)
    4.05
    """
    included = np.asarray(included, bool)
    return audit_bound(included.astype(float), included, guess_fractions=guess_fractions,
                       delta=delta, confidence=confidence).epsilon_lower_bound


def tpr_at_fpr(scores: np.ndarray, included: np.ndarray, fpr: float) -> float:
    """The largest true-positive rate of a threshold on `scores` whose
    false-positive rate is at most `fpr` (members are the positives)."""
    scores, included = np.asarray(scores, float), np.asarray(included, bool)
    pos, neg = np.sort(scores[included])[::-1], np.sort(scores[~included])[::-1]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    allowed = int(math.floor(fpr * len(neg)))  # negatives allowed above the threshold
    # the threshold sits just above the (allowed+1)-th highest negative
    cut = neg[allowed] if allowed < len(neg) else -math.inf
    return float(np.mean(pos > cut))


def auc(scores: np.ndarray, included: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half): P[score(in) > score(out)]."""
    scores, included = np.asarray(scores, float), np.asarray(included, bool)
    pos, neg = scores[included], scores[~included]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    ranks = stats.rankdata(np.concatenate([pos, neg]))
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def roc_curve(scores: np.ndarray, included: np.ndarray) -> tuple[list[float], list[float]]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1)."""
    scores, included = np.asarray(scores, float), np.asarray(included, bool)
    order = np.argsort(-scores, kind="stable")
    s, hit = scores[order], included[order]
    last = np.r_[np.diff(s) != 0, True]  # the last index of each run of tied scores
    tp, fp = np.cumsum(hit)[last], np.cumsum(~hit)[last]
    pos, neg = max(int(hit.sum()), 1), max(int((~hit).sum()), 1)
    return [0.0, *(fp / neg).tolist()], [0.0, *(tp / pos).tolist()]
