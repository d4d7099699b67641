"""Structured channel surgery: a physically narrower dense network, rebuilt from a modified spec.

The network is described as **channel groups**: sets of channels that are
kept or removed together because they are one tensor dimension everywhere
they appear. A group records

* ``spec_paths``: where its width sits in ``model.spec`` (``("features", 3)``,
  ``("blocks", 2, "out")``, ``("blocks", 3, "in")``, ...);
* ``outputs``: modules whose state tensors are indexed along dim 0 (the conv /
  linear producing the channels, its BatchNorm, its LIF when ``per_channel``);
* ``inputs``: ``(module, positions)`` whose weight is indexed along dim 1;
  ``positions`` > 1 for the linear layer after a flatten of ``[C, H, W]``
  (channel c owns columns ``c*H*W .. c*H*W + H*W - 1``);
* ``lifs``: the spiking layers whose outputs are these channels (the PCA
  members that decide the group's width).

VGG / convnet, and imported graph networks that are one path of conv / linear layers: one group per
conv layer and per hidden linear layer (a graph's group also narrows the Scale, neuron and flatten
nodes between its layer and the next). ResNet:
one group per stem conv and per block's ``mid``; a block with an identity
shortcut adds its output to its input's group (identity shortcuts tie a
block's ``out`` to its ``in`` and so to the previous block's ``out``), a block
with a projection shortcut starts a new group produced by ``conv2`` and the
shortcut conv. A projection block of stride 1 must keep ``in != out`` after
narrowing (otherwise the rebuilt block would get an identity shortcut): such a
conflict moves the output width by one channel.

Surgery indexes the state dict group by group and loads it into
``build_from_spec(narrowed spec)``; when the removed channels never carried
a signal (all-zero producing weights), the narrow network computes exactly
what the dense one did.
"""

from __future__ import annotations

import copy

import torch

from ..models import ChannelGroup, SpikingNetwork, build_from_spec
from .masks import set_masks
from .quantizers import attach_quantizer, quantizer_from_config
from .state import bookkeeping, stored_tensors


# ----------------------------------------------------------------------------- structure discovery


def channel_groups(model: SpikingNetwork) -> list[ChannelGroup]:
    """The channel groups of ``model``, in forward order: its family says (:meth:`SpikingNetwork.channel_groups`)."""
    return model.channel_groups()


def projection_conflicts(model: SpikingNetwork, groups: list[ChannelGroup]) -> list[tuple[str, str]]:
    """``(in group, out group)`` pairs whose widths must differ after narrowing (the family says; see the module docstring)."""
    return model.projection_conflicts(groups)


# ----------------------------------------------------------------------------- widths and channels


def group_widths(groups: list[ChannelGroup], layer_k: dict[str, int], min_channels: int = 1,
                 conflicts: list[tuple[str, str]] = ()) -> dict[str, int]:
    """Width of each group: the max of its member LIF layers' ``k`` (at least ``min_channels``, at most its size).

    Stride-1 projection blocks (``conflicts``) whose in and out widths came
    out equal get one more (or, at full width, one fewer) output channel.
    """
    widths = {}
    for g in groups:
        k = max((int(layer_k[name]) for name in g.lifs if name in layer_k), default=g.size)
        widths[g.name] = min(g.size, max(int(min_channels), k, 1))
    size = {g.name: g.size for g in groups}
    for _ in range(len(conflicts) + 1):
        clashes = [(a, b) for a, b in conflicts if widths[a] == widths[b]]
        if not clashes:
            break
        for _, out in clashes:
            widths[out] += 1 if widths[out] < size[out] else -1
    return widths


def select_channels(groups: list[ChannelGroup], widths: dict[str, int],
                    significance: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Channel indices (ascending, int64) each group keeps: the ``width`` most significant.

    A group's score per channel is the sum over its member LIFs of their
    significance normalised to sum 1 (each coupled layer weighs the same);
    ties go to the lower channel index.
    """
    keep = {}
    for g in groups:
        score = torch.zeros(g.size, dtype=torch.float64)
        for name in g.lifs:
            sig = significance[name].to(torch.float64).cpu()
            score += sig / sig.sum() if sig.sum() > 0 else sig
        order = sorted(range(g.size), key=lambda c: (-float(score[c]), c))
        keep[g.name] = torch.tensor(sorted(order[: widths[g.name]]), dtype=torch.long)
    return keep


def narrow_spec(spec: dict, groups: list[ChannelGroup], widths: dict[str, int]) -> dict:
    """A copy of ``spec`` with every group's width written at all of its ``spec_paths`` (and times ``positions``
    at its ``spec_multiples``)."""
    spec = copy.deepcopy(spec)
    for g in groups:
        for path, factor in [(path, 1) for path in g.spec_paths] + list(g.spec_multiples):
            node = spec
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = int(widths[g.name]) * int(factor)
    return spec


# ----------------------------------------------------------------------------- surgery


def _index_outputs(state: dict, module: str, keep: torch.Tensor) -> None:
    """Index every per-channel tensor of ``module`` (weight rows, BN stats, per-channel leak/thr) in place."""
    for key in [k for k in state if k.startswith(module + ".")]:
        if state[key].dim() >= 1:
            state[key] = state[key].index_select(0, keep.to(state[key].device))


def _index_inputs(state: dict, module: str, positions: int, keep: torch.Tensor) -> None:
    """Keep the input columns of ``module``'s weight that belong to the kept channels."""
    key = f"{module}.weight"
    if key not in state:  # a partial state (e.g. only the masked tensors)
        return
    columns = (keep[:, None] * positions + torch.arange(positions)).flatten()
    state[key] = state[key].index_select(1, columns.to(state[key].device))


def narrow_state(state: dict, groups: list[ChannelGroup], keep: dict[str, torch.Tensor]) -> dict:
    """A new state dict (or any subset of one, e.g. the masks) in which every group keeps only ``keep[group]``."""
    state = dict(state)
    for g in groups:
        for module in g.outputs:
            _index_outputs(state, module, keep[g.name])
        for module, positions in g.inputs:
            _index_inputs(state, module, positions, keep[g.name])
    return state


def narrow_model(model: SpikingNetwork, keep: dict[str, torch.Tensor],
                 groups: list[ChannelGroup] | None = None) -> SpikingNetwork:
    """The physically narrower copy of ``model`` keeping channels ``keep[group name]`` (ascending indices).

    Weights (including the next layer's input slices), BatchNorm parameters and
    statistics, per-channel LIF leaks and thresholds and pruning masks follow
    their channels; quantizers are attached again to the narrowed tensors
    (recalibrated: the largest kept weight may be smaller). Mode (SNN/ANN), T
    and device are those of ``model``.
    """
    groups = groups if groups is not None else channel_groups(model)
    widths = {g.name: int(keep[g.name].numel()) for g in groups}
    narrow = build_from_spec(narrow_spec(model.spec, groups, widths))
    param = next(model.parameters())
    narrow.to(param.device, param.dtype)
    stored = stored_tensors(model)
    narrow.load_state_dict(narrow_state({**bookkeeping(model), **{t.name: t.values for t in stored}}, groups, keep),
                           strict=True)
    masks = {t.name: t.mask for t in stored if t.mask is not None}
    set_masks(narrow, narrow_state(masks, groups, keep))
    for t in stored:
        if t.quantizer is not None:
            attach_quantizer(narrow, t.name, quantizer_from_config(t.quantizer.config()))
    return narrow.train(model.training)


def narrow_fresh(model: SpikingNetwork, widths: dict[str, int],
                 groups: list[ChannelGroup] | None = None) -> SpikingNetwork:
    """A freshly initialised network with ``model``'s spec narrowed to ``widths[group name]`` (train from scratch)."""
    groups = groups if groups is not None else channel_groups(model)
    return build_from_spec(narrow_spec(model.spec, groups, widths))
