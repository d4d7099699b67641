"""Dataset names, where their files live, their statistics, and what a loader reports (:class:`DatasetInfo`)."""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from snncompress.errors import UserError

DATA_ENV = "SNNCOMPRESS_DATA"
CACHE_ENV = "SNNCOMPRESS_CACHE"
IMAGEFOLDER_PREFIX = "imagefolder:"

MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a loaded dataset.

    ``in_shape`` is ``(C, H, W)`` of one image in pixels; ``mean``/``std`` are
    per-channel on the 0..1 pixel scale; ``train_size``/``test_size`` count
    the images actually loaded (after any subset).
    """

    name: str
    in_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int
    test_size: int


DATASET_NAMES: tuple[str, ...] = (
    "mnist",
    "fashion-mnist",
    "cifar10",
    "cifar100",
    "cifar10-jpg",
    "tiny-imagenet",
    "imagenet",
    "mnist-builtin",
    IMAGEFOLDER_PREFIX + "<path>",
)

#: What every in-memory reader returns: (train_images, train_labels, test_images, test_labels) as
#: numpy arrays, uint8 [N, C, H, W] images and integer [N] labels.
Splits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


# ---------------------------------------------------------------------------
# Names and directories
# ---------------------------------------------------------------------------


def canonical_name(name: str) -> str:
    """Return the canonical dataset name (lower case, '-' for '_'); paths keep their case.

    Raises :class:`UserError` for an unknown name.
    """
    stripped = name.strip()
    if stripped.lower().startswith(IMAGEFOLDER_PREFIX):
        path = stripped[len(IMAGEFOLDER_PREFIX):]
        if not path:
            raise UserError(f"dataset {name!r} has no path: expected 'imagefolder:<path>'")
        return IMAGEFOLDER_PREFIX + path
    key = stripped.lower().replace("_", "-")
    if key not in DATASET_NAMES:
        raise UserError(f"unknown dataset {name!r}: expected one of {', '.join(DATASET_NAMES)}")
    return key


def resolve_data_dir(data_dir: str | None) -> pathlib.Path | None:
    """Return the data directory: the argument, else ``$SNNCOMPRESS_DATA``, else ``None``.

    Raises :class:`UserError` when the chosen path is not an existing directory.
    """
    source = "data_dir"
    if not data_dir:
        data_dir, source = os.environ.get(DATA_ENV) or None, DATA_ENV
    if data_dir is None:
        return None
    path = pathlib.Path(data_dir).expanduser()
    if not path.is_dir():
        raise UserError(f"data directory {str(path)!r} (from {source}) does not exist or is not a directory")
    return path


def cache_dir() -> pathlib.Path:
    """Return the cache root: ``$SNNCOMPRESS_CACHE``, else ``~/.cache/snncompress``."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return pathlib.Path(configured).expanduser()
    return pathlib.Path.home() / ".cache" / "snncompress"


def _require_data_dir(name: str, data_dir: str | None) -> pathlib.Path:
    try:
        root = resolve_data_dir(data_dir)
    except UserError as exc:
        raise UserError(f"dataset {name!r}: {exc}") from exc
    if root is None:
        raise UserError(f"dataset {name!r} needs a data directory: pass data_dir or set {DATA_ENV}")
    return root


def _first_dir_with(candidates: Sequence[pathlib.Path], required: Sequence[str]) -> pathlib.Path | None:
    """Return the first candidate directory holding every name in ``required``."""
    for candidate in candidates:
        if all((candidate / item).exists() for item in required):
            return candidate
    return None


def _describe(candidates: Sequence[pathlib.Path]) -> str:
    return ", ".join(repr(str(c)) for c in candidates)
