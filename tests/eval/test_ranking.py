"""Rank correlations against hand-computed values, the choice (synthetic
validation only, first on ties), its regret, and the bootstrap interval over
test examples on constructed correctness matrices."""

from __future__ import annotations

import doctest
import inspect
import math

import numpy as np
import pytest

from dpsynth.eval import ranking
from dpsynth.eval.ranking import bootstrap_interval, choose, kendall, regret, spearman


def test_spearman_and_kendall_match_hand_computed_values() -> None:
    x, y = [0.1, 0.2, 0.3, 0.4], [0.5, 0.9, 0.7, 0.8]
    # ranks of y: 1, 4, 2, 3; d = 0, -2, 1, 1; rho = 1 - 6 * 6 / (4 * (16 - 1)) = 0.4
    assert spearman(x, y) == pytest.approx(0.4)
    # pairs: 4 concordant, 2 discordant of 6: tau = 2 / 6
    assert kendall(x, y) == pytest.approx(1 / 3)
    assert spearman(x, x) == pytest.approx(1.0) and kendall(x, x) == pytest.approx(1.0)
    assert spearman(x, x[::-1]) == pytest.approx(-1.0)
    assert kendall(x, x[::-1]) == pytest.approx(-1.0)


def test_ties_get_mean_ranks_and_tau_b() -> None:
    x, y = [1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 4.0]
    # ranks x: 1, 2.5, 2.5, 4; y: 1, 3, 2, 4 -> Pearson of the ranks = 4.5 / sqrt(4.5 * 5)
    assert spearman(x, y) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    # 5 concordant, 0 discordant, one pair tied in x only: tau-b = 5 / sqrt(5 * 6)
    assert kendall(x, y) == pytest.approx(5 / math.sqrt(30))


def test_undefined_correlations_are_nan() -> None:
    assert math.isnan(spearman([0.5, 0.5, 0.5], [0.1, 0.2, 0.3]))
    assert math.isnan(kendall([0.1, 0.2, 0.3], [0.7, 0.7, 0.7]))
    with pytest.raises(ValueError):
        spearman([0.1], [0.2])
    with pytest.raises(ValueError):
        kendall([0.1, 0.2], [0.2, 0.3, 0.4])


def test_choose_takes_the_best_synthetic_score_and_the_first_on_ties() -> None:
    assert choose([0.5, 0.9, 0.7]) == 1
    assert choose([0.8, 0.6, 0.8]) == 0
    # the choice cannot see real scores: it has no parameter for them
    assert list(inspect.signature(choose).parameters) == ["synthetic_val"]
    for bad in ([], [0.1, math.nan]):
        with pytest.raises(ValueError):
            choose(bad)


def test_regret_is_what_the_choice_loses_on_real_data() -> None:
    real = [0.95, 0.6, 0.8]
    assert regret(real, choose([0.5, 0.9, 0.7])) == pytest.approx(0.35)
    assert regret(real, 0) == 0.0
    with pytest.raises(ValueError):
        regret(real, 3)


def _correct(accuracies: list[float], n: int, seed: int = 0) -> np.ndarray:
    """Per config, correct on an independent random subset of exactly round(a * n) of n
    test examples: shape (len(accuracies), n), bool."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(accuracies), n), bool)
    for row, a in zip(out, accuracies):
        row[rng.permutation(n)[:round(a * n)]] = True
    return out


def test_an_exact_well_separated_ranking_gets_a_tight_interval_at_1() -> None:
    # 8 configs 10 points apart on 400 test examples: a resample swaps two of them
    # with negligible probability, so every draw ranks them exactly as validation does
    acc = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    correct = _correct(acc, 400)
    for stat in (spearman, kendall):
        low, high = bootstrap_interval(acc, correct, stat, draws=500, confidence=0.95, seed=0)
        assert low == pytest.approx(1.0) and high == pytest.approx(1.0)


def test_a_reversed_ranking_gets_a_tight_interval_at_minus_1() -> None:
    acc = [0.2, 0.4, 0.6, 0.8]
    low, high = bootstrap_interval(acc[::-1], _correct(acc, 300), spearman, draws=500,
                                   confidence=0.95, seed=0)
    assert (low, high) == (pytest.approx(-1.0), pytest.approx(-1.0))


def test_statistically_identical_configs_get_a_wide_interval_covering_0() -> None:
    # 6 configs, each right on its own random 90% of 360 examples: their real
    # ordering is test-set noise, whatever the synthetic scores say
    correct = _correct([0.9] * 6, 360)
    val = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    for stat in (spearman, kendall):
        low, high = bootstrap_interval(val, correct, stat, draws=1000, confidence=0.95, seed=0)
        assert low < 0 < high and high - low > 1.0, (stat.__name__, low, high)


def test_a_narrower_confidence_gives_a_nested_interval() -> None:
    correct = _correct([0.86, 0.88, 0.9, 0.92], 200)
    val = [0.1, 0.2, 0.3, 0.4]
    wide = bootstrap_interval(val, correct, spearman, draws=1000, confidence=0.95, seed=3)
    narrow = bootstrap_interval(val, correct, spearman, draws=1000, confidence=0.5, seed=3)
    assert wide[0] <= narrow[0] <= narrow[1] <= wide[1] and wide != narrow


def test_the_interval_is_deterministic_given_the_seed() -> None:
    correct = _correct([0.85, 0.9, 0.88, 0.92, 0.8], 100)
    val = [0.3, 0.5, 0.4, 0.6, 0.1]
    first = bootstrap_interval(val, correct, kendall, draws=200, confidence=0.9, seed=[7, 1])
    assert bootstrap_interval(val, correct, kendall, draws=200, confidence=0.9,
                              seed=[7, 1]) == first
    # pinned: default_rng([7, 1]) resamples (numpy's PCG64 stream is stable)
    assert first == pytest.approx((0.4, 1.0))
    others = {bootstrap_interval(val, correct, kendall, draws=200, confidence=0.9, seed=s)
              for s in range(5)}
    assert len(others) > 1  # the seed does drive the resamples


def test_undefined_draws_widen_the_interval_and_never_tighten_it() -> None:
    # config 0 is right on example 0 only, config 1 never: a resample without
    # example 0 (probability 0.9 ** 10 = 0.35) ties them and rho is undefined there;
    # every defined draw is +1. Counted as -1 / +1, the undefined draws pull the
    # lower bound to -1; dropping them would claim a certain (1, 1).
    correct = np.zeros((2, 10), bool)
    correct[0, 0] = True
    assert bootstrap_interval([0.9, 0.1], correct, spearman, draws=1000, confidence=0.5,
                              seed=0) == (-1.0, 1.0)
    # configs that are right on the same examples tie on every resample
    same = np.tile(np.arange(20) % 3 == 0, (4, 1))
    assert bootstrap_interval([0.1, 0.2, 0.3, 0.4], same, kendall, draws=100, confidence=0.95,
                              seed=0) == (-1.0, 1.0)


def test_constant_synthetic_scores_give_an_undefined_interval() -> None:
    low, high = bootstrap_interval([0.7, 0.7, 0.7], _correct([0.2, 0.5, 0.9], 50), spearman,
                                   draws=100, confidence=0.95, seed=0)
    assert math.isnan(low) and math.isnan(high)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"correct": np.ones((3, 10), bool)}, r"shape \(len\(val_scores\), N >= 1\) = \(2, N\)"),
    ({"correct": np.ones((2, 10))}, "must be bool"),
    ({"correct": np.ones((2, 0), bool)}, "must be bool of shape"),
    ({"draws": 0}, "draws=0: need at least 1"),
    ({"confidence": 1.0}, r"confidence=1.0: must be in \(0, 1\)"),
    ({"confidence": 0.0}, r"confidence=0.0: must be in \(0, 1\)"),
])
def test_bad_arguments_are_refused(kwargs: dict, match: str) -> None:
    args = {"correct": np.ones((2, 10), bool), "draws": 100, "confidence": 0.95} | kwargs
    with pytest.raises(ValueError, match=match):
        bootstrap_interval([0.1, 0.2], args["correct"], spearman, draws=args["draws"],
                           confidence=args["confidence"], seed=0)


def test_module_doctests() -> None:
    assert doctest.testmod(ranking).failed == 0
