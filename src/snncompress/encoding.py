"""Input encodings: how an analog image becomes the network's input over T timesteps.

* ``direct``: the normalised image itself enters conv1 at every timestep. The
  networks compute conv1 once and reuse it over t, so this module is not
  involved (``encode(..., "direct")`` returns the image repeated, for callers
  that want the explicit ``[T, B, ...]`` tensor).
* ``poisson``: rate coding; at each timestep a pixel spikes with probability
  ``|x|`` (clipped to 1), carrying the sign of ``x``: values in {-1, 0, 1}.
"""

from __future__ import annotations

import torch

ENCODINGS = ("direct", "poisson")


def encode(images: torch.Tensor, timesteps: int, kind: str = "direct",
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Images ``[B, C, H, W]`` -> encoded input ``[T, B, C, H, W]``."""
    if kind == "direct":
        return images.unsqueeze(0).expand(timesteps, *images.shape)
    if kind == "poisson":
        rand = torch.rand((timesteps, *images.shape), device=images.device,
                          dtype=images.dtype, generator=generator)
        return (rand <= images.abs()).to(images.dtype) * torch.sign(images)
    raise ValueError(f"unknown encoding {kind!r}; choose one of {ENCODINGS}")
