"""Rank correlations against hand-computed values, the choice (synthetic
validation only, first on ties) and its regret."""

from __future__ import annotations

import inspect
import math

import pytest

from dpsynth.eval.ranking import choose, kendall, regret, spearman


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
