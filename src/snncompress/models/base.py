"""What every snncompress network shares: the SNN/ANN twin switch, time handling, specs.

A network runs in one of two modes with the same parameters:

* SNN (``spiking=True``): images ``[B, C, H, W]`` are encoded into ``T``
  timesteps, layers run on ``[T, B, ...]`` tensors, every :class:`LIF`
  integrates and fires, and the logits are the sum over t of the last
  layer's output, ``[B, classes]``.
* ANN twin (``spiking=False``): the same layers with ReLU in place of each
  LIF, one pass, ``[B, classes]``.

Stateless layers (conv, linear, pooling, BatchNorm) see time folded into the
batch (``[T*B, ...]``). Everything before the first LIF is computed once per
image and broadcast over t (direct input: conv1 runs once).

The architecture is data: ``model.spec`` is a JSON-able dict from which
:func:`snncompress.models.build_from_spec` rebuilds the same network, pruned
or not.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..parametrization import own_classes
from ..encoding import encode
from ..neuron import LIF, NeuronOptions
from .chain import ChainUnit

#: The neuron options a spec stores by default (derived from :class:`~snncompress.neuron.NeuronOptions`).
NEURON_DEFAULTS = NeuronOptions().spec()


class FamilyOptions(BaseModel):
    """Base of a model family's options (a recipe's ``model.options``): unknown names and NaN/inf are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def make_lif(neuron: dict, channels: int) -> LIF:
    """A :class:`LIF` configured from the spec's ``neuron`` dict for a layer of ``channels`` channels."""
    return LIF(**NeuronOptions(**neuron).model_dump(), num_channels=channels)


def fold_time(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a stateless module to ``[T, B, ...]`` by folding time into batch; returns ``[T, B, ...]``."""
    t, b = x.shape[:2]
    y = module(x.reshape(t * b, *x.shape[2:]))
    return y.reshape(t, b, *y.shape[1:])


class TimeDropout(nn.Module):
    """Dropout whose mask is drawn once per mini-batch and held over all timesteps.

    Input ``[T, B, ...]`` (SNN) or ``[B, ...]`` (ANN); the mask has shape ``[B, ...]``.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor, has_time: bool) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        sample = x[0] if has_time else x
        mask = torch.bernoulli(torch.full_like(sample, 1 - self.p)) / (1 - self.p)
        return x * mask


def classifier_head(width: int, hidden: list, num_classes: int, neuron: dict, dropout: float) -> nn.Sequential:
    """The fully connected head: ``Linear -> LIF -> TimeDropout`` per hidden width, then ``Linear`` to the classes.

    ``width``: input features; ``hidden``: widths of the hidden layers; no biases (the DIET convention).
    """
    head: list[nn.Module] = []
    for size in hidden:
        head += [nn.Linear(width, int(size), bias=False), make_lif(neuron, int(size)), TimeDropout(dropout)]
        width = int(size)
    head.append(nn.Linear(width, int(num_classes), bias=False))
    return nn.Sequential(*head)


def init_weights(module: nn.Module) -> None:
    """DIET init: conv N(0, sqrt(2/(k*k*C_out))), linear N(0, 0.01), BN weight 1 bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, (2.0 / n) ** 0.5)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SpikingNetwork(nn.Module):
    """Base class: owns the spec, the mode switch and the time loop plumbing.

    Subclasses implement :meth:`run_layers(x, has_time)` on encoded input and
    return logits ``[T, B, K]`` (SNN) or ``[B, K]`` (ANN).
    """

    #: The family's name in specs (``spec["family"]``), the arch names it builds, its options model, and
    #: what it can be exported to ("plan": the PyTorch inference plan, "nir", "c"); set by each family class.
    FAMILY: ClassVar[str] = ""
    ARCHS: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type[FamilyOptions]] = FamilyOptions
    EXPORTS: ClassVar[frozenset[str]] = frozenset()
    #: whether the family runs its layers through :meth:`run_sequence` (and ``run_block``), the methods
    #: ``training.memory.checkpoint_layers`` wraps to recompute each spiking layer in backward
    RUNS_SEQUENCES: ClassVar[bool] = False

    @classmethod
    def make_spec(cls, name: str, **options) -> dict:
        """The family's part of the spec of arch ``name`` (``options`` validated by :attr:`Options`)."""
        raise NotImplementedError

    def channel_groups(self) -> list["ChannelGroup"]:
        """Channels pruned together (:class:`ChannelGroup`), in forward order; used by channel surgery."""
        raise ValueError(f"channel surgery does not know model family {self.spec.get('family')!r}")

    def projection_conflicts(self, groups: list["ChannelGroup"]) -> list[tuple[str, str]]:
        """``(in group, out group)`` pairs whose widths must differ after narrowing (none by default)."""
        return []

    def block_ends(self) -> list[tuple[str, int | None]]:
        """``[(module name, channels or None)]``: modules whose input is a block-end activation
        (attention transfer's taps; ``channels`` set where that input arrives flattened)."""
        raise ValueError(f"attention transfer does not know model family {self.spec.get('family')!r}")

    def synaptic_chain(self) -> list["ChainUnit"]:
        """The network as a chain of synaptic layers (:mod:`snncompress.models.chain`), for runtimes that run
        one layer after another; ValueError naming what makes it no chain."""
        raise ValueError(f"model family {self.spec.get('family')!r} is not a chain of synaptic layers")

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = copy.deepcopy(spec)
        self.spiking = bool(self.spec.get("spiking", True))

    @property
    def timesteps(self) -> int:
        return int(self.spec["timesteps"])

    @timesteps.setter
    def timesteps(self, value: int) -> None:
        self.spec["timesteps"] = int(value)

    def set_spiking(self, spiking: bool) -> "SpikingNetwork":
        """Switch between SNN (True) and ANN twin (False) mode in place (recorded in the spec); returns self."""
        self.spiking = bool(spiking)
        self.spec["spiking"] = self.spiking
        return self

    def __deepcopy__(self, memo) -> "SpikingNetwork":
        """A deep copy whose parametrized layers (masks, quantizers) have classes of their own."""
        replica = self.__new__(type(self))
        memo[id(self)] = replica
        replica.__dict__ = copy.deepcopy(self.__dict__, memo)
        return own_classes(replica)

    def ann_twin(self) -> "SpikingNetwork":
        """A deep copy in ANN mode (ReLU), sharing no tensors with this model."""
        return copy.deepcopy(self).set_spiking(False)

    def activation(self, lif: LIF, x: torch.Tensor, has_time: bool) -> tuple[torch.Tensor, bool]:
        """LIF in SNN mode (broadcasting a time-less input over T first); in ANN mode ReLU, or the LIF's
        clip-floor rate when its ``ann_levels`` is set (:meth:`LIF.ann_rate`)."""
        if not self.spiking:
            return (lif.ann_rate(x) if lif.ann_levels else F.relu(x)), has_time
        if not has_time:
            x = x.unsqueeze(0).expand(self.timesteps, *x.shape)
        return lif(x), True

    def stateless(self, module: nn.Module, x: torch.Tensor, has_time: bool) -> torch.Tensor:
        return fold_time(module, x) if has_time else module(x)

    def run_sequence(self, seq: nn.Sequential, x: torch.Tensor, has_time: bool) -> tuple[torch.Tensor, bool]:
        """Run ``seq``'s modules in order: LIFs through :meth:`activation`, the rest folded over time when it has one.

        ``x`` is ``[T, B, ...]`` when ``has_time`` else ``[B, ...]``; returns the output and whether it has time.
        """
        for m in seq:
            if isinstance(m, LIF):
                x, has_time = self.activation(m, x, has_time)
            elif isinstance(m, TimeDropout):
                x = m(x, has_time)
            else:
                x = self.stateless(m, x, has_time)
        return x, has_time

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` (normalised) -> logits ``[B, classes]`` (SNN: summed over t)."""
        if self.spiking and self.spec.get("encoding", "direct") == "poisson":
            x, has_time = encode(images, self.timesteps, "poisson"), True
        else:
            x, has_time = images, False
        out, has_time = self.run_layers(x, has_time)
        if self.spiking:
            if not has_time:  # a network with no spiking layer still integrates over T
                return out * self.timesteps
            return out.sum(0)
        return out

    def run_layers(self, x: torch.Tensor, has_time: bool) -> tuple[torch.Tensor, bool]:
        raise NotImplementedError

    def spiking_layers(self) -> Iterator[tuple[str, LIF]]:
        """All LIF layers in forward order, with their qualified module names."""
        for name, m in self.named_modules():
            if isinstance(m, LIF):
                yield name, m

    def clamp_neurons(self) -> None:
        """Project every LIF's leak and threshold back into range (after each optimizer step)."""
        for _, lif in self.spiking_layers():
            lif.clamp_()

    def set_lif_backend(self, backend: str) -> None:
        """Use the named :func:`lif_multistep` backend in every LIF layer."""
        for _, lif in self.spiking_layers():
            lif.backend = backend
        self.spec.setdefault("neuron", {})["backend"] = backend


@dataclass
class ChannelGroup:
    """Channels kept or removed together (see :mod:`snncompress.compress.structure` for the fields):
    ``spec_paths`` where the width sits in the spec, ``outputs`` modules indexed along dim 0,
    ``inputs`` ``(module, positions)`` indexed along dim 1, ``lifs`` the spiking layers of the channels."""

    name: str
    size: int
    spec_paths: list[tuple] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    inputs: list[tuple[str, int]] = field(default_factory=list)
    lifs: list[str] = field(default_factory=list)
    #: ``(path, positions)``: where the width times ``positions`` sits (a linear layer's input size after a flatten)
    spec_multiples: list[tuple[tuple, int]] = field(default_factory=list)


def _has_neuron(following: list[tuple[str, nn.Module]]) -> bool:
    """True when a LIF comes after a conv/linear layer before the next conv/linear layer."""
    for _, module in following:
        if isinstance(module, LIF):
            return True
        if isinstance(module, nn.Conv2d | nn.Linear):
            return False
    return False


def sequential_channel_groups(seq: nn.Sequential, prefix: str, spec_key: str, spec_indices: list[int],
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
