"""The calibration batch: the first training images, normalised and never augmented."""

from __future__ import annotations

from typing import Iterable

import torch

from snncompress.errors import UserError


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
