"""DIET-style VGG networks and the small convnet for 28x28 inputs.

Layout (docs/methods/diet.md): ``features`` is a list of 3x3 convolutions (stride 1,
padding 1, no bias), each followed by an optional BatchNorm and a LIF, with
``"A"`` entries for 2x2 average pooling; then ``classifier``: hidden linear
layers (no bias), each followed by a LIF and dropout, then the output linear
layer, which has no neuron (its outputs are summed over t as the logits).

Spec keys: ``features`` (list of int | "A"), ``classifier`` (hidden widths),
``batchnorm`` (bool), ``dropout`` (classifier dropout probability),
``conv_dropout`` (dropout after each conv neuron), ``in_shape``,
``num_classes``, ``timesteps``, ``encoding``, ``neuron``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..errors import short_repr
from ..neuron import LIF
from .chain import ChainUnit, batchnorm_affine, per_channel, start_unit
from .base import (ChannelGroup, FamilyOptions, SpikingNetwork, TimeDropout, classifier_head, init_weights, make_lif,
                   sequential_channel_groups)

#: Feature configurations; "A" = 2x2 average pooling.
VGG_FEATURES = {
    "vgg5": [64, "A", 128, 128, "A"],
    "vgg9": [64, 64, "A", 128, 128, "A", 256, 256, 256, "A"],
    "vgg11": [64, "A", 128, 256, "A", 512, 512, 512, "A", 512, 512],
    "vgg16": [64, 64, "A", 128, 128, "A", 256, 256, 256, "A", 512, 512, 512, "A", 512, 512, 512],
    "convnet": [32, "A", 64, "A"],
}

#: Hidden widths of the classifier (DIET VGG16: 4096, 4096).
VGG_CLASSIFIER = {
    "vgg5": [1024, 1024],
    "vgg9": [1024, 1024],
    "vgg11": [4096, 4096],
    "vgg16": [4096, 4096],
    "convnet": [256],
}


class SpikingVGG(SpikingNetwork):
    """VGG / convnet built from its spec; see the module docstring for the layout."""

    FAMILY = "vgg"
    ARCHS = tuple(VGG_FEATURES)
    EXPORTS = frozenset({"plan", "nir", "c"})
    RUNS_SEQUENCES = True

    @classmethod
    def make_spec(cls, name: str, **options) -> dict:
        return vgg_spec(name, **options)

    def channel_groups(self) -> list[ChannelGroup]:
        spec = self.spec
        conv_positions = [i for i, item in enumerate(spec["features"]) if item != "A"]
        spatial = list(spec["in_shape"][1:])
        groups, current = sequential_channel_groups(self.features, "features", "features", conv_positions, None, spatial)
        head, _ = sequential_channel_groups(self.classifier, "classifier", "classifier",
                                     list(range(len(spec["classifier"]))), current, spatial)
        return groups + head

    def block_ends(self) -> list[tuple[str, int | None]]:
        ends, channels, last_pool = [], None, False
        for i, module in enumerate(self.features):
            if isinstance(module, nn.AvgPool2d):
                ends.append((f"features.{i}", None))
                last_pool = True
            elif isinstance(module, nn.Conv2d):
                channels, last_pool = module.out_channels, False
        if not last_pool and channels is not None:
            ends.append(("classifier.0", channels))
        return ends

    def synaptic_chain(self) -> list[ChainUnit]:
        """Each conv / linear with its BatchNorm, LIF and the 2x2 pooling after it (dropout is inference's
        identity); the flatten before the classifier is implied by the first linear layer."""
        units: list[ChainUnit] = []
        for module in [*self.features, *self.classifier]:
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                units.append(start_unit(module))
            elif not units and not isinstance(module, (TimeDropout, nn.Dropout)):
                raise ValueError(f"the network starts with {type(module).__name__}, not a convolution")
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                units[-1].scale_current(*batchnorm_affine(module))
            elif isinstance(module, LIF):
                units[-1].set_neuron(module, per_channel(module.leak, units[-1].out_channels),
                                     per_channel(module.threshold, units[-1].out_channels))
            elif isinstance(module, nn.AvgPool2d):
                k = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
                units[-1].pool *= int(k)
                units[-1].pool_divisor *= int(k) ** 2
        return units

    def __init__(self, spec: dict):
        super().__init__(spec)
        c, h, w = spec["in_shape"]
        neuron, bn = spec.get("neuron", {}), spec.get("batchnorm", False)
        layers: list[nn.Module] = []
        for item in spec["features"]:
            if item == "A":
                layers.append(nn.AvgPool2d(2))
                h, w = h // 2, w // 2
                continue
            layers.append(nn.Conv2d(c, int(item), 3, padding=1, bias=False))
            if bn:
                layers.append(nn.BatchNorm2d(int(item)))
            layers.append(make_lif(neuron, int(item)))
            if spec.get("conv_dropout", 0.0) > 0:
                layers.append(TimeDropout(spec["conv_dropout"]))
            c = int(item)
        self.features = nn.Sequential(*layers)
        width = c * h * w
        self.classifier = classifier_head(width, spec["classifier"], spec["num_classes"], neuron,
                                          spec.get("dropout", 0.0))
        init_weights(self)

    def run_layers(self, x: torch.Tensor, has_time: bool):
        x, has_time = self.run_sequence(self.features, x, has_time)
        x = x.flatten(2) if has_time else x.flatten(1)
        return self.run_sequence(self.classifier, x, has_time)


#: A layer width: a whole number of channels (``true`` or ``4.0`` are not widths).
Width = Annotated[int, Field(ge=1, strict=True)]


class VGGOptions(FamilyOptions):
    """``model.options`` of a VGG / convnet; a list left out is the named network's own."""

    features: list[Width | Literal["A"]] | None = Field(
        None, description="3x3 conv widths, 'A' = 2x2 average pooling")
    classifier: list[Width] | None = Field(None, description="hidden widths of the classifier")
    batchnorm: bool = False
    dropout: float = Field(0.2, ge=0, lt=1, description="classifier dropout probability")
    conv_dropout: float = Field(0.0, ge=0, lt=1, description="dropout after each conv neuron")

    @field_validator("features", mode="before")
    @classmethod
    def widths_or_pool(cls, value):
        """One readable message for an entry that is neither a width nor 'A' (instead of one per union member)."""
        if isinstance(value, list):
            for i, item in enumerate(value):
                if item != "A" and (type(item) is not int or item < 1):
                    raise ValueError(f"entry {i} ({short_repr(item)}) is neither a channel count >= 1 nor 'A' "
                                     f"(2x2 pooling)")
        return value


def vgg_spec(name: str, **options) -> dict:
    """The family-specific part of a VGG/convnet spec; ``options`` as in :class:`VGGOptions`."""
    opts = VGGOptions.model_validate(options)
    return {
        "family": "vgg",
        "features": list(opts.features if opts.features is not None else VGG_FEATURES[name]),
        "classifier": list(opts.classifier if opts.classifier is not None else VGG_CLASSIFIER[name]),
        "batchnorm": opts.batchnorm, "dropout": opts.dropout, "conv_dropout": opts.conv_dropout,
    }


SpikingVGG.Options = VGGOptions
