"""Deterministic subsets, orderings and seeds (numpy / torch generators)."""

from __future__ import annotations

import numpy as np
import torch

SUBSET_SEED = 0
"""Seed of the class-balanced subset selection; fixed so every training seed sees the same subset."""


def class_interleaved_order(labels: np.ndarray) -> np.ndarray:
    """Return an index order that cycles through the classes: 1st of each class, 2nd of each, ...

    ``labels``: int ``[N]``. Within a class the existing order is kept, so any
    prefix of the result is as class-balanced as the data allows.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        return np.zeros(0, dtype=np.int64)
    by_class = np.argsort(labels, kind="stable")
    sorted_labels = labels[by_class]
    class_start = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.empty_like(labels)
    rank[by_class] = np.arange(labels.size) - class_start
    return np.argsort(rank * (int(labels.max()) + 1) + labels, kind="stable")


def balanced_subset(labels: np.ndarray, n: int, seed: int = SUBSET_SEED) -> np.ndarray:
    """Return ascending indices of ``min(n, N)`` items, as class-balanced as possible.

    Each class's items are drawn in a seeded random order; classes take turns.
    ``labels``: int ``[N]``. The result is int64 ``[min(n, N)]``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    shuffled = np.random.default_rng(seed).permutation(labels.size)
    chosen = shuffled[class_interleaved_order(labels[shuffled])[:n]]
    return np.sort(chosen)


def _mix_seed(*parts: int) -> int:
    """Combine integers into one well-mixed 63-bit seed."""
    words = [int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]
    state = np.random.SeedSequence(words).generate_state(1, np.uint64)[0]
    return int(state) & 0x7FFFFFFFFFFFFFFF


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(_mix_seed(seed, epoch))
