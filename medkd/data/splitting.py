"""Deterministic, stratified splitting and subsampling of sample indices."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _groups(strata: np.ndarray | None, n: int) -> list[np.ndarray]:
    if strata is None:
        return [np.arange(n)]
    strata = np.asarray(strata)
    return [np.flatnonzero(strata == value) for value in np.unique(strata)]


def stratified_partition(strata: np.ndarray | None, n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Partition ``range(n)`` into ``len(fractions)`` sorted index arrays.

    Each stratum (e.g. class) is shuffled with ``seed`` and divided by ``fractions`` (largest
    remainder rounding), so every part keeps the class proportions. Parts after the first get
    at least one sample of a stratum when the stratum has enough samples for all parts.

    Args:
        strata: one key per sample (class label), or ``None`` for an unstratified split.
        n: number of samples.
        fractions: share of each part; must sum to 1.
        seed: seed of the shuffle.

    Examples:
        >>> parts = stratified_partition(np.array([0] * 8 + [1] * 2), 10, [0.5, 0.5], seed=0)
        >>> [len(p) for p in parts]
        [5, 5]
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.ndim != 1 or len(fractions) == 0 or np.any(fractions < 0) or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions.tolist()}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for members in _groups(strata, n):
        members = rng.permutation(members)
        counts = _allocate(len(members), fractions)
        start = 0
        for part, count in zip(parts, counts):
            part.append(members[start : start + count])
            start += count
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def _allocate(total: int, fractions: np.ndarray) -> list[int]:
    exact = fractions * total
    counts = np.floor(exact).astype(np.int64)
    for index in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[index] += 1
    # Give every non-empty later part (val, test) at least one sample when possible.
    for index in range(1, len(counts)):
        if counts[index] == 0 and fractions[index] > 0 and counts[0] > 1:
            counts[index] += 1
            counts[0] -= 1
    return counts.tolist()


def stratified_sample(strata: np.ndarray | None, n: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``size`` of ``n`` samples, keeping the strata proportions.

    Examples:
        >>> stratified_sample(np.array([0, 0, 0, 1, 1, 1]), 6, 4, seed=1).shape
        (4,)
    """
    if size >= n:
        return np.arange(n)
    if size <= 0:
        raise ValueError(f"size must be > 0, got {size}")
    keep, _ = stratified_partition(strata, n, [size / n, 1 - size / n], seed)
    # Rounding per stratum can miss the target by a few samples; fix it deterministically.
    rng = np.random.default_rng(seed + 1)
    if len(keep) > size:
        keep = np.sort(rng.choice(keep, size, replace=False))
    elif len(keep) < size:
        rest = np.setdiff1d(np.arange(n), keep)
        keep = np.sort(np.concatenate([keep, rng.choice(rest, size - len(keep), replace=False)]))
    return keep
