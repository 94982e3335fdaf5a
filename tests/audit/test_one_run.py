"""The one-run audit statistics (Steinke, Nasr & Jagielski 2023): the p-value is
the binomial tail it should be, the bound is valid (a truly ε-DP guesser rarely
beats it), and the ROC summaries agree with scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats
from sklearn.metrics import roc_auc_score, roc_curve as sk_roc_curve

from dpsynth.audit.one_run import (audit_bound, auc, epsilon_lower_bound,
                                   max_certifiable_epsilon, p_value, roc_curve, tpr_at_fpr)
from dpsynth.errors import InputError


@pytest.mark.parametrize("r,v,eps", [(100, 60, 0.0), (100, 80, 1.0), (40, 40, 2.0), (10, 3, 0.5)])
def test_without_delta_the_p_value_is_the_randomised_response_tail(r: int, v: int,
                                                                    eps: float) -> None:
    q = math.exp(eps) / (1 + math.exp(eps))
    assert p_value(1000, r, v, eps, 0.0) == pytest.approx(stats.binom.sf(v - 1, r, q), rel=1e-12)


def test_delta_only_raises_the_p_value() -> None:
    for v in (50, 70, 90):
        assert p_value(1000, 100, v, 1.0, 1e-5) >= p_value(1000, 100, v, 1.0, 0.0)
    assert p_value(1000, 100, 90, 1.0, 1e-3) > p_value(1000, 100, 90, 1.0, 1e-5)


def test_bound_solves_the_tail_equation() -> None:
    # all 100 guesses right, delta = 0: q^100 = 0.05 exactly at the bound
    bound = epsilon_lower_bound(1000, 100, 100, delta=0.0, p=0.05)
    q = 0.05 ** (1 / 100)
    assert bound == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    # and a partial score, against an independent root finder
    f = lambda e: stats.binom.sf(79, 100, 1 / (1 + math.exp(-e))) - 0.05  # noqa: E731
    assert epsilon_lower_bound(1000, 100, 80, delta=0.0, p=0.05) == pytest.approx(
        optimize.brentq(f, 0, 5), abs=1e-6)


def test_chance_level_guesses_bound_nothing() -> None:
    assert epsilon_lower_bound(1000, 100, 50, delta=1e-5, p=0.05) == 0.0
    assert epsilon_lower_bound(1000, 100, 0, delta=1e-5, p=0.05) == 0.0


def test_more_correct_guesses_give_a_higher_bound() -> None:
    bounds = [epsilon_lower_bound(500, 100, v, delta=1e-5, p=0.05) for v in (70, 80, 90, 100)]
    assert bounds == sorted(bounds) and bounds[0] > 0


def test_bound_is_valid_for_an_epsilon_dp_guesser() -> None:
    """Randomised response at exactly ε is ε-DP: its bound may exceed ε in at
    most 5% of audits (Bonferroni over 3 guess counts keeps it under 5%)."""
    eps, m, trials = 1.0, 200, 400
    rng = np.random.default_rng(0)
    exceed = 0
    for _ in range(trials):
        included = rng.random(m) < 0.5
        # the best an ε-DP mechanism allows: each canary's "in" signal correct w.p. e^ε/(1+e^ε)
        correct = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
        signal = np.where(correct, included, ~included)
        scores = signal + rng.random(m) * 0.5  # ties broken at random
        bound = audit_bound(scores, included, guess_fractions=(0.2, 0.5, 1.0), delta=0.0,
                            confidence=0.95)
        exceed += bound.epsilon_lower_bound > eps
    assert exceed / trials <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / trials)


def test_perfect_scores_reach_the_bonferroni_bound() -> None:
    included = np.arange(200) % 2 == 0
    scores = included.astype(float) + np.linspace(0, 0.1, 200)
    b = audit_bound(scores, included, guess_fractions=(0.5, 1.0), delta=0.0, confidence=0.95)
    assert (b.guesses, b.correct) == (200, 200)
    assert b.epsilon_lower_bound == pytest.approx(
        epsilon_lower_bound(200, 200, 200, delta=0.0, p=0.025), rel=1e-9)


def test_scores_must_be_finite_and_one_per_canary() -> None:
    with pytest.raises(InputError, match="finite"):
        audit_bound(np.array([0.1, np.nan]), np.array([True, False]), guess_fractions=(1.0,),
                    delta=0.0, confidence=0.95)
    with pytest.raises(ValueError):
        p_value(10, 5, 6, 1.0, 0.0)  # more correct than guesses


def test_roc_summaries_match_scikit_learn() -> None:
    rng = np.random.default_rng(1)
    included = rng.random(300) < 0.5
    scores = np.round(rng.normal(included * 0.8, 1.0), 1)  # rounded: ties happen
    assert auc(scores, included) == pytest.approx(roc_auc_score(included, scores), abs=1e-12)
    fpr, tpr = roc_curve(scores, included)
    sk_fpr, sk_tpr, _ = sk_roc_curve(included, scores, drop_intermediate=False)
    assert np.allclose(fpr, sk_fpr) and np.allclose(tpr, sk_tpr)
    for level in (0.01, 0.05, 0.2):
        expected = max(t for f, t in zip(sk_fpr, sk_tpr) if f <= level)
        assert tpr_at_fpr(scores, included, level) == pytest.approx(expected)


@pytest.mark.parametrize("m", [64, 256, 1000])
def test_a_perfect_attack_reaches_the_max_certifiable_epsilon_and_nothing_exceeds_it(
        m: int) -> None:
    fractions, delta, confidence = (0.1, 0.2, 0.5, 1.0), 1e-5, 0.95
    rng = np.random.default_rng(m)
    included = rng.random(m) < 0.5
    top = max_certifiable_epsilon(included, guess_fractions=fractions, delta=delta,
                                  confidence=confidence)
    perfect = included.astype(float) + rng.random(m) * 0.1  # every "in" above every "out"
    assert audit_bound(perfect, included, guess_fractions=fractions, delta=delta,
                       confidence=confidence).epsilon_lower_bound == pytest.approx(top)
    for seed in range(20):  # any other score vector proves no more
        scores = perfect + np.random.default_rng(seed).normal(0, 0.5, m)
        assert audit_bound(scores, included, guess_fractions=fractions, delta=delta,
                           confidence=confidence).epsilon_lower_bound <= top + 1e-9
    # an exact half split is the best case; at delta = 1e-5 no one-run audit, however
    # many canaries, certifies the default claim 10
    for size in (m, 100_000):
        half = np.arange(size) < size // 2
        best = max_certifiable_epsilon(half, guess_fractions=fractions, delta=delta,
                                       confidence=confidence)
        assert top <= best + 1e-9 if size == m else best < 10


def test_docstring_examples_hold() -> None:
    import doctest

    from dpsynth.audit import one_run

    result = doctest.testmod(one_run)
    assert result.attempted > 0 and result.failed == 0
