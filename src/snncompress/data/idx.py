"""The IDX file format (MNIST, Fashion-MNIST) and the readers of those two datasets."""

from __future__ import annotations

import gzip
import math
import pathlib
from typing import Sequence

import numpy as np

from snncompress.errors import UserError

from .registry import Splits, _describe, _require_data_dir


def read_idx(path: pathlib.Path) -> np.ndarray:
    """Parse an idx file of unsigned bytes (``.gz`` or plain) into a uint8 array of its stored shape."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read idx file {str(path)!r}: {exc}") from exc
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise UserError(f"{str(path)!r} is not an idx file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"idx file {str(path)!r} is truncated inside its header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) != header + math.prod(dims):
        raise UserError(f"idx file {str(path)!r} is truncated: header says shape {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find_idx(folder: pathlib.Path, stem: str) -> pathlib.Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise UserError(f"missing {stem}[.gz] in {str(folder)!r}")


def _read_idx_splits(folder: pathlib.Path) -> Splits:
    """Read the four MNIST-format idx files in ``folder``; images come out as ``[N, 1, 28, 28]``."""
    arrays = [read_idx(_find_idx(folder, stem)) for stem in _IDX_STEMS]
    train_images, train_labels, test_images, test_labels = arrays
    return train_images[:, None], train_labels, test_images[:, None], test_labels


_IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _idx_folder(root: pathlib.Path, name: str, subfolders: Sequence[str]) -> pathlib.Path:
    candidates = [root / sub for sub in subfolders]
    for candidate in candidates:
        if any((candidate / f"{_IDX_STEMS[0]}{ext}").is_file() for ext in (".gz", "")):
            return candidate
    raise UserError(
        f"dataset {name!r}: no idx files (train-images-idx3-ubyte.gz, ...) in any of {_describe(candidates)}"
    )


def read_mnist(data_dir: str | None) -> Splits:
    root = _require_data_dir("mnist", data_dir)
    subfolders = ("mnist/MNIST/raw", "MNIST/raw", "mnist/raw", "mnist", "raw", ".")
    return _read_idx_splits(_idx_folder(root, "mnist", subfolders))


def read_fashion_mnist(data_dir: str | None) -> Splits:
    root = _require_data_dir("fashion-mnist", data_dir)
    subfolders = (
        "fashion-mnist/FashionMNIST/raw",
        "FashionMNIST/raw",
        "fashion-mnist/raw",
        "fashion-mnist",
        "raw",
        ".",
    )
    return _read_idx_splits(_idx_folder(root, "fashion-mnist", subfolders))
