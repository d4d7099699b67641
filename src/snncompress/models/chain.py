"""A feed-forward network as a chain of synaptic layers: what a layer-by-layer runtime needs to know.

A deployment target that runs one synaptic layer after another (the C engine, :mod:`snncompress.deploy.c`)
does not care how a family arranges its modules (VGG's ``features`` / ``classifier`` sequences, a graph's
nodes). Each family that is such a chain says so with :meth:`SpikingNetwork.synaptic_chain`, a list of
:class:`ChainUnit`: one convolution or linear layer, the affine map on its output (BatchNorm, a bias, a NIR
``Scale``, a neuron's input gain), its spiking neuron and the pooling of the spikes. Per timestep a unit computes

    current = gain * op(x) + shift          (per output channel)
    spikes  = LIF(current)                  (or, for the last unit without a neuron, the logits)
    events  = pool_k(spikes) * pool_divisor / k^2   (k x k average pooling, or sum pooling: divisor 1)

The unit keeps the modules (their weights are read as they are: masks and quantizers apply) and the per-channel
numbers as float64 tensors ``[out]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..neuron import LIF


@dataclass
class ChainUnit:
    """One synaptic layer of a chain and what follows it up to the next synaptic layer (module docstring)."""

    op: nn.Conv2d | nn.Linear
    gain: torch.Tensor                  # [out] float64, dimensionless
    shift: torch.Tensor | None          # [out] float64 added every step (units of the current); None: none
    lif: LIF | None = None
    leak: torch.Tensor | None = None    # [out] float64, the LIF's leak per output channel
    threshold: torch.Tensor | None = None  # [out] float64
    pool: int = 1                       # k of the k x k pooling of the spikes (1: none)
    pool_divisor: int = 1               # k * k for average pooling, 1 for sum pooling

    @property
    def out_channels(self) -> int:
        return int(self.op.weight.shape[0])

    def set_neuron(self, lif: LIF, leak: torch.Tensor, threshold: torch.Tensor) -> None:
        """Attach ``lif`` with its leak and threshold given per output channel (``[out]``)."""
        self.lif, self.leak, self.threshold = lif, leak.double(), threshold.double()

    def scale_current(self, gain: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Compose ``current -> gain * current + bias`` (``[out]`` each) onto the unit's affine map."""
        gain = gain.double()
        self.gain = self.gain * gain
        if self.shift is not None:
            self.shift = self.shift * gain
        if bias is not None:
            self.shift = bias.double() if self.shift is None else self.shift + bias.double()


def start_unit(op: nn.Conv2d | nn.Linear) -> ChainUnit:
    """A unit for ``op`` with gain 1 and its own bias (if any) as the shift."""
    out = int(op.weight.shape[0])
    bias = None if op.bias is None else op.bias.detach().double().cpu()
    return ChainUnit(op=op, gain=torch.ones(out, dtype=torch.float64), shift=bias)


def batchnorm_affine(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gain, shift)`` float64 ``[C]`` of an eval-mode BatchNorm: ``bn(x) = gain * x + shift`` (a BatchNorm
    without affine parameters has weight 1 and bias 0)."""
    c = bn.num_features
    weight = bn.weight.detach().double().cpu() if bn.weight is not None else torch.ones(c, dtype=torch.float64)
    bias = bn.bias.detach().double().cpu() if bn.bias is not None else torch.zeros(c, dtype=torch.float64)
    gain = weight / torch.sqrt(bn.running_var.detach().double().cpu() + bn.eps)
    return gain, bias - bn.running_mean.detach().double().cpu() * gain


def per_channel(value: torch.Tensor, channels: int) -> torch.Tensor:
    """A scalar or ``[C]`` parameter as float64 ``[C]``."""
    v = value.detach().double().cpu().reshape(-1)
    return v.expand(channels).clone() if v.numel() == 1 else v.clone()
