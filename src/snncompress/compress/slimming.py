"""Structured CRIT (docs/methods/crit.md): L1 on BatchNorm gamma during training, then global channel pruning by |gamma|
with criticality-guided regrowth of channels, before surgery into a narrower network (:mod:`.structure`).

Channels are those of the channel groups (:func:`.structure.channel_groups`); a
group is prunable when BatchNorm layers scale its channels (a ResNet group tied by
identity shortcuts has several: its |gamma| is their mean). With ``N`` prunable
channels over all groups, prune fraction ``P`` and regrowth fraction ``g``::

    kept    = N - round(P N)
    regrow  = round(g * kept)
    by gamma: the kept - regrow channels of largest |gamma| (ties: earlier group, lower index)
    regrown:  the regrow channels of highest criticality among the others (ties: larger |gamma|,
              earlier group, lower index); a group's channel criticality is the mean over its LIFs

then every group keeps at least ``min_channels`` (its largest-|gamma| channels are added),
and a stride-1 projection block whose in and out widths came out equal gets one more
output channel (or, at full width, loses its weakest) so that it stays a projection.
Groups without BatchNorm (a VGG classifier's hidden layer) keep all their channels.
"""

from __future__ import annotations

import torch
from torch import nn

from ..hooks import Callback
from .importance import GammaImportance, Importance
from .structure import ChannelGroup, projection_conflicts


def batchnorms(model: nn.Module, group: ChannelGroup) -> list[nn.Module]:
    """The BatchNorm modules that scale ``group``'s channels."""
    modules = dict(model.named_modules())
    return [modules[n] for n in group.outputs if isinstance(modules[n], nn.BatchNorm2d | nn.BatchNorm1d)]


class GammaL1(Callback):
    """Adds ``strength * sum |gamma|`` over ``bns`` to the training loss (network slimming)."""

    def __init__(self, bns: list[nn.Module], strength: float):
        self.bns, self.strength = list(bns), float(strength)

    def loss(self, state, images, labels, logits, loss):
        if self.strength == 0 or not self.bns:
            return loss
        return loss + self.strength * sum(bn.weight.abs().sum() for bn in self.bns)


def _ranked(items: list[tuple[str, int]], *keys: dict[str, torch.Tensor]) -> list[tuple[str, int]]:
    """``items`` (group, channel) sorted by each key (descending, first key first), then by their given order."""
    return sorted(items, key=lambda gc: tuple(-float(k[gc[0]][gc[1]]) for k in keys))


def select_channels(model: nn.Module, groups: list[ChannelGroup], prune_fraction: float,
                    regrow_fraction: float, regrow_scores: dict[str, torch.Tensor] | None = None,
                    min_channels: int = 1, importance: Importance | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The channels each group keeps (ascending int64 indices) and a summary of the choice.

    See the module docstring. Channels are ranked by ``importance`` (default :class:`GammaImportance`,
    |gamma|); ``regrow_scores``: ``{group name: [size]}`` scores of the channels to regrow (e.g. a
    :class:`CriticalityImportance`'s); without them (or with ``regrow_fraction = 0``) the choice is by
    ``importance`` alone.
    """
    if not 0 <= prune_fraction < 1 or not 0 <= regrow_fraction < 1:
        raise ValueError(f"need 0 <= prune_fraction < 1 and 0 <= regrow_fraction < 1, "
                         f"got {prune_fraction}, {regrow_fraction}")
    gamma = (importance or GammaImportance())(model, groups)
    crit = regrow_scores or {}
    channels = [(g.name, c) for g in groups if g.name in gamma for c in range(g.size)]
    total = len(channels)
    kept = total - int(prune_fraction * total + 0.5)
    regrow = int(regrow_fraction * kept + 0.5) if regrow_fraction > 0 and crit else 0
    by_gamma = _ranked(channels, gamma)
    chosen = set(by_gamma[:kept - regrow])
    rest = [gc for gc in channels if gc not in chosen]  # still in group / channel order
    missing = [g for g, _ in rest if g not in crit]
    if regrow and missing:
        raise ValueError(f"no criticality for group {missing[0]!r}")
    regrown = _ranked(rest, crit, gamma)[:regrow] if regrow else []
    chosen.update(regrown)
    keep = {}
    for g in groups:
        if g.name not in gamma:
            keep[g.name] = list(range(g.size))
            continue
        own = [c for name, c in chosen if name == g.name]
        need = min(g.size, max(min_channels, 1)) - len(own)
        if need > 0:
            extra = [c for _, c in _ranked([(g.name, c) for c in range(g.size) if c not in own], gamma)]
            own += extra[:need]
        keep[g.name] = sorted(own)
    for a, b in projection_conflicts(model, groups):  # a stride-1 projection must stay one (in != out)
        if len(keep[a]) == len(keep[b]):
            size = next(g.size for g in groups if g.name == b)
            if len(keep[b]) < size:
                extra = [c for _, c in _ranked([(b, c) for c in range(size) if c not in keep[b]], gamma)]
                keep[b] = sorted(keep[b] + extra[:1])
            else:
                weakest = _ranked([(b, c) for c in keep[b]], gamma)[-1][1]
                keep[b] = [c for c in keep[b] if c != weakest]
    summary = {"prunable_channels": total, "kept_target": kept, "regrown": len(regrown),
               "kept": sum(len(keep[g]) for g in gamma),
               "regrown_by_group": {g: sum(1 for name, _ in regrown if name == g) for g in gamma
                                    if any(name == g for name, _ in regrown)}}
    return {name: torch.tensor(idx, dtype=torch.long) for name, idx in keep.items()}, summary
