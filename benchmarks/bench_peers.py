"""The benchmark networks, built the same way in snncompress, SpikingJelly and snnTorch.

Peers are optional (``pip install snncompress[peers]`` or ``pip install
spikingjelly snntorch``); a peer that is not installed is reported and skipped.

Every implementation runs the *same* network with the *same* plumbing, so that
the neuron is the only difference:

* the snncompress model itself (``build_model``): conv1 computed once per image
  and broadcast over T (direct input), stateless layers with time folded into
  the batch, LIF layers on ``[T, B, ...]``, dropout masks held over T;
* :class:`MirrorNet` for the peers: the same layer list from the same spec,
  weights copied from the snncompress model, the same conv1 reuse and time
  folding (what SpikingJelly's ``SeqToANNContainer`` / multi-step mode does), and
  each LIF replaced by the peer's neuron on ``[T, B, ...]``:

  - SpikingJelly: ``LIFNode`` and ``ParametricLIFNode`` (learnable leak) in
    multi-step mode ``'m'`` (their CPU path; the CuPy / Triton backends are
    CUDA-only). Soft reset (``v_reset=None``), ``detach_reset=True`` and
    ``decay_input=False`` so that ``v = (1 - 1/tau) v + I`` is our equation;
    ATan surrogate (a registered fast surrogate in SpikingJelly >= 2). On old
    releases with a ``backend`` argument, ``backend='torch'`` is passed.
    SpikingJelly's threshold is a Python float (not learnable).
  - snnTorch: ``snn.Leaky(learn_beta=True, learn_threshold=True,
    reset_mechanism='subtract')`` stepped over t (snnTorch has no multi-step
    kernel).
"""

from __future__ import annotations

import importlib.metadata
import inspect

import torch
from torch import nn

from snncompress import build_model
from snncompress.models.base import TimeDropout
from snncompress.neuron import LIF

LEAK, THRESHOLD = 0.9, 0.5  # leak 0.9 = 1 - 1/tau with tau = 10


def peer_versions() -> dict[str, str | None]:
    out = {}
    for name in ("spikingjelly", "snntorch"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# ------------------------------------------------------------------------------------ neurons
class PeerNeuron(nn.Module):
    """Base of the neuron wrappers: multi-step ``[T, B, ...]`` in, spikes out."""


class SJNeuron(PeerNeuron):
    """A SpikingJelly multi-step node on ``[T, B, ...]`` (state reset at every call)."""

    def __init__(self, parametric: bool):
        super().__init__()
        from spikingjelly.activation_based import neuron as sjn
        from spikingjelly.activation_based import surrogate as sjs

        cls = sjn.ParametricLIFNode if parametric else sjn.LIFNode
        kwargs = dict(decay_input=False, v_threshold=THRESHOLD, v_reset=None, detach_reset=True,
                      surrogate_function=sjs.ATan(), step_mode="m")
        kwargs["init_tau" if parametric else "tau"] = 1.0 / (1.0 - LEAK)
        if "backend" in inspect.signature(cls.__init__).parameters:
            kwargs["backend"] = "torch"
        self.node = cls(**kwargs)

    def forward(self, x):
        self.node.reset()
        return self.node(x)


class SnnTorchNeuron(PeerNeuron):
    """snnTorch ``Leaky`` with learnable beta and threshold, stepped over t."""

    def __init__(self):
        super().__init__()
        import snntorch as snn

        self.node = snn.Leaky(beta=LEAK, threshold=THRESHOLD, learn_beta=True, learn_threshold=True,
                              reset_mechanism="subtract")

    def forward(self, x):
        mem = self.node.init_leaky()
        out = []
        for t in range(x.shape[0]):
            spk, mem = self.node(x[t], mem)
            out.append(spk)
        return torch.stack(out)


class ReferenceNeuron(PeerNeuron):
    """snncompress's reference LIF equations (used to check MirrorNet == snncompress model)."""

    def forward(self, x):
        from snncompress.neuron import lif_multistep

        return lif_multistep(x, torch.tensor(LEAK), torch.tensor(THRESHOLD))


NEURONS = {
    "spikingjelly LIFNode": lambda: SJNeuron(False),
    "spikingjelly PLIFNode": lambda: SJNeuron(True),
    "snntorch Leaky": SnnTorchNeuron,
}
PEER_OF = {"spikingjelly LIFNode": "spikingjelly", "spikingjelly PLIFNode": "spikingjelly",
           "snntorch Leaky": "snntorch"}


def peer_available(name: str) -> bool:
    return peer_versions()[PEER_OF[name]] is not None


# ----------------------------------------------------------------------------------- networks
NETWORKS = {
    # name: (arch, in_shape, T, batch)
    "vgg5": ("vgg5", (3, 32, 32), 5, 32),
    "convnet": ("convnet", (1, 28, 28), 4, 128),
}


def snncompress_net(arch: str, in_shape, timesteps: int, backend: str = "auto"):
    """The snncompress network (SNN mode), leak / threshold as the peers start."""
    torch.manual_seed(0)
    return build_model(arch, 10, in_shape, timesteps,
                       neuron={"backend": backend, "leak": LEAK, "threshold": THRESHOLD})


class MirrorNet(nn.Module):
    """The snncompress VGG / convnet layer list with a pluggable multi-step neuron.

    Images ``[B, C, H, W]`` -> logits ``[B, classes]`` (sum over t), exactly the
    computation of :class:`snncompress.models.vgg.SpikingVGG` with its LIF swapped.
    """

    def __init__(self, model, neuron_factory):
        super().__init__()
        self.timesteps = model.timesteps

        def convert(seq):
            return nn.ModuleList(neuron_factory() if isinstance(m, LIF) else _copy_layer(m) for m in seq)

        self.features = convert(model.features)
        self.classifier = convert(model.classifier)

    def _run(self, seq, x, has_time):
        for m in seq:
            if isinstance(m, PeerNeuron):
                if not has_time:  # direct input: conv1 once, broadcast over T
                    x, has_time = x.unsqueeze(0).expand(self.timesteps, *x.shape), True
                x = m(x)
            elif isinstance(m, TimeDropout):
                x = m(x, has_time)
            elif has_time:
                t, b = x.shape[:2]
                y = m(x.reshape(t * b, *x.shape[2:]))
                x = y.reshape(t, b, *y.shape[1:])
            else:
                x = m(x)
        return x, has_time

    def forward(self, images):
        x, has_time = self._run(self.features, images, False)
        x = x.flatten(2) if has_time else x.flatten(1)
        x, has_time = self._run(self.classifier, x, has_time)
        return x.sum(0) if has_time else x * self.timesteps


def _copy_layer(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m)


def build(impl: str, net: str, timesteps: int | None = None):
    """``(model, images_per_step_factor)`` for implementation ``impl`` on network ``net``.

    impl: "snncompress", "snncompress reference", a key of :data:`NEURONS`, or "ann twin"
    (the snncompress model's ReLU twin, which must be fed T x B images).
    """
    arch, in_shape, t_default, _ = NETWORKS[net]
    steps = timesteps or t_default
    if impl == "snncompress":
        return snncompress_net(arch, in_shape, steps)
    if impl == "snncompress reference":
        return snncompress_net(arch, in_shape, steps, backend="reference")
    if impl == "ann twin":
        return snncompress_net(arch, in_shape, steps).ann_twin()
    base = snncompress_net(arch, in_shape, steps)
    return MirrorNet(base, NEURONS[impl])
