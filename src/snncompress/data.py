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
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import io
import json
import math
import os
import pathlib
import re
import tarfile
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from snncompress.errors import UserError
from snncompress.io import atomic_write, write_bytes

DATA_ENV = "SNNCOMPRESS_DATA"
CACHE_ENV = "SNNCOMPRESS_CACHE"
IMAGEFOLDER_PREFIX = "imagefolder:"
SUBSET_SEED = 0
"""Seed of the class-balanced subset selection; fixed so every training seed sees the same subset."""
VALIDATION_SALT = 0x5EED0F7A1
"""Mixed with the recipe seed to draw the validation slice (a stream apart from the shuffling seeds)."""

CROP_PADDING = 4
"""Zero padding (pixels) of the random-crop augmentation on 32x32-style RGB data."""

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


# ---------------------------------------------------------------------------
# Subsets and orderings (numpy, deterministic)
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# In-memory loader
# ---------------------------------------------------------------------------


def random_crop_flip(pixels: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Randomly crop (after zero padding) and horizontally flip each image of a batch.

    ``pixels``: uint8 ``[B, C, H, W]``, 0..255. ``padding``: pixels of zeros
    added on every side before cropping back to ``H x W``; each image is
    flipped with probability 1/2. Returns uint8 ``[B, C, H, W]`` on ``pixels``'s device.
    The random draws come from the CPU ``generator`` whatever the device, so a GPU
    run sees the same crops and flips as a CPU run.
    """
    batch, channels, height, width = pixels.shape
    device = pixels.device
    padded = F.pad(pixels, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (batch, 1), generator=generator).to(device, non_blocking=True)
    left = torch.randint(0, 2 * padding + 1, (batch, 1), generator=generator).to(device, non_blocking=True)
    flip = (torch.rand(batch, 1, generator=generator) < 0.5).to(device, non_blocking=True)
    columns = torch.arange(width, device=device).expand(batch, width)
    columns = torch.where(flip, width - 1 - columns, columns) + left  # [B, W]
    rows = torch.arange(height, device=device) + top  # [B, H]
    row_index = rows[:, None, :, None].expand(batch, channels, height, padded.shape[3])
    picked_rows = torch.gather(padded, 2, row_index)  # [B, C, H, W + 2p]
    column_index = columns[:, None, None, :].expand(batch, channels, height, width)
    return torch.gather(picked_rows, 3, column_index)


class TensorBatchLoader:
    """Re-iterable batches over images held in memory.

    ``images``: uint8 ``[N, C, H, W]``, pixel values 0..255; ``labels``: int64
    ``[N]``. Each iteration is one epoch and yields ``(float32 [B, C, H, W]
    normalised as (pixel/255 - mean)/std, int64 [B])``; the last batch may be
    smaller. With ``shuffle`` the order (and the crop/flip augmentation when
    ``augment``) comes from a generator seeded by ``(seed, epoch)``; the epoch
    counter starts at 0 and advances at every ``iter()``; :meth:`set_epoch`
    moves it (e.g. when resuming). :meth:`to` moves the uint8 images onto a GPU:
    batches are then cut, augmented and normalised there (the random draws stay
    on the CPU generator, so the batches equal the CPU loader's).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        *,
        shuffle: bool,
        augment: bool,
        seed: int = 0,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.mean, self.std = tuple(mean), tuple(std)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -mean_t / std_t

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration produce epoch ``epoch``'s order and augmentation."""
        self.epoch = epoch

    def to(self, device) -> "TensorBatchLoader":
        """Hold the images (uint8), labels and normalisation on ``device``; returns self."""
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        self._scale, self._shift = self._scale.to(device), self._shift.to(device)
        return self

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """Map uint8 ``[B, C, H, W]`` pixels to float32 ``(pixel/255 - mean)/std``."""
        return pixels.to(torch.float32).mul_(self._scale).add_(self._shift)

    def first_images(self, n: int) -> torch.Tensor:
        """Return the first ``min(n, N)`` images in storage order, normalised, never augmented."""
        return self.normalise(self.images[:n])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = _epoch_generator(self.seed, self.epoch)
        self.epoch += 1
        count = len(self.labels)
        order = torch.randperm(count, generator=generator) if self.shuffle else None
        if order is not None:
            order = order.to(self.images.device, non_blocking=True)
        for start in range(0, count, self.batch_size):
            stop = min(start + self.batch_size, count)
            index = order[start:stop] if order is not None else slice(start, stop)
            pixels = self.images[index]
            if self.augment:
                pixels = random_crop_flip(pixels, CROP_PADDING, generator)
            yield self.normalise(pixels), self.labels[index]


# ---------------------------------------------------------------------------
# Readers for the in-memory datasets. Each returns
# (train_images, train_labels, test_images, test_labels) as numpy arrays:
# uint8 [N, C, H, W] images and integer [N] labels.
# ---------------------------------------------------------------------------

Splits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


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


# --- CIFAR-10 JPEG copy: decode once into a .npy cache -----------------------

CIFAR10_JPG_TAR = "cifar10-jpg-q75.tar"
_CACHE_FILES = ("train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy")
_CACHE_DONE = "meta.json"
_JPEG_MEMBER = re.compile(r"(?:.*/)?(train|test)/([^/]+)/([^/]+\.(?:jpe?g|png))", re.IGNORECASE)


def _find_cifar10_jpg(root: pathlib.Path) -> pathlib.Path:
    """Return the CIFAR-10 JPEG tar or the root of its extracted ``train/``+``test/`` tree."""
    tar_candidates = [root / "cifar10-jpg" / CIFAR10_JPG_TAR, root / CIFAR10_JPG_TAR]
    for candidate in tar_candidates:
        if candidate.is_file():
            return candidate
    tree_candidates = [root / "cifar10-jpg" / "cifar10-jpg-q75", root / "cifar10-jpg", root]
    found = _first_dir_with(tree_candidates, ["train", "test"])
    if found is None:
        raise UserError(
            f"dataset 'cifar10-jpg': no {CIFAR10_JPG_TAR} or extracted train/ + test/ tree in any of "
            f"{_describe(tar_candidates + tree_candidates)}"
        )
    return found


def _source_fingerprint(source: pathlib.Path) -> str:
    """Return a short hash of the source's name, sizes and modification times (a cache key)."""
    digest = hashlib.sha256()
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(source.parent)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _jpeg_entries_from_tar(tar_path: pathlib.Path) -> list[tuple[str, str, str, bytes]]:
    """Return ``(split, class, filename, jpeg bytes)`` for every image in the tar (nothing extracted to disk)."""
    entries = []
    try:
        with tarfile.open(tar_path, "r:*") as archive:
            for member in archive:
                match = _JPEG_MEMBER.fullmatch(member.name) if member.isfile() else None
                if match:
                    entries.append((*match.groups(), archive.extractfile(member).read()))
    except (OSError, tarfile.TarError) as exc:
        raise UserError(f"cannot read {str(tar_path)!r} as a tar archive: {exc}") from exc
    return entries


def _jpeg_entries_from_tree(root: pathlib.Path) -> list[tuple[str, str, str, bytes]]:
    entries = []
    for split in ("train", "test"):
        for path in sorted((root / split).glob("*/*")):
            if path.is_file() and _JPEG_MEMBER.fullmatch(f"{split}/{path.parent.name}/{path.name}"):
                entries.append((split, path.parent.name, path.name, path.read_bytes()))
    return entries


def _decode_small_image(data: bytes, where: str, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """Decode one encoded image into uint8 ``[3, H, W]``; it must be ``size`` = (W, H) pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.size != size:
                raise UserError(f"{where} is {image.size[0]}x{image.size[1]} pixels, expected {size[0]}x{size[1]}")
            return np.asarray(image.convert("RGB")).transpose(2, 0, 1)
    except OSError as exc:
        raise UserError(f"cannot decode image {where}: {exc}") from exc


def _decode_entries(entries: list[tuple[str, str, str, bytes]], source: pathlib.Path) -> tuple[Splits, list[str]]:
    """Decode the images; classes are numbered in sorted name order (as ImageFolder does).

    Each split comes out class-interleaved: file 1 of every class, file 2 of
    every class, ... (files in name order within a class).
    """
    classes = sorted({cls for _, cls, _, _ in entries})
    class_index = {cls: i for i, cls in enumerate(classes)}
    arrays: list[np.ndarray] = []
    for split in ("train", "test"):
        chosen = sorted((class_index[c], f, data) for s, c, f, data in entries if s == split)
        if not chosen:
            raise UserError(f"no {split}/<class>/*.jpg images in {str(source)!r}")
        labels = np.array([label for label, _, _ in chosen], dtype=np.int64)
        order = class_interleaved_order(labels)
        images = np.stack([
            _decode_small_image(chosen[i][2], f"{split}/{classes[labels[i]]}/{chosen[i][1]}") for i in order
        ])
        arrays += [images, labels[order]]
    return tuple(arrays), classes  # type: ignore[return-value]


def _write_cache(folder: pathlib.Path, splits: Splits, meta: dict) -> None:
    """Write the decoded arrays, then the marker saying the cache is complete (each file atomically)."""
    try:
        for filename, array in zip(_CACHE_FILES, splits, strict=True):
            atomic_write(folder / filename, functools.partial(_save_npy, array=array), every_rank=True)
        write_bytes(folder / _CACHE_DONE, json.dumps(meta, indent=1).encode(), every_rank=True)
    except UserError as exc:
        raise UserError(f"{exc}; or set {CACHE_ENV} to a writable folder") from None


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as stream:
        np.save(stream, array, allow_pickle=False)


def _read_cache(folder: pathlib.Path) -> Splits | None:
    if not (folder / _CACHE_DONE).is_file():
        return None
    try:
        arrays = [np.load(folder / filename, allow_pickle=False) for filename in _CACHE_FILES]
    except (OSError, ValueError):
        return None  # damaged cache: decode again
    return tuple(arrays)  # type: ignore[return-value]


def _read_cifar10_jpg(data_dir: str | None) -> Splits:
    """Load the CIFAR-10 JPEG q75 copy, decoding it into the cache on first use."""
    source = _find_cifar10_jpg(_require_data_dir("cifar10-jpg", data_dir))
    folder = cache_dir() / "cifar10-jpg" / _source_fingerprint(source)
    cached = _read_cache(folder)
    if cached is not None:
        return cached
    entries = _jpeg_entries_from_tar(source) if source.is_file() else _jpeg_entries_from_tree(source)
    splits, classes = _decode_entries(entries, source)
    if len(classes) != 10:
        raise UserError(
            f"dataset 'cifar10-jpg': {str(source)!r} has {len(classes)} classes, expected the 10 CIFAR-10 classes"
        )
    _write_cache(folder, splits, {"source": source.name, "classes": classes, "order": "class-interleaved"})
    return splits


# ---------------------------------------------------------------------------
# Dataset table
# ---------------------------------------------------------------------------


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


def _subset(images: np.ndarray, labels: np.ndarray, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if n is not None and n < len(labels):
        keep = balanced_subset(labels, n)
        images, labels = images[keep], labels[keep]
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64))


def _load_tensor_dataset(
    name: str, data_dir: str | None, batch_sizes: tuple[int, int], train_subset: int | None,
    test_subset: int | None, augment: bool, seed: int,
) -> tuple[TensorBatchLoader, TensorBatchLoader, DatasetInfo]:
    spec = _TENSOR_DATASETS[name]
    train_images, train_labels, test_images, test_labels = spec.reader(data_dir)
    for images in (train_images, test_images):
        if images.dtype != np.uint8 or tuple(images.shape[1:]) != spec.in_shape:
            raise UserError(f"{name} images have shape {images.shape[1:]}, expected {spec.in_shape}")
    train_x, train_y = _subset(train_images, train_labels, train_subset)
    test_x, test_y = _subset(test_images, test_labels, test_subset)
    mean, std = spec.stats
    train = TensorBatchLoader(train_x, train_y, mean, std, batch_sizes[0], shuffle=True,
                              augment=augment and spec.crop_flip, seed=seed)
    test = TensorBatchLoader(test_x, test_y, mean, std, batch_sizes[1], shuffle=False, augment=False, seed=seed)
    info = DatasetInfo(name, spec.in_shape, spec.num_classes, mean, std, len(train_y), len(test_y))
    return train, test, info


# ---------------------------------------------------------------------------
# ImageFolder datasets (decoded per item)
# ---------------------------------------------------------------------------


class SeededImageDataset(torch.utils.data.Dataset):
    """``(path, label)`` samples decoded with PIL and passed through ``transform``.

    Random transforms draw from torch's global generator re-seeded per item
    from ``(epoch_seed, index)`` (inside ``fork_rng``, so the caller's global
    state is untouched); augmentation is thus reproducible whatever
    ``num_workers`` is. Items are ``(float32 [C, H, W], int label)``.
    """

    def __init__(self, samples: list[tuple[str, int]], transform: Callable) -> None:
        self.samples = samples
        self.transform = transform
        self.epoch_seed = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from torchvision.datasets.folder import default_loader

        path, label = self.samples[index]
        image = default_loader(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix_seed(self.epoch_seed, index))
            return self.transform(image), label


class FolderBatchLoader:
    """Re-iterable batches from a :class:`SeededImageDataset` through a torch ``DataLoader``.

    Yields ``(float32 [B, C, H, W] normalised, int64 [B])``. With ``shuffle``
    the order and augmentation come from ``(seed, epoch)``; the epoch counter
    advances at every ``iter()`` (see :meth:`set_epoch`).
    """

    def __init__(self, dataset: SeededImageDataset, batch_size: int, *, shuffle: bool, seed: int,
                 num_workers: int, eval_transform: Callable) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.eval_transform = eval_transform
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration produce epoch ``epoch``'s order and augmentation."""
        self.epoch = epoch

    def first_images(self, n: int) -> torch.Tensor:
        """Return the first ``min(n, N)`` images (class-interleaved order) with the test-time transform."""
        from torchvision.datasets.folder import default_loader

        samples = self.dataset.samples[:n]
        return torch.stack([self.eval_transform(default_loader(path)) for path, _ in samples])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = _epoch_generator(self.seed, self.epoch)
        self.epoch += 1
        self.dataset.epoch_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=self.shuffle,
            generator=generator, num_workers=self.num_workers,
        )
        for images, labels in loader:
            yield images, labels.to(torch.int64)


def _folder_samples(root: pathlib.Path, classes: list[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """List ``root/<class>/**/image`` files as ``(path, label)``, labels by sorted class name."""
    from torchvision.datasets import ImageFolder

    try:
        folder = ImageFolder(str(root))
    except (FileNotFoundError, OSError) as exc:
        raise UserError(f"{str(root)!r} is not an ImageFolder tree (<class>/<image> files): {exc}") from exc
    if classes is not None and folder.classes != classes:
        raise UserError(
            f"classes in {str(root)!r} differ from the training classes ({len(folder.classes)} vs {len(classes)})"
        )
    return list(folder.samples), folder.classes


def _tiny_imagenet_val(root: pathlib.Path, classes: list[str]) -> list[tuple[str, int]]:
    """Tiny-ImageNet's ``val/images`` + ``val_annotations.txt`` (file<TAB>wnid...) as samples."""
    class_index = {wnid: i for i, wnid in enumerate(classes)}
    samples = []
    for line in (root / "val_annotations.txt").read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 2:
            if fields[1] not in class_index:
                raise UserError(f"val_annotations.txt names class {fields[1]!r}, not among the training classes")
            samples.append((str(root / "images" / fields[0]), class_index[fields[1]]))
    return samples


def _is_annotated_val(folder: pathlib.Path) -> bool:
    """True for Tiny-ImageNet's unsorted ``val/``: ``images/`` plus ``val_annotations.txt``, no class folders."""
    if not (folder / "val_annotations.txt").is_file():
        return False
    return not any(p.is_dir() and p.name != "images" for p in folder.iterdir())


def _split_samples(root: pathlib.Path, test_names: Sequence[str]) -> tuple[list, list, list[str]]:
    """Return train samples, test samples and classes of ``root/train`` + ``root/<test|val>``."""
    train_samples, classes = _folder_samples(root / "train")
    for test_name in test_names:
        test_root = root / test_name
        if _is_annotated_val(test_root):
            return train_samples, _tiny_imagenet_val(test_root, classes), classes
        if test_root.is_dir():
            return train_samples, _folder_samples(test_root, classes)[0], classes
    raise UserError(f"no {' or '.join(test_names)}/ folder next to {str(root / 'train')!r}")


def _first_image_size(samples: list[tuple[str, int]]) -> tuple[int, int]:
    """Return (H, W) of the first sample, in pixels."""
    from PIL import Image

    with Image.open(samples[0][0]) as image:
        return image.size[1], image.size[0]


def _folder_transforms(size: tuple[int, int], imagenet_style: bool, augment: bool, stats) -> tuple[Callable, Callable]:
    """Return (train, test) transforms producing float32 ``[3, H, W]`` normalised images."""
    from torchvision import transforms as T

    normalise = [T.ToTensor(), T.Normalize(*stats)]
    if imagenet_style:
        test = T.Compose([T.Resize(256), T.CenterCrop(224), *normalise])
        train_aug = [T.RandomResizedCrop(224), T.RandomHorizontalFlip()]
        train_plain = [T.Resize(256), T.CenterCrop(224)]
    else:
        test = T.Compose([T.Resize(size), *normalise])
        train_aug = [T.Resize(size), T.RandomCrop(size, padding=CROP_PADDING), T.RandomHorizontalFlip()]
        train_plain = [T.Resize(size)]
    train = T.Compose([_to_rgb, *(train_aug if augment else train_plain), *normalise])
    return train, T.Compose([_to_rgb, test])


def _to_rgb(image):
    """Convert a PIL image to 3-channel RGB (module-level so worker processes can pickle it)."""
    return image.convert("RGB")


_FOLDER_SUBDIRS = {
    "tiny-imagenet": ("tiny-imagenet-200", "tiny-imagenet", "."),
    "imagenet": ("imagenet", "ILSVRC2012", "."),
}


def _locate_folder_dataset(name: str, data_dir: str | None) -> pathlib.Path:
    if name.startswith(IMAGEFOLDER_PREFIX):
        path = pathlib.Path(name[len(IMAGEFOLDER_PREFIX):]).expanduser()
        root = resolve_data_dir(data_dir)
        candidates = [path] + ([root / path] if root is not None and not path.is_absolute() else [])
        subfolders = ["."]
    else:
        root = _require_data_dir(name, data_dir)
        candidates = [root]
        subfolders = _FOLDER_SUBDIRS[name]
    options = [c / sub for c in candidates for sub in subfolders]
    found = _first_dir_with(options, ["train"])
    if found is None:
        raise UserError(f"dataset {name!r}: no train/ folder in any of {_describe(options)}")
    return found


def _load_folder_dataset(
    name: str, data_dir: str | None, batch_sizes: tuple[int, int], train_subset: int | None,
    test_subset: int | None, augment: bool, seed: int, num_workers: int,
) -> tuple[FolderBatchLoader, FolderBatchLoader, DatasetInfo]:
    root = _locate_folder_dataset(name, data_dir)
    train_samples, test_samples, classes = _split_samples(root, ["test", "val"])
    train_samples = _order_samples(train_samples, train_subset)
    test_samples = _order_samples(test_samples, test_subset)
    if name == "tiny-imagenet":
        size, imagenet_style = (64, 64), False
    elif name == "imagenet":
        size, imagenet_style = (224, 224), True
    else:
        size = _first_image_size(train_samples)
        imagenet_style = max(size) > 128
        size = (224, 224) if imagenet_style else size
    train_tf, test_tf = _folder_transforms(size, imagenet_style, augment, IMAGENET_STATS)
    train = FolderBatchLoader(SeededImageDataset(train_samples, train_tf), batch_sizes[0], shuffle=True,
                              seed=seed, num_workers=num_workers, eval_transform=test_tf)
    test = FolderBatchLoader(SeededImageDataset(test_samples, test_tf), batch_sizes[1], shuffle=False,
                             seed=seed, num_workers=num_workers, eval_transform=test_tf)
    info = DatasetInfo(name, (3, *size), len(classes), *IMAGENET_STATS, len(train_samples), len(test_samples))
    return train, test, info


def _order_samples(samples: list[tuple[str, int]], n: int | None) -> list[tuple[str, int]]:
    """Return the (balanced-subset of the) samples in class-interleaved order."""
    if not samples:
        raise UserError("image folder split has no images")
    labels = np.array([label for _, label in samples], dtype=np.int64)
    keep = balanced_subset(labels, n) if n is not None else np.arange(len(samples))
    order = keep[class_interleaved_order(labels[keep])]
    return [samples[i] for i in order]


# ---------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------


def _check_arguments(
    batch_sizes: tuple[int, int], train_subset: int | None, test_subset: int | None, num_workers: int
) -> None:
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
    augment: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    test_batch_size: int | None = None,
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
    (independent of ``seed``). ``augment``: random crop (4-pixel zero pad) +
    horizontal flip on CIFAR-style RGB data and ImageFolder trees (ImageNet:
    random-resized crop + flip); MNIST-style data is never augmented.
    ``seed``: shuffling and augmentation seed. ``num_workers``: DataLoader
    workers for ImageFolder trees; in-memory datasets ignore it.
    ``test_batch_size``: batch size of the test loader (default ``batch_size``).

    Raises :class:`UserError` for an unknown name, a missing or malformed data
    directory or files, and invalid sizes.
    """
    canonical = canonical_name(name)
    sizes = (batch_size, test_batch_size or batch_size)
    _check_arguments(sizes, train_subset, test_subset, num_workers)
    if canonical in _TENSOR_DATASETS:
        return _load_tensor_dataset(canonical, data_dir, sizes, train_subset, test_subset, augment, seed)
    return _load_folder_dataset(canonical, data_dir, sizes, train_subset, test_subset, augment, seed, num_workers)


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

        return (part(np.flatnonzero(keep), batch_size=train.batch_size, shuffle=True, augment=train.augment),
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


def calibration_batch(loader: Iterable, n: int) -> torch.Tensor:
    """Return the first ``n`` training images, float32 ``[n, C, H, W]``, normalised, not augmented.

    "First" means storage order, which is never shuffled: the original file
    order for MNIST/Fashion-MNIST/CIFAR pickles/built-in subset,
    class-interleaved for the CIFAR-10 JPEG copy and ImageFolder trees, so a
    prefix covers all classes. Fewer than ``n`` come back when the split is
    smaller. Loaders that are not from this module are iterated instead (their
    first batches, augmented or not as that loader does).
    """
    if n < 1:
        raise UserError(f"calibration size must be a positive integer, got {n}")
    first_images = getattr(loader, "first_images", None)
    if first_images is not None:
        return first_images(n)
    taken: list[torch.Tensor] = []
    count = 0
    for images, _ in loader:
        taken.append(images[: n - count])
        count += len(taken[-1])
        if count >= n:
            break
    if not taken:
        raise UserError("calibration loader yielded no images")
    return torch.cat(taken)
