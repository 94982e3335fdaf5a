"""Seeded, class-stratified splitting of one pool into roles (public / private / test).

Each class is shuffled with a numpy Generator and cut by the role fractions
(largest remainder), so every role gets its share of every class, and every
role with a positive fraction gets at least one example of each class when the
class is large enough.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from dpsynth.errors import InputError


def class_counts(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Split `n` examples of one class into per-role counts summing to `n`.

    Largest-remainder rounding of `n * fraction`; then, while some role with a
    positive fraction has none, it takes one from the role that has the most
    (possible when `n` >= the number of such roles).

    Args:
        n: the class's example count.
        fractions: role -> weight (normalised here; ties go to the earlier role).

    Returns:
        role -> count, in the order of `fractions`.
    """
    roles = list(fractions)
    total = sum(fractions.values())
    exact = [n * fractions[r] / total for r in roles]
    counts = [int(np.floor(e)) for e in exact]
    by_remainder = sorted(range(len(roles)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:n - sum(counts)]:
        counts[i] += 1
    wanting = [i for i in range(len(roles)) if fractions[roles[i]] > 0]
    # Give an empty role one example, preferring the roles with the largest weight.
    for i in sorted(wanting, key=lambda i: (-fractions[roles[i]], i)):
        if counts[i] == 0:
            donor = max(range(len(roles)), key=lambda j: (counts[j], -j))
            if counts[donor] <= 1:
                break  # every role that has examples has exactly one: nothing to give
            counts[donor] -= 1
            counts[i] += 1
    return dict(zip(roles, counts))


def stratified_split(labels: np.ndarray, fractions: Mapping[str, float],
                     seed: int) -> dict[str, np.ndarray]:
    """Partition example indices into roles, stratified by class.

    Args:
        labels: int, shape (N,).
        fractions: role -> fraction of each class; non-negative, normalised to sum 1.
        seed: seeds `numpy.random.default_rng`; same seed and labels, same split.

    Returns:
        role -> sorted int64 indices into `labels`; the roles partition range(N).

    Raises:
        InputError: a negative fraction, or no positive one.
    """
    if not fractions or any(v < 0 for v in fractions.values()) or sum(fractions.values()) <= 0:
        raise InputError(f"fractions={dict(fractions)}: need non-negative values with a "
                         "positive sum; fix data.fractions")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {role: [] for role in fractions}
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for role, count in class_counts(len(members), fractions).items():
            parts[role].append(members[start:start + count])
            start += count
    return {role: np.sort(np.concatenate(chunks)).astype(np.int64) if chunks
            else np.zeros(0, np.int64) for role, chunks in parts.items()}


def nested_balanced_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded order of all examples whose every prefix is class-balanced.

    Round r holds the r-th example (in a seeded shuffle) of every class that has
    one, the classes of a round in random order. So `order[:n]` is a subset of
    `order[:m]` for n <= m (nested), and its class counts differ by at most one
    while no class runs out (paper Fig. 3: accuracy vs number of samples).

    Args:
        labels: int, shape (N,).
        seed: seeds `numpy.random.default_rng`.

    Returns:
        int64 permutation of range(N).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    rounds = np.zeros(len(labels), np.int64)
    order = np.zeros(len(labels), np.int64)
    start = 0
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        order[start:start + len(members)] = members
        rounds[start:start + len(members)] = np.arange(len(members))
        start += len(members)
    tiebreak = rng.random(len(labels))  # the classes' order within a round
    return order[np.lexsort((tiebreak, rounds))].astype(np.int64)
