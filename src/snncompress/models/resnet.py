"""Spiking ResNets: DIET's ResNet-20 and the ResNet-19 of tdBN / CRIT.

Basic block (docs/methods/diet.md)::

    o1 = LIF1(BN1(conv1(x)))
    I2 = BN2(conv2(o1)) + shortcut(x)      shortcut: identity, or 1x1 conv (+BN)
    o  = LIF2(I2)                          the residual enters the second neuron's current

The spec lists every block explicitly (``{"in", "mid", "out", "stride"}``),
so a channel-pruned network with uneven widths rebuilds from its spec. A
block has a 1x1 projection shortcut whenever ``stride != 1`` or
``in != out``.

Spec keys: ``stem`` (widths of the 3x3 stem convolutions), ``stem_pool``
(2x2 average pool after the stem), ``blocks``, ``classifier`` (hidden widths
after global average pooling), ``batchnorm``, ``dropout``, plus the common
keys.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from .base import (ChannelGroup, FamilyOptions, SpikingNetwork, classifier_head, init_weights, make_lif,
                   sequential_channel_groups)

#: (stem widths, stem pool, stages as (width, blocks, stride), classifier hidden widths)
RESNET_LAYOUTS = {
    # DIET ResNet-20: 3 stem convs + 4 stages x 2 blocks x 2 convs + 1 linear = 20 layers.
    "resnet20": ([64, 64, 64], True, [(128, 2, 1), (256, 2, 2), (512, 2, 2), (512, 2, 2)], []),
    # ResNet-19 (tdBN, CRIT): 1 stem conv + (3 + 3 + 2) blocks x 2 convs + 2 linear = 19 layers.
    "resnet19": ([128], False, [(128, 3, 1), (256, 3, 2), (512, 2, 2)], [256]),
}


def _norm(bn: bool, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if bn else nn.Identity()


class BasicBlock(nn.Module):
    """Spiking basic block; its forward is driven by :class:`SpikingResNet`."""

    def __init__(self, cfg: dict, neuron: dict, bn: bool):
        super().__init__()
        cin, mid, out, stride = int(cfg["in"]), int(cfg["mid"]), int(cfg["out"]), int(cfg["stride"])
        self.conv1 = nn.Conv2d(cin, mid, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(bn, mid)
        self.lif1 = make_lif(neuron, mid)
        self.conv2 = nn.Conv2d(mid, out, 3, padding=1, bias=False)
        self.bn2 = _norm(bn, out)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != out:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, out, 1, stride=stride, bias=False), _norm(bn, out))
        self.lif2 = make_lif(neuron, out)


class SpikingResNet(SpikingNetwork):
    """ResNet built from its spec; see the module docstring for the layout."""

    FAMILY = "resnet"
    ARCHS = tuple(RESNET_LAYOUTS)
    RUNS_SEQUENCES = True

    @classmethod
    def make_spec(cls, name: str, **options) -> dict:
        return resnet_spec(name, **options)

    def channel_groups(self) -> list[ChannelGroup]:
        spec = self.spec
        groups, current = sequential_channel_groups(self.stem, "stem", "stem", list(range(len(spec["stem"]))),
                                             None, list(spec["in_shape"][1:]))
        for b, block in enumerate(self.blocks):
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
        head, _ = sequential_channel_groups(self.classifier, "classifier", "classifier",
                                     list(range(len(spec.get("classifier", [])))), current, [1, 1])
        return groups + head

    def projection_conflicts(self, groups: list[ChannelGroup]) -> list[tuple[str, str]]:
        """``(in group, out group)`` of every stride-1 projection block: their widths must differ after narrowing."""
        by_path = {path: g.name for g in groups for path in g.spec_paths}
        return [(by_path[("blocks", b, "in")], by_path[("blocks", b, "out")])
                for b, block in enumerate(self.blocks)
                if len(block.shortcut) and int(self.spec["blocks"][b]["stride"]) == 1]

    def block_ends(self) -> list[tuple[str, int | None]]:
        n = len(self.blocks)
        return [(f"blocks.{b + 1}.conv1", None) for b in range(n - 1)] + [("pool", None)]

    def __init__(self, spec: dict):
        super().__init__(spec)
        c = spec["in_shape"][0]
        neuron, bn = spec.get("neuron", {}), spec.get("batchnorm", False)
        stem: list[nn.Module] = []
        for width in spec["stem"]:
            stem += [nn.Conv2d(c, int(width), 3, padding=1, bias=False), _norm(bn, int(width)),
                     make_lif(neuron, int(width))]
            c = int(width)
        if spec.get("stem_pool", False):
            stem.append(nn.AvgPool2d(2))
        self.stem = nn.Sequential(*stem)
        self.blocks = nn.ModuleList(BasicBlock(b, neuron, bn) for b in spec["blocks"])
        self.pool = nn.AdaptiveAvgPool2d(1)
        width = int(spec["blocks"][-1]["out"]) if spec["blocks"] else c
        self.classifier = classifier_head(width, spec.get("classifier", []), spec["num_classes"], neuron,
                                          spec.get("dropout", 0.0))
        init_weights(self)

    def run_block(self, block: BasicBlock, x: torch.Tensor, has_time: bool):
        """One residual block on ``x`` (``[T, B, C, H, W]`` when ``has_time``); returns its output and time flag."""
        y = self.stateless(block.bn1, self.stateless(block.conv1, x, has_time), has_time)
        y, y_time = self.activation(block.lif1, y, has_time)
        current = self.stateless(block.bn2, self.stateless(block.conv2, y, y_time), y_time)
        residual = self.stateless(block.shortcut, x, has_time) if len(block.shortcut) else x
        if y_time and not has_time:
            residual = residual.unsqueeze(0).expand(self.timesteps, *residual.shape)
        return self.activation(block.lif2, current + residual, y_time)

    def run_layers(self, x: torch.Tensor, has_time: bool):
        x, has_time = self.run_sequence(self.stem, x, has_time)
        for block in self.blocks:
            x, has_time = self.run_block(block, x, has_time)
        x = self.stateless(self.pool, x, has_time)
        x = x.flatten(2) if has_time else x.flatten(1)
        return self.run_sequence(self.classifier, x, has_time)


class ResNetOptions(FamilyOptions):
    """``model.options`` of a ResNet."""

    batchnorm: bool | None = Field(None, description="BatchNorm after every conv (default: resnet19 only)")
    dropout: float = Field(0.2, ge=0, lt=1, description="classifier dropout probability")
    width_mult: float = Field(1.0, gt=0, description="factor on every width (at least 1 channel)")


def resnet_spec(name: str, **options) -> dict:
    """The family-specific part of a ResNet spec, every block listed explicitly; ``options`` as in
    :class:`ResNetOptions`."""
    opts = ResNetOptions.model_validate(options)
    stem, stem_pool, stages, classifier = RESNET_LAYOUTS[name]
    scale = lambda w: max(1, int(round(w * opts.width_mult)))  # noqa: E731
    stem = [scale(w) for w in stem]
    blocks, cin = [], stem[-1]
    for width, count, stride in stages:
        for i in range(count):
            blocks.append({"in": cin, "mid": scale(width), "out": scale(width),
                           "stride": stride if i == 0 else 1})
            cin = scale(width)
    return {
        "family": "resnet", "stem": stem, "stem_pool": stem_pool, "blocks": blocks,
        "classifier": list(classifier),
        "batchnorm": (name == "resnet19") if opts.batchnorm is None else opts.batchnorm,
        "dropout": opts.dropout,
    }


SpikingResNet.Options = ResNetOptions
