"""The public entry point :func:`load_data`: the table of in-memory datasets and the argument checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from snncompress.errors import UserError

from .folder_loader import _load_folder_dataset
from .idx import read_fashion_mnist, read_mnist
from .jpeg_cache import _read_cifar10_jpg
from .readers import _read_builtin, _read_torchvision_cifar
from .registry import (CIFAR10_STATS, CIFAR100_STATS, FASHION_MNIST_STATS, MNIST_STATS, DatasetInfo, Splits,
                       canonical_name)
from .sampling import balanced_subset
from .tensor_loader import CROP_PADDING, TensorBatchLoader

#: ``augment`` values besides True/False: random crop + horizontal flip on any in-memory dataset.
CROP_FLIP = "crop_flip"


@dataclass(frozen=True)
class _TensorSpec:
    in_shape: tuple[int, int, int]
    num_classes: int
    stats: tuple[tuple[float, ...], tuple[float, ...]]
    reader: Callable[[str | None], Splits]
    crop_flip: bool  # CIFAR-style augmentation applies


_TENSOR_DATASETS: dict[str, _TensorSpec] = {
    "mnist": _TensorSpec((1, 28, 28), 10, MNIST_STATS, read_mnist, False),
    "fashion-mnist": _TensorSpec((1, 28, 28), 10, FASHION_MNIST_STATS, read_fashion_mnist, False),
    "cifar10": _TensorSpec((3, 32, 32), 10, CIFAR10_STATS, lambda d: _read_torchvision_cifar("cifar10", d), True),
    "cifar100": _TensorSpec((3, 32, 32), 100, CIFAR100_STATS, lambda d: _read_torchvision_cifar("cifar100", d), True),
    "cifar10-jpg": _TensorSpec((3, 32, 32), 10, CIFAR10_STATS, _read_cifar10_jpg, True),
    "mnist-builtin": _TensorSpec((1, 28, 28), 10, MNIST_STATS, _read_builtin, False),
}


def normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per channel (0..1 pixel scale) with which the in-memory dataset ``name`` is
    normalised; a UserError for datasets decoded from image folders (their images are resized)."""
    canonical = canonical_name(name)
    if canonical not in _TENSOR_DATASETS:
        raise UserError(f"dataset {name!r} is decoded and resized from image files; the C export needs a "
                        f"dataset stored as raw pixels ({', '.join(_TENSOR_DATASETS)})")
    return _TENSOR_DATASETS[canonical].stats


def _subset(images: np.ndarray, labels: np.ndarray, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if n is not None and n < len(labels):
        keep = balanced_subset(labels, n)
        images, labels = images[keep], labels[keep]
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64))


def _load_tensor_dataset(
    name: str, data_dir: str | None, batch_sizes: tuple[int, int], train_subset: int | None,
    test_subset: int | None, augment: bool | str, seed: int, crop_padding: int,
) -> tuple[TensorBatchLoader, TensorBatchLoader, DatasetInfo]:
    spec = _TENSOR_DATASETS[name]
    train_images, train_labels, test_images, test_labels = spec.reader(data_dir)
    for images in (train_images, test_images):
        if images.dtype != np.uint8 or tuple(images.shape[1:]) != spec.in_shape:
            raise UserError(f"{name} images have shape {images.shape[1:]}, expected {spec.in_shape}")
    train_x, train_y = _subset(train_images, train_labels, train_subset)
    test_x, test_y = _subset(test_images, test_labels, test_subset)
    mean, std = spec.stats
    crop_flip = augment == CROP_FLIP or (augment is True and spec.crop_flip)
    train = TensorBatchLoader(train_x, train_y, mean, std, batch_sizes[0], shuffle=True,
                              augment=crop_flip, seed=seed, crop_padding=crop_padding)
    test = TensorBatchLoader(test_x, test_y, mean, std, batch_sizes[1], shuffle=False, augment=False, seed=seed)
    info = DatasetInfo(name, spec.in_shape, spec.num_classes, mean, std, len(train_y), len(test_y))
    return train, test, info


def _check_arguments(
    batch_sizes: tuple[int, int], train_subset: int | None, test_subset: int | None, num_workers: int,
    augment: bool | str, crop_padding: int,
) -> None:
    if not isinstance(augment, bool) and augment != CROP_FLIP:
        raise UserError(f"augment must be true, false or {CROP_FLIP!r}, got {augment!r}")
    if crop_padding < 0:
        raise UserError(f"crop_padding must be >= 0, got {crop_padding}")
    for label, value in zip(("batch_size", "test_batch_size"), batch_sizes, strict=True):
        if value < 1:
            raise UserError(f"{label} must be a positive integer, got {value}")
    for label, value in (("train_subset", train_subset), ("test_subset", test_subset)):
        if value is not None and value < 1:
            raise UserError(f"{label} must be a positive integer or None, got {value}")
    if num_workers < 0:
        raise UserError(f"num_workers must be >= 0, got {num_workers}")


def load_data(
    name: str,
    data_dir: str | None = None,
    batch_size: int = 128,
    *,
    train_subset: int | None = None,
    test_subset: int | None = None,
    augment: bool | str = True,
    seed: int = 0,
    num_workers: int = 0,
    test_batch_size: int | None = None,
    crop_padding: int = CROP_PADDING,
) -> tuple[Iterable, Iterable, DatasetInfo]:
    """Load dataset ``name`` and return ``(train_loader, test_loader, info)``.

    ``name``: one of :data:`DATASET_NAMES` (case-insensitive; ``_`` works as
    ``-``) or ``imagefolder:<path>`` with ``<path>/train/<class>/*`` and
    ``<path>/test`` (or ``val``) alike; a relative path is tried as given and
    then under the data directory. ``data_dir``: root of the data (else
    ``$SNNCOMPRESS_DATA``); ``mnist-builtin`` needs none.

    Loaders yield ``(float32 [B, C, H, W] normalised, int64 [B])`` with
    ``B <= batch_size``. ``train_subset``/``test_subset`` keep at most that
    many images, chosen class-balanced with the fixed :data:`SUBSET_SEED`
    (independent of ``seed``). ``augment``: ``True`` is each dataset's default:
    random crop (``crop_padding`` zero pixels, default 4) + horizontal flip on
    CIFAR-style RGB data and ImageFolder trees (ImageNet: random-resized crop +
    flip), none on MNIST-style data; ``"crop_flip"`` applies the random crop +
    flip to any in-memory dataset (MNIST-style included: e.g. ``crop_padding=2``
    on 28x28 Fashion-MNIST); ``False``: none.
    ``seed``: shuffling and augmentation seed. ``num_workers``: DataLoader
    workers for ImageFolder trees; in-memory datasets ignore it.
    ``test_batch_size``: batch size of the test loader (default ``batch_size``).

    Raises :class:`UserError` for an unknown name, a missing or malformed data
    directory or files, and invalid sizes.
    """
    canonical = canonical_name(name)
    sizes = (batch_size, test_batch_size or batch_size)
    _check_arguments(sizes, train_subset, test_subset, num_workers, augment, crop_padding)
    if canonical in _TENSOR_DATASETS:
        return _load_tensor_dataset(canonical, data_dir, sizes, train_subset, test_subset, augment, seed,
                                    crop_padding)
    if augment == CROP_FLIP or crop_padding != CROP_PADDING:
        raise UserError(f"augment: {CROP_FLIP!r} and crop_padding apply to in-memory datasets "
                        f"({', '.join(_TENSOR_DATASETS)}); {name!r} keeps its own augmentation (augment: true/false)")
    return _load_folder_dataset(canonical, data_dir, sizes, train_subset, test_subset, bool(augment), seed,
                                num_workers)


def image_count(loader) -> int:
    """Images a loader holds (in memory or as files)."""
    labels = getattr(loader, "labels", None)
    return len(labels) if labels is not None else len(loader.dataset)
