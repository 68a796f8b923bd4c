"""Seeded class-aware sampling of example positions: stratified, class-balanced, long-tailed.

Pure functions of a label array and a numpy Generator; the splits (`hamjax.data.splits`) and
the sources' fixed test sets (`hamjax.data.sources`) both draw with them.
"""

from __future__ import annotations

import math

import numpy as np

from hamjax.errors import ConfigError


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Split `total` across classes in proportion to counts (largest remainder, exact sum)."""
    n = int(counts.sum())
    if total > n:
        raise ValueError(f"cannot take {total} of {n} examples")
    quota = counts * (total / n) if n else counts * 0.0
    take = np.floor(quota).astype(np.int64)
    remainder = quota - take
    order = np.lexsort((np.arange(len(counts)), -remainder))  # biggest remainder, then class id
    for c in order[: total - int(take.sum())]:
        take[c] += 1
    return np.minimum(take, counts)


def stratified_sample(
    labels: np.ndarray, size: int, rng: np.random.Generator, num_classes: int | None = None
) -> np.ndarray:
    """Sorted positions of `size` examples drawn per class, class proportions preserved."""
    num_classes = num_classes or int(labels.max()) + 1
    counts = np.bincount(labels, minlength=num_classes)
    take = _allocate(counts, size)
    chosen = [
        rng.permutation(np.flatnonzero(labels == c))[: take[c]] for c in range(num_classes)
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)


def balanced_sample(
    labels: np.ndarray, per_class: int, rng: np.random.Generator, num_classes: int
) -> np.ndarray:
    """Positions of exactly per_class examples of every class (ConfigError if a class is short)."""
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ConfigError(
                f"data.meta_per_class={per_class} but class {c} has only {len(members)} training "
                f"examples left after the validation split; lower data.meta_per_class"
            )
        chosen.append(rng.permutation(members)[:per_class])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def long_tail_targets(
    counts: np.ndarray, imbalance_factor: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class sizes floor(n_max / IF^(r/(C-1))) for rank r in a seeded class order.

    Returns (targets, class_order): class_order[r] is the class given rank r (the head first).
    A class never grows past what it has, and keeps at least one example.
    """
    num_classes = len(counts)
    order = rng.permutation(num_classes)
    n_max = int(counts.max())
    targets = np.zeros(num_classes, np.int64)
    for rank, c in enumerate(order):
        frac = rank / (num_classes - 1) if num_classes > 1 else 0.0
        targets[c] = math.floor(n_max / imbalance_factor**frac + 1e-9)
    return np.clip(np.minimum(targets, counts), min(1, int(counts.min())), None), order


def long_tail_sample(
    labels: np.ndarray, imbalance_factor: float, rng: np.random.Generator, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions kept by the long-tail transform, and the class order used."""
    counts = np.bincount(labels, minlength=num_classes)
    if imbalance_factor == 1.0:
        return np.arange(len(labels), dtype=np.int64), np.arange(num_classes)
    targets, order = long_tail_targets(counts, imbalance_factor, rng)
    kept = [rng.permutation(np.flatnonzero(labels == c))[: targets[c]] for c in range(num_classes)]
    return np.sort(np.concatenate(kept)).astype(np.int64), order
