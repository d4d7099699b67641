"""Datasets and batch loaders.

Two kinds of loader come out of :func:`load_data`:

* Small datasets (MNIST, Fashion-MNIST, CIFAR-10/100, the CIFAR-10 JPEG copy,
  the built-in MNIST subset) sit in memory as uint8 tensors, shape
  ``[N, C, H, W]``, pixel values 0..255. Batches are cut, augmented and
  normalised with batched tensor ops (:class:`TensorBatchLoader`); there is no
  per-item Python work, which is what makes CPU training fast.
* Large ImageFolder trees (Tiny-ImageNet, ImageNet, ``imagefolder:<path>``) are
  decoded per item by torchvision transforms inside a torch ``DataLoader``
  (:class:`FolderBatchLoader`).

Both yield ``(images, labels)``: images float32 ``[B, C, H, W]`` normalised as
``(pixel / 255 - mean) / std`` per channel, labels int64 ``[B]`` class indices.
Both are re-iterable and have ``len()`` = number of batches per epoch. The
train loader reshuffles every epoch with a ``torch.Generator`` seeded from
``(seed, epoch)``, so the same seed gives the same batches, augmentation
included; the test loader is in a fixed order and never augments.

Where data lives: ``data_dir`` argument, else the ``SNNCOMPRESS_DATA``
environment variable. Decoded caches (the CIFAR-10 JPEG copy) go to
``SNNCOMPRESS_CACHE``, else ``~/.cache/snncompress``.

One module per job: :mod:`.registry` (names, folders, statistics, :class:`DatasetInfo`),
:mod:`.sampling` (subsets, orderings, seeds), :mod:`.tensor_loader` and :mod:`.folder_loader`
(the two loaders), :mod:`.idx`, :mod:`.readers` and :mod:`.jpeg_cache` (the in-memory readers),
:mod:`.load` (:func:`load_data`), :mod:`.split` (the validation split) and :mod:`.calibration`.
This package re-exports their public names.
"""

from __future__ import annotations

from .calibration import calibration_batch
from .folder_loader import FolderBatchLoader, SeededImageDataset
from .idx import read_fashion_mnist, read_idx, read_mnist
from .jpeg_cache import CIFAR10_JPG_TAR
from .load import image_count, load_data, normalisation
from .registry import (CACHE_ENV, CIFAR10_STATS, CIFAR100_STATS, DATA_ENV, DATASET_NAMES, FASHION_MNIST_STATS,
                       IMAGEFOLDER_PREFIX, IMAGENET_STATS, MNIST_STATS, DatasetInfo, Splits, cache_dir,
                       canonical_name, resolve_data_dir)
from .sampling import SUBSET_SEED, balanced_subset, class_interleaved_order
from .split import VALIDATION_SALT, hold_out_validation, validation_indices
from .tensor_loader import CROP_PADDING, TensorBatchLoader, random_crop_flip

__all__ = [
    "image_count", "normalisation",
    "CACHE_ENV", "CIFAR10_JPG_TAR", "CIFAR10_STATS", "CIFAR100_STATS", "CROP_PADDING", "DATA_ENV", "DATASET_NAMES",
    "FASHION_MNIST_STATS", "IMAGEFOLDER_PREFIX", "IMAGENET_STATS", "MNIST_STATS", "SUBSET_SEED", "VALIDATION_SALT",
    "DatasetInfo", "FolderBatchLoader", "SeededImageDataset", "Splits", "TensorBatchLoader", "balanced_subset",
    "cache_dir", "calibration_batch", "canonical_name", "class_interleaved_order", "hold_out_validation",
    "load_data", "random_crop_flip", "read_fashion_mnist", "read_idx", "read_mnist", "resolve_data_dir",
    "validation_indices",
]
