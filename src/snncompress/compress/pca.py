"""PCA significance of spiking layers (STP spatial pruning, docs/methods/stp.md steps 1-2).

For each LIF layer l of an SNN:

1. record the pre-reset membrane potential ``u`` ``[T, B, C, H, W]`` (conv) or
   ``[T, B, N]`` (linear) on a batch of training images, and accumulate it
   over time: mean over t (default) or sum;
2. arrange it as samples x features: conv ``[B, C, H, W] -> [B*H*W, C]``
   (every pixel of every image is a sample of the C channels), linear
   ``[B, N]``;
3. centre the columns, take singular values ``s`` of the centred matrix (via
   the eigenvalues of its scatter ``X_c^T X_c``, accumulated batch by batch);
   explained-variance ratios ``r_i = s_i^2 / sum_j s_j^2`` (descending);
4. the significant dimension ``k_l`` = the smallest k with
   ``sum_{i<=k} r_i >= theta``.

Channel significance (which channels to keep when the narrow model inherits
the dense model's weights): ``sig_c = sum_{i<k} s_i^2 V[c, i]^2``, the
variance of channel c that lies in the retained principal subspace (``V`` =
right singular vectors, the loadings).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.membrane import record_membranes
from ..models import SpikingNetwork
from ..neuron import LIF

ACCUMULATIONS = ("mean", "sum")


@dataclass
class LayerPCA:
    """PCA of one spiking layer: ``ratios`` [C] descending, ``significance`` [C], ``k``."""

    channels: int
    ratios: torch.Tensor
    significance: torch.Tensor
    k: int

    def cumulative(self) -> torch.Tensor:
        """Cumulative explained-variance ratio ``[C]`` (ends at 1)."""
        return torch.cumsum(self.ratios, 0)


def as_samples(potential: torch.Tensor) -> torch.Tensor:
    """Time-accumulated potential ``[B, C, H, W]`` or ``[B, N]`` -> samples x features ``[B*H*W, C]`` / ``[B, N]``."""
    if potential.dim() == 2:
        return potential
    return potential.movedim(1, -1).reshape(-1, potential.shape[1])


class Scatter:
    """Streaming centred scatter matrix of samples ``[N, C]`` (float64; memory ``O(C^2)``, not ``O(N C)``).

    ``X_c^T X_c = sum x x^T - N mu mu^T`` with ``X_c`` the column-centred
    samples, so its eigenvalues are the squared singular values ``s_i^2`` of
    ``X_c`` and its eigenvectors the right singular vectors ``V`` (loadings):
    the same PCA as an SVD of the centred matrix, without holding all samples.
    """

    def __init__(self, channels: int):
        self.count = 0
        self.total = torch.zeros(channels, dtype=torch.float64)
        self.gram = torch.zeros(channels, channels, dtype=torch.float64)

    def add(self, samples: torch.Tensor) -> None:
        """Accumulate samples ``[N, C]``."""
        x = samples.detach().to(torch.float64).cpu()
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.gram += x.T @ x

    def components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared singular values ``[C]`` (descending, >= 0) and loadings ``V`` ``[C, C]`` (columns)."""
        mean = self.total / max(self.count, 1)
        centred = self.gram - self.count * torch.outer(mean, mean)
        power, vectors = torch.linalg.eigh((centred + centred.T) / 2)
        return power.flip(0).clamp(min=0.0), vectors.flip(1)


def principal_components(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared singular values ``[C]`` (descending) and loadings ``V`` ``[C, C]`` of the centred ``samples [N, C]``."""
    scatter = Scatter(samples.shape[1])
    scatter.add(samples)
    return scatter.components()


def explained_variance_ratio(samples: torch.Tensor) -> torch.Tensor:
    """Explained-variance ratios ``s_i^2 / sum s^2`` ``[C]`` of ``samples [N, C]``, descending, summing to 1.

    A layer with no variance at all (e.g. never any input) gets all zeros.
    """
    power, _ = principal_components(samples)
    total = power.sum()
    return power / total if total > 0 else power


def significant_dimension(ratios: torch.Tensor, theta: float) -> int:
    """Smallest k whose cumulative ratio ``>= theta`` (1 for a layer without variance)."""
    if not 0.0 < theta <= 1.0:
        raise ValueError(f"theta must be in (0, 1], got {theta}")
    cumulative = torch.cumsum(ratios.to(torch.float64), 0)
    if cumulative.numel() == 0 or cumulative[-1] <= 0:
        return 1
    # tolerate float rounding of a cumulative sum that should reach exactly theta
    hits = (cumulative >= theta - 1e-9).nonzero()
    return int(hits[0]) + 1 if hits.numel() else int(ratios.numel())


def layer_pca(scatter: Scatter, theta: float) -> LayerPCA:
    """PCA of one layer from its scatter: ratios, channel significance and ``k`` at ``theta``."""
    power, loadings = scatter.components()
    total = power.sum()
    ratios = power / total if total > 0 else power
    k = significant_dimension(ratios, theta)
    significance = (loadings[:, :k] ** 2 * power[:k]).sum(1)
    return LayerPCA(channels=power.numel(), ratios=ratios.float(), significance=significance.float(), k=k)


def accumulate_time(membrane: torch.Tensor, accumulate: str) -> torch.Tensor:
    """Pre-reset potentials ``[T, B, ...]`` -> ``[B, ...]``: mean or sum over t."""
    if accumulate not in ACCUMULATIONS:
        raise ValueError(f"accumulate must be one of {ACCUMULATIONS}, got {accumulate!r}")
    return membrane.mean(0) if accumulate == "mean" else membrane.sum(0)


@torch.no_grad()
def layer_scatters(model: SpikingNetwork, images: torch.Tensor, accumulate: str = "mean",
                   chunk: int = 64) -> dict[str, Scatter]:
    """Each LIF layer's scatter of time-accumulated pre-reset potentials, ``{name: Scatter}`` in forward order.

    Args:
        model: the SNN (run in eval mode at its own T; its mode is restored).
        images: training images ``[N, C, H, W]``, normalised.
        accumulate: ``"mean"`` or ``"sum"`` of ``u`` over the T timesteps.
        chunk: images per forward pass (memory knob; the result does not depend on it).
    """
    accumulate_time(torch.zeros(1, 1), accumulate)  # validate before running anything
    layers = list(model.spiking_layers())
    was_training, was_spiking = model.training, model.spiking
    model.set_spiking(True).eval()
    scatters: dict[str, Scatter] = {}
    def collect(name: str, lif: LIF, u: torch.Tensor) -> None:
        samples = as_samples(accumulate_time(u, accumulate))
        scatters.setdefault(name, Scatter(samples.shape[1])).add(samples)

    try:
        with record_membranes(layers, collect):
            for start in range(0, images.shape[0], chunk):
                model(images[start:start + chunk])
    finally:
        model.set_spiking(was_spiking).train(was_training)
    return scatters


def pca_significance(model: SpikingNetwork, images: torch.Tensor, theta: float = 0.99,
                     accumulate: str = "mean", chunk: int = 64) -> dict[str, LayerPCA]:
    """PCA of every LIF layer of ``model`` on ``images [N, C, H, W]``; ``{layer name: LayerPCA}`` in forward order."""
    scatters = layer_scatters(model, images, accumulate, chunk)
    return {name: layer_pca(scatter, theta) for name, scatter in scatters.items()}
