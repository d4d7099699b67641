"""Readers of the other in-memory datasets: the CIFAR python batches and the built-in MNIST subset."""

from __future__ import annotations

import importlib.resources

import numpy as np

from snncompress.errors import UserError

from .registry import Splits, _describe, _first_dir_with, _require_data_dir


def _read_torchvision_cifar(name: str, data_dir: str | None) -> Splits:
    """Read the official CIFAR python batches through torchvision (which unpickles and md5-checks them)."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    root = _require_data_dir(name, data_dir)
    candidates = [root, root / name]
    found = _first_dir_with(candidates, [cls.base_folder])
    if found is None:
        raise UserError(
            f"dataset {name!r}: no {cls.base_folder}/ folder in any of {_describe(candidates)}"
            + (" (for the JPEG copy use dataset 'cifar10-jpg')" if name == "cifar10" else "")
        )
    try:
        train = cls(root=str(found), train=True, download=False)
        test = cls(root=str(found), train=False, download=False)
    except RuntimeError as exc:
        raise UserError(f"{name} files in {str(found)!r} are incomplete or corrupted: {exc}") from exc
    as_nchw = lambda data: np.ascontiguousarray(data.transpose(0, 3, 1, 2))  # noqa: E731
    return as_nchw(train.data), np.asarray(train.targets), as_nchw(test.data), np.asarray(test.targets)


def _read_builtin(data_dir: str | None) -> Splits:
    """Read the MNIST subset shipped in the package (``data_builtin/mnist_subset.npz``)."""
    del data_dir  # not needed
    resource = importlib.resources.files("snncompress") / "data_builtin" / "mnist_subset.npz"
    try:
        with importlib.resources.as_file(resource) as path, np.load(path, allow_pickle=False) as archive:
            arrays = [archive[key] for key in ("train_images", "train_labels", "test_images", "test_labels")]
    except (OSError, KeyError) as exc:
        raise UserError(f"built-in MNIST subset is missing or damaged in this installation: {exc}") from exc
    train_images, train_labels, test_images, test_labels = arrays
    return train_images[:, None], train_labels, test_images[:, None], test_labels
