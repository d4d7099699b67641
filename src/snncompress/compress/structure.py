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

VGG / convnet: one group per conv layer and per hidden linear layer. ResNet:
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
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models import SpikingNetwork, build_from_spec
from .masks import set_masks
from .quantizers import attach_quantizer, quantizer_from_config
from .state import bookkeeping, stored_tensors
from ..neuron import LIF


@dataclass
class ChannelGroup:
    """Channels kept or removed together; see the module docstring for the fields."""

    name: str
    size: int
    spec_paths: list[tuple] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    inputs: list[tuple[str, int]] = field(default_factory=list)
    lifs: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- structure discovery


def channel_groups(model: SpikingNetwork) -> list[ChannelGroup]:
    """The channel groups of a VGG/convnet or ResNet, in forward order."""
    family = model.spec.get("family")
    if family == "vgg":
        return _vgg_groups(model)
    if family == "resnet":
        return _resnet_groups(model)
    raise ValueError(f"channel surgery does not know model family {family!r}")


def _has_neuron(following: list[tuple[str, nn.Module]]) -> bool:
    """True when a LIF comes after a conv/linear layer before the next conv/linear layer."""
    for _, module in following:
        if isinstance(module, LIF):
            return True
        if isinstance(module, nn.Conv2d | nn.Linear):
            return False
    return False


def _sequential_groups(seq: nn.Sequential, prefix: str, spec_key: str, spec_indices: list[int],
                       current: ChannelGroup | None, spatial: list[int]) -> tuple[list[ChannelGroup], ChannelGroup | None]:
    """Walk conv/linear, BN, LIF, pooling modules of ``seq``: each conv/linear followed by a LIF starts a group.

    ``spec_indices[j]`` is the position in ``spec[spec_key]`` of the j-th
    layer that starts a group; ``spatial`` = ``[H, W]`` of the current
    feature map, updated by pooling (a flatten happens before the first linear).
    """
    groups, modules, j = [], list(seq.named_children()), 0
    for i, (name, module) in enumerate(modules):
        full = f"{prefix}.{name}"
        if isinstance(module, nn.Conv2d | nn.Linear):
            positions = spatial[0] * spatial[1] if isinstance(module, nn.Linear) else 1
            if isinstance(module, nn.Linear):
                spatial[:] = [1, 1]
            if current is not None:
                current.inputs.append((full, positions))
            if not _has_neuron(modules[i + 1:]):
                current = None  # the output layer: no neuron, its channels are the classes
                continue
            current = ChannelGroup(full, module.weight.shape[0], [(spec_key, spec_indices[j])], [full])
            groups.append(current)
            j += 1
        elif isinstance(module, nn.AvgPool2d):
            spatial[:] = [spatial[0] // 2, spatial[1] // 2]
        elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d | LIF) and current is not None:
            current.outputs.append(full)
            if isinstance(module, LIF):
                current.lifs.append(full)
    return groups, current


def _vgg_groups(model: SpikingNetwork) -> list[ChannelGroup]:
    spec = model.spec
    conv_positions = [i for i, item in enumerate(spec["features"]) if item != "A"]
    spatial = list(spec["in_shape"][1:])
    groups, current = _sequential_groups(model.features, "features", "features", conv_positions, None, spatial)
    head, _ = _sequential_groups(model.classifier, "classifier", "classifier",
                                 list(range(len(spec["classifier"]))), current, spatial)
    return groups + head


def _resnet_groups(model: SpikingNetwork) -> list[ChannelGroup]:
    spec = model.spec
    groups, current = _sequential_groups(model.stem, "stem", "stem", list(range(len(spec["stem"]))),
                                         None, list(spec["in_shape"][1:]))
    for b, block in enumerate(model.blocks):
        p = f"blocks.{b}"
        current.inputs.append((f"{p}.conv1", 1))
        current.spec_paths.append(("blocks", b, "in"))
        mid = ChannelGroup(f"{p}.mid", block.conv1.out_channels, [("blocks", b, "mid")],
                           [f"{p}.conv1", f"{p}.bn1", f"{p}.lif1"], [(f"{p}.conv2", 1)], [f"{p}.lif1"])
        groups.append(mid)
        if len(block.shortcut):  # projection: a new channel space
            current.inputs.append((f"{p}.shortcut.0", 1))
            current = ChannelGroup(f"{p}.out", block.conv2.out_channels, [],
                                   [f"{p}.shortcut.0", f"{p}.shortcut.1"])
            groups.append(current)
        current.spec_paths.append(("blocks", b, "out"))
        current.outputs += [f"{p}.conv2", f"{p}.bn2", f"{p}.lif2"]
        current.lifs.append(f"{p}.lif2")
    head, _ = _sequential_groups(model.classifier, "classifier", "classifier",
                                 list(range(len(spec.get("classifier", [])))), current, [1, 1])
    return groups + head


def projection_conflicts(model: SpikingNetwork, groups: list[ChannelGroup]) -> list[tuple[str, str]]:
    """``(in group, out group)`` of every stride-1 projection block: their widths must differ after narrowing."""
    if model.spec.get("family") != "resnet":
        return []
    by_path = {path: g.name for g in groups for path in g.spec_paths}
    return [(by_path[("blocks", b, "in")], by_path[("blocks", b, "out")])
            for b, block in enumerate(model.blocks)
            if len(block.shortcut) and int(model.spec["blocks"][b]["stride"]) == 1]


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
    """A copy of ``spec`` with every group's width written at all of its ``spec_paths``."""
    spec = copy.deepcopy(spec)
    for g in groups:
        for path in g.spec_paths:
            node = spec
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = int(widths[g.name])
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
