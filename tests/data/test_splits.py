"""Seeded, stratified splitting."""

from __future__ import annotations

import numpy as np
import pytest

from dpsynth.data.splits import class_counts, nested_balanced_order, stratified_split
from dpsynth.errors import InputError

FRACTIONS = {"public": 0.25, "private": 0.55, "test": 0.20}


def test_class_counts_pinned() -> None:
    assert class_counts(10, FRACTIONS) == {"public": 3, "private": 5, "test": 2}
    assert class_counts(100, FRACTIONS) == {"public": 25, "private": 55, "test": 20}
    # 3 examples: rounding gives test none; it takes one from private.
    assert class_counts(3, FRACTIONS) == {"public": 1, "private": 1, "test": 1}
    # Too few to give every role one: the largest remainders win.
    assert class_counts(2, FRACTIONS) == {"public": 1, "private": 1, "test": 0}
    assert class_counts(1, {"public": 0.3125, "private": 0.6875}) == {"public": 0, "private": 1}
    assert class_counts(7, {"a": 0.0, "b": 2.0, "c": 1.0}) == {"a": 0, "b": 5, "c": 2}


def test_partition_stratified_and_deterministic() -> None:
    labels = np.repeat(np.arange(4), [40, 21, 7, 3])
    split = stratified_split(labels, FRACTIONS, seed=3)
    everything = np.concatenate(list(split.values()))
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(labels)))  # disjoint, full
    for role, idx in split.items():
        assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
        counts = np.bincount(labels[idx], minlength=4)
        assert np.all(counts >= 1), role  # every class in every role
        expected = np.bincount(labels) * FRACTIONS[role]
        assert np.all(np.abs(counts - expected) <= 1.5), (role, counts, expected)
    again = stratified_split(labels, FRACTIONS, seed=3)
    assert all(np.array_equal(split[r], again[r]) for r in FRACTIONS)
    other = stratified_split(labels, FRACTIONS, seed=4)
    assert not all(np.array_equal(split[r], other[r]) for r in FRACTIONS)


def test_fractions_are_renormalised() -> None:
    labels = np.zeros(10, np.int64)
    split = stratified_split(labels, {"public": 1.0, "private": 3.0}, seed=0)
    assert len(split["public"]) == 3  # 10 * 1/4 = 2.5: the tie goes to the earlier role
    assert len(split["public"]) + len(split["private"]) == 10


def test_bad_fractions() -> None:
    with pytest.raises(InputError, match="data.fractions"):
        stratified_split(np.zeros(3), {"public": -0.1, "private": 1.1}, seed=0)
    with pytest.raises(InputError, match="positive sum"):
        stratified_split(np.zeros(3), {"public": 0.0}, seed=0)


def test_nested_balanced_order_prefixes_are_balanced_and_nested() -> None:
    labels = np.repeat(np.arange(4), [40, 21, 7, 30])
    order = nested_balanced_order(labels, seed=5)
    np.testing.assert_array_equal(np.sort(order), np.arange(len(labels)))  # a permutation
    for n in range(1, 4 * 7 + 1):  # while no class has run out: counts differ by <= 1
        counts = np.bincount(labels[order[:n]], minlength=4)
        assert counts.max() - counts.min() <= 1, (n, counts)
    # past the smallest class, the others stay balanced among themselves
    counts = np.bincount(labels[order[:61]], minlength=4)
    assert counts.tolist() == [18, 18, 7, 18]
    np.testing.assert_array_equal(order, nested_balanced_order(labels, seed=5))
    assert not np.array_equal(order, nested_balanced_order(labels, seed=6))
    # within a class the order is shuffled, not the original index order
    assert not np.array_equal(order[labels[order] == 0], np.flatnonzero(labels == 0))
