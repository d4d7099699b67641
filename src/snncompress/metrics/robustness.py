"""Accuracy under additive Gaussian noise on the normalised input (docs/measuring.md).

For each sigma, every test image ``x`` (already normalised) becomes
``x + sigma * n`` with ``n ~ N(0, 1)`` per pixel. One noise draw per image
(seeded) is shared by all sigmas and all models, so the SNN and its ANN
references (the ReLU twin and, when given, the trained ANN) see exactly the
same noisy images and the curves differ only by the model. The noise depends
only on the seed and the images, not on which models are evaluated: adding a
model to ``models`` leaves the others' accuracies unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_SIGMAS = (0.0, 0.05, 0.1, 0.2, 0.3)


def sigma_key(sigma: float) -> str:
    """The report key of a noise level: ``str(float(sigma))``, e.g. ``"0.0"``, ``"0.05"``."""
    return str(float(sigma))


def limited_batches(loader, max_images: int | None):
    """``(images, labels)`` from ``loader``, truncated to ``max_images`` images in total."""
    seen = 0
    for images, labels in loader:
        if max_images is not None:
            if seen >= max_images:
                return
            images, labels = images[: max_images - seen], labels[: max_images - seen]
        seen += images.shape[0]
        yield images, labels


def noise_robustness(models: dict[str, nn.Module], loader, sigmas=DEFAULT_SIGMAS, *,
                     max_images: int | None = None, device="cpu", seed: int = 0) -> dict[str, dict[str, float]]:
    """Accuracy (0-1) of each model at each noise level.

    Args:
        models: ``{label: model}``, each mapping ``[B, C, H, W]`` to logits ``[B, classes]``, e.g.
            ``{"snn": snn, "ann": relu_twin, "trained_ann": trained_ann}``.
        loader: yields ``(images [B, C, H, W] normalised, labels [B] int64)``.
        sigmas: noise standard deviations, in units of the normalised input.
        max_images: use only the first this many test images (None: all).
        seed: seed of the noise generator.

    Returns:
        ``{label: {sigma_key(sigma): accuracy}}``.
    """
    generator = torch.Generator().manual_seed(seed)
    correct = {label: {sigma_key(s): 0 for s in sigmas} for label in models}
    total = 0
    for model in models.values():
        model.eval()
    with torch.inference_mode():
        for images, labels in limited_batches(loader, max_images):
            noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
            images, labels, noise = images.to(device), labels.to(device), noise.to(device)
            for sigma in sigmas:
                noisy = images + float(sigma) * noise
                for label, model in models.items():
                    hits = (model(noisy).argmax(1) == labels).sum()
                    correct[label][sigma_key(sigma)] += int(hits)
            total += images.shape[0]
    return {label: {k: v / max(total, 1) for k, v in accs.items()} for label, accs in correct.items()}
