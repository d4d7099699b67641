"""The CIFAR-10 JPEG copy: decoded once into a ``.npy`` cache, read from there afterwards."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import pathlib
import re
import tarfile

import numpy as np

from snncompress.errors import UserError
from snncompress.io import atomic_write, write_bytes

from .registry import CACHE_ENV, Splits, _describe, _first_dir_with, _require_data_dir, cache_dir
from .sampling import class_interleaved_order

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
