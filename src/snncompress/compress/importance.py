"""One importance interface for structured pruning: scores per channel group.

An :class:`Importance` is called as ``importance(model, groups)`` and returns
``{group name: scores}``, one float64 CPU tensor ``[group.size]`` per group it can score (higher =
more important; a group it cannot score, e.g. one without BatchNorm for :class:`GammaImportance`,
is left out). Channel groups come from the model's family
(:meth:`snncompress.models.SpikingNetwork.channel_groups`). The methods' scorers:

=====================  ==============================================  =========================
class                  score of a channel                              used by
=====================  ==============================================  =========================
MagnitudeImportance    sum of squared weights that produce it          AGC's channel variant
GammaImportance        mean |gamma| of its BatchNorms                  structured CRIT (slimming)
CriticalityImportance  mean criticality of its spiking layers          structured CRIT regrowth
PCAImportance          mean PCA significance of its spiking layers     STP (diagnostics; STP keeps
                                                                       the most significant)
=====================  ==============================================  =========================

Like Torch-Pruning's ``Importance``, a scorer knows nothing of how many channels are kept: the
selection (:func:`snncompress.compress.slimming.select_channels`, the sparse-momentum channel
masks, the STP narrowing) is a separate part.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import ChannelGroup
from .criticality import criticality_scores
from .masks import original, owner
from .pca import pca_significance


class Importance:
    """Base: ``__call__(model, groups) -> {group name: float64 [size]}`` (module docstring)."""

    def __call__(self, model: nn.Module, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def producing_weights(model: nn.Module, group: ChannelGroup) -> list[str]:
    """Names of the conv / linear weights whose rows (dim 0) are ``group``'s channels."""
    modules = dict(model.named_modules())
    return [f"{n}.weight" for n in group.outputs if isinstance(modules[n], nn.Conv2d | nn.Linear)]


def channel_energy(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum over the tensors of each channel's squared entries, float64 ``[C]`` (rows = dim 0)."""
    return sum(t.detach().cpu().to(torch.float64).pow(2).flatten(1).sum(1) for t in tensors)


def per_group_mean(groups: list[ChannelGroup], lif_scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{group name: per-channel mean of its member LIFs' scores}`` (float64 [size]); groups with none are left out."""
    out = {}
    for g in groups:
        member = [lif_scores[n].to(torch.float64).cpu().reshape(-1) for n in g.lifs if n in lif_scores]
        if member:
            out[g.name] = torch.stack(member).mean(0)
    return out


class MagnitudeImportance(Importance):
    """Sum of squared (unmasked, stored) weights producing each channel."""

    def __call__(self, model, groups):
        return {g.name: channel_energy([original(*owner(model, n)) for n in producing_weights(model, g)])
                for g in groups}


class GammaImportance(Importance):
    """Mean |gamma| of the BatchNorm layers that scale each channel (network slimming)."""

    def __call__(self, model, groups):
        modules = dict(model.named_modules())
        out = {}
        for g in groups:
            bns = [modules[n] for n in g.outputs if isinstance(modules[n], nn.BatchNorm2d | nn.BatchNorm1d)]
            if bns:
                out[g.name] = torch.stack([bn.weight.detach().abs().to(torch.float64).cpu() for bn in bns]).mean(0)
        return out


class CriticalityImportance(Importance):
    """Mean criticality (:mod:`.criticality`) of each channel's spiking layers on ``images [N, C, H, W]``;
    ``options`` go to :func:`~snncompress.compress.criticality.criticality_scores` (chunk, score, alpha, ...)."""

    def __init__(self, images: torch.Tensor, **options):
        self.images, self.options = images, options

    def __call__(self, model, groups):
        return per_group_mean(groups, criticality_scores(model, self.images, **self.options))


class PCAImportance(Importance):
    """Mean PCA significance (:mod:`.pca`) of each channel's spiking layers on ``images [N, C, H, W]``."""

    def __init__(self, images: torch.Tensor, accumulate: str = "mean", chunk: int = 64):
        self.images, self.accumulate, self.chunk = images, accumulate, chunk

    def __call__(self, model, groups):
        pca = pca_significance(model, self.images, accumulate=self.accumulate, chunk=self.chunk)
        return per_group_mean(groups, {name: layer.significance for name, layer in pca.items()})
