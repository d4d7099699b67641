"""The in-memory batch loader: uint8 images cut, augmented and normalised with batched tensor ops."""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .sampling import _epoch_generator

CROP_PADDING = 4
"""Zero padding (pixels) of the random-crop augmentation on 32x32-style RGB data (the default)."""


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
    moves it (e.g. when resuming). ``crop_padding``: zero pixels added on each side before the
    random crop when ``augment`` (default :data:`CROP_PADDING`). :meth:`to` moves the uint8 images onto a GPU:
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
        crop_padding: int = CROP_PADDING,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.crop_padding = crop_padding
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
                pixels = random_crop_flip(pixels, self.crop_padding, generator)
            yield self.normalise(pixels), self.labels[index]
