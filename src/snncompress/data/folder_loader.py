"""ImageFolder datasets (Tiny-ImageNet, ImageNet, ``imagefolder:<path>``), decoded per item in a ``DataLoader``."""

from __future__ import annotations

import math
import pathlib
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from snncompress.errors import UserError

from .registry import (IMAGEFOLDER_PREFIX, IMAGENET_STATS, DatasetInfo, _describe, _first_dir_with,
                       _require_data_dir, resolve_data_dir)
from .sampling import _epoch_generator, _mix_seed, balanced_subset, class_interleaved_order
from .tensor_loader import CROP_PADDING


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
