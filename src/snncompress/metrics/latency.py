"""Wall-clock latency per image (SPEC §6): state the batch size, threads and device with it.

Protocol: ``model.eval()`` under ``torch.inference_mode``; ``warmup`` untimed
forward passes, then ``repeats`` timed passes of one batch of
``latency_batch`` images; ``latency_ms`` = median pass time / batch size, in
milliseconds per image. On CUDA every pass is synchronised before the clock
is read.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def latency_images(loader, batch: int) -> torch.Tensor:
    """The first ``batch`` images ``[batch, C, H, W]`` of ``loader`` (cycled when it holds fewer)."""
    chunks, have = [], 0
    while have < batch:
        before = have
        for item in loader:
            images = item[0] if isinstance(item, (tuple, list)) else item
            chunks.append(images[: batch - have])
            have += chunks[-1].shape[0]
            if have >= batch:
                break
        if have == before:
            raise ValueError("the test loader yielded no images to time")
    return torch.cat(chunks)[:batch]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(model: nn.Module, images: torch.Tensor, *, repeats: int = 20, warmup: int = 3,
                    device="cpu") -> dict:
    """Median wall-clock milliseconds per image of ``model(images)``.

    Args:
        images: one batch ``[B, C, H, W]``; B is the reported ``latency_batch``.
        repeats: timed forward passes (>= 1); warmup: untimed passes before them.

    Returns:
        ``{"latency_ms", "latency_batch", "latency_threads", "latency_device", "latency_repeats"}``.
    """
    device = torch.device(device)
    model = model.eval()
    images = images.to(device)
    times = []
    with torch.inference_mode():
        for i in range(warmup + max(int(repeats), 1)):
            _sync(device)
            start = time.perf_counter()
            model(images)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return {
        "latency_ms": statistics.median(times) * 1000.0 / images.shape[0],
        "latency_batch": int(images.shape[0]),
        "latency_threads": int(torch.get_num_threads()),
        "latency_device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "latency_repeats": len(times),
    }
