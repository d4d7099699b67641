"""Build the MNIST subset shipped with the package (dataset name ``mnist-builtin``).

Reads the four original MNIST idx ``.gz`` files from the data directory
(``--data-dir``, else ``$SNNCOMPRESS_DATA``; e.g. ``../shared/data``) and
writes ``src/snncompress/data_builtin/mnist_subset.npz`` with
``np.savez_compressed``:

* ``train_images`` uint8 [12000, 28, 28], ``train_labels`` uint8 [12000]:
  1200 per digit, from MNIST train;
* ``test_images`` uint8 [2000, 28, 28], ``test_labels`` uint8 [2000]:
  200 per digit, from MNIST t10k.

Selection: :func:`snncompress.data.balanced_subset` with seed 0 (each digit's
images in a seeded random order, digits taking turns), kept in the original
MNIST order. Run with the package importable (installed, or ``PYTHONPATH=src``):

    PYTHONPATH=src python scripts/make_builtin_subset.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib

import numpy as np

from snncompress.data import balanced_subset, read_mnist

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "src" / "snncompress" / "data_builtin" / "mnist_subset.npz"


def build_subset(data_dir: str | None, train_size: int, test_size: int, seed: int) -> dict[str, np.ndarray]:
    """Return the subset arrays: uint8 images [N, 28, 28] and uint8 labels [N] per split."""
    train_images, train_labels, test_images, test_labels = read_mnist(data_dir)
    train_keep = balanced_subset(train_labels, train_size, seed)
    test_keep = balanced_subset(test_labels, test_size, seed)
    return {
        "train_images": train_images[train_keep, 0],
        "train_labels": train_labels[train_keep].astype(np.uint8),
        "test_images": test_images[test_keep, 0],
        "test_labels": test_labels[test_keep].astype(np.uint8),
    }


def content_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the arrays' bytes in key order (the .npz file itself embeds timestamps)."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(key.encode() + np.ascontiguousarray(arrays[key]).tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="folder holding mnist/MNIST/raw (default: $SNNCOMPRESS_DATA)")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="output .npz path")
    parser.add_argument("--train-size", type=int, default=12000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    arrays = build_subset(args.data_dir, args.train_size, args.test_size, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    for key, array in arrays.items():
        print(f"{key}: {array.dtype} {list(array.shape)}")
    print(f"train per class: {np.bincount(arrays['train_labels']).tolist()}")
    print(f"test per class: {np.bincount(arrays['test_labels']).tolist()}")
    print(f"content sha256: {content_digest(arrays)}")
    print(f"wrote {args.out.name}: {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
