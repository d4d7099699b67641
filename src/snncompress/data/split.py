"""The validation split: a seeded, class-stratified slice of the training set held out of training."""

from __future__ import annotations

import numpy as np
import torch

from snncompress.errors import UserError

from .folder_loader import FolderBatchLoader, SeededImageDataset
from .sampling import _mix_seed
from .tensor_loader import TensorBatchLoader

VALIDATION_SALT = 0x5EED0F7A1
"""Mixed with the recipe seed to draw the validation slice (a stream apart from the shuffling seeds)."""


def validation_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Ascending indices of a seeded, class-stratified ``fraction`` of ``labels`` (int ``[N]``).

    Each class gives ``round(fraction * its count)`` items (at least one when
    ``fraction > 0`` and the class has two or more), drawn in an order seeded
    by ``seed``; the same labels, fraction and seed give the same slice.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if not 0 <= fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(_mix_seed(seed, VALIDATION_SALT))
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(round(fraction * members.size))
        if fraction > 0 and members.size >= 2:
            count = min(max(count, 1), members.size - 1)
        chosen.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def hold_out_validation(train, fraction: float, seed: int, batch_size: int):
    """Split a training loader of this module into ``(train, validation)`` loaders.

    The validation loader holds a seeded, class-stratified ``fraction`` of the
    training images (:func:`validation_indices`), in storage order, never
    shuffled or augmented, ``batch_size`` per batch; the returned training
    loader holds the rest and keeps the original's shuffling, augmentation
    and seed. ``fraction == 0`` gives ``(train, None)``.
    """
    if fraction == 0:
        return train, None
    if isinstance(train, TensorBatchLoader):
        val_index = validation_indices(train.labels.numpy(), fraction, seed)
        keep = np.ones(len(train.labels), dtype=bool)
        keep[val_index] = False

        def part(index, **kw):
            index = torch.from_numpy(index)
            return TensorBatchLoader(train.images[index], train.labels[index], train.mean, train.std,
                                     seed=train.seed, **kw)

        return (part(np.flatnonzero(keep), batch_size=train.batch_size, shuffle=True, augment=train.augment,
                     crop_padding=train.crop_padding),
                part(val_index, batch_size=batch_size, shuffle=False, augment=False))
    if isinstance(train, FolderBatchLoader):
        samples = train.dataset.samples
        val_index = set(validation_indices(np.array([s[1] for s in samples]), fraction, seed).tolist())
        rest = [s for i, s in enumerate(samples) if i not in val_index]
        held = [s for i, s in enumerate(samples) if i in val_index]
        new_train = FolderBatchLoader(SeededImageDataset(rest, train.dataset.transform), train.batch_size,
                                      shuffle=True, seed=train.seed, num_workers=train.num_workers,
                                      eval_transform=train.eval_transform)
        val = FolderBatchLoader(SeededImageDataset(held, train.eval_transform), batch_size, shuffle=False,
                                seed=train.seed, num_workers=train.num_workers,
                                eval_transform=train.eval_transform)
        return new_train, val
    raise TypeError(f"cannot split a validation set off {type(train).__name__}")
