"""The ``graph`` family: a network built from the topology of an imported graph (a NIR graph from snnTorch,
Norse, Sinabs, Rockpool or this package), not from a name.

The spec holds the graph: ``spec["graph"] = {"nodes": [...], "edges": [[source, target], ...]}``, each node
a dict with its ``name`` (the graph's own node name), its ``kind`` and the sizes its module needs:

==============  ==========================================================================================
kind            module and what it computes on one timestep (shapes without batch and time)
==============  ==========================================================================================
``input``       the network's input, ``shape`` = ``spec["in_shape"]``
``output``      the network's output; the logits are its values summed over the ``T`` steps
``conv1d/2d``   ``nn.Conv1d`` / ``nn.Conv2d`` (``in_channels``, ``out_channels``, ``kernel``, ``stride``,
                ``padding``, ``dilation``, ``groups``, ``bias``)
``linear``      ``nn.Linear`` without bias; ``affine``: with bias (``in_features``, ``out_features``)
``scale``       :class:`Scale`: ``x * scale`` elementwise (``shape``)
``flatten``     flattens dims ``start_dim`` .. ``end_dim`` (counted without the batch dimension, as NIR does)
``sumpool2d``   2-d sum pooling; ``avgpool2d``: average pooling (``kernel``, ``stride``, ``padding``)
``lif``, ``if`` :class:`GraphNeuron`: this package's :class:`~snncompress.neuron.LIF` on ``gain * x + bias``
``cubalif``     :class:`GraphNeuron` with a synaptic current (:class:`SynapticCurrent`) in front
``li``          :class:`LeakyIntegrator`: a membrane without spikes (a readout)
==============  ==========================================================================================

Several edges into one node sum their sources (NIR's convention). The spec's ``dt`` (seconds) and
``integration`` say how the graph's continuous neurons were made discrete when it was imported (see
:mod:`snncompress.deploy.nir.graph`); the modules themselves hold only the discrete values (leak, threshold,
gains), so the network computes the same with or without them.

Time: stateless nodes see ``[T*B, ...]`` (time folded into batch); everything before the first neuron runs
once per image and is broadcast over ``T`` (direct input), as in every family. ``forward`` also takes an
input sequence ``[T, B, *in_shape]`` (spike trains from an event camera, the frameworks' own batch layout
made time-major), whose ``T`` then replaces the spec's.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..neuron import LIF
from .base import ChannelGroup, FamilyOptions, SpikingNetwork, fold_time
from .chain import ChainUnit, start_unit

#: Node kinds the graph family builds (the names its spec uses).
GRAPH_NODE_KINDS = ("input", "output", "conv1d", "conv2d", "linear", "affine", "scale", "flatten", "sumpool2d",
                    "avgpool2d", "lif", "if", "cubalif", "li")
#: Kinds whose modules hold state over time.
NEURON_KINDS = ("lif", "if", "cubalif", "li")
#: How a per-neuron parameter is stored: one value per layer, per channel (dim 0 of the node's shape) or per neuron.
PARAM_LAYOUTS = ("layer", "channel", "neuron")


def param_shape(layout: str, shape: list[int]) -> tuple[int, ...]:
    """The stored shape of a neuron parameter of ``layout`` in a layer of neuron ``shape`` (without batch)."""
    if layout == "layer":
        return ()
    if layout == "channel":
        return (int(shape[0]),)
    if layout == "neuron":
        return tuple(int(v) for v in shape)
    raise ValueError(f"unknown parameter layout {layout!r}; choose one of {PARAM_LAYOUTS}")


def _broadcast(p: torch.Tensor, layout: str, ndim: int) -> torch.Tensor:
    """Shape a stored parameter to broadcast over ``[B, *shape]`` (``ndim`` dims in all)."""
    if layout == "channel":
        return p.view(-1, *([1] * (ndim - 2)))
    return p  # a scalar, or the full neuron shape (broadcasts over the batch dimension)


class NeuronLIF(LIF):
    """This package's LIF with a parameter layout of ``"layer"``, ``"channel"`` or ``"neuron"`` (one leak and
    threshold per neuron of shape ``shape``; runs the reference loop, which broadcasts any shape)."""

    def __init__(self, layout: str, shape: list[int], **options):
        channels = int(shape[0]) if layout == "channel" else None
        self.layout = layout
        super().__init__(**options, per_channel=layout == "channel", num_channels=channels)
        if layout == "neuron":
            for name in ("leak", "threshold"):
                value = torch.full(param_shape(layout, shape), float(getattr(self, name).detach()))
                trainable = isinstance(getattr(self, name), nn.Parameter)
                delattr(self, name)
                self._register(name, value, trainable)

    @property
    def backend(self) -> str:
        """The LIF backend; always ``"reference"`` for per-neuron parameters (the fused kernels take one value per
        layer or per channel), whatever :meth:`SpikingNetwork.set_lif_backend` asked for."""
        return "reference" if self.layout == "neuron" else self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = value

    def _broadcast(self, p: torch.Tensor, ndim: int) -> torch.Tensor:
        return _broadcast(p, self.layout, ndim)


class SynapticCurrent(nn.Module):
    """The synaptic current of a current-based LIF, a linear filter over time.

    ``I[t] = decay * I[t-1] + gain * x[t]`` from ``I[-1] = 0``; input ``x`` ``[T, B, ...]`` (units of the
    presynaptic signal), output ``I`` ``[T, B, ...]`` (units of the membrane's input). ``decay = 1 - dt/tau_syn``
    and ``gain = dt/tau_syn * w_in`` (forward Euler) or ``w_in`` (inputs as jumps); both in the layout of the node.
    """

    def __init__(self, layout: str, shape: list[int]):
        super().__init__()
        self.layout = layout
        self.register_buffer("decay", torch.zeros(param_shape(layout, shape)))
        self.register_buffer("gain", torch.ones(param_shape(layout, shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        decay = _broadcast(self.decay, self.layout, x.dim() - 1)
        gain = _broadcast(self.gain, self.layout, x.dim() - 1)
        current, out = torch.zeros_like(x[0]), []
        for t in range(x.shape[0]):
            current = decay * current + gain * x[t]
            out.append(current)
        return torch.stack(out)


class GraphNeuron(nn.Module):
    """A spiking node: ``lif`` (:class:`NeuronLIF`) driven by ``gain * x + bias``, optionally behind a
    :class:`SynapticCurrent` (``synapse``, a CubaLIF node).

    Input ``[T, B, *shape]`` (or the network feeds it through :meth:`SpikingNetwork.activation`), output spikes
    ``[T, B, *shape]``. ``gain`` (dimensionless; ``dt r / tau`` of a NIR LIF, ``dt r`` of an IF) and ``bias``
    (``(1 - leak) v_leak``, units of the membrane) are buffers in the node's layout, present only where they
    are not 1 and 0.
    """

    def __init__(self, node: dict, neuron: dict):
        super().__init__()
        shape, layout = list(node["shape"]), node.get("layout", "layer")
        self.layout = layout
        options = {k: v for k, v in neuron.items() if k not in ("per_channel", "leak", "threshold", "reset")}
        if node["kind"] == "if":
            options["learn_leak"] = False  # an IF node stays one (leak 1) through training
        self.lif = NeuronLIF(layout, shape, reset=node.get("reset", "hard"), **options)
        self.synapse = SynapticCurrent(layout, shape) if node["kind"] == "cubalif" else None
        for name, present in (("gain", node.get("gain", False)), ("bias", node.get("bias", False))):
            if present:
                self.register_buffer(name, torch.ones(param_shape(layout, shape)) if name == "gain"
                                     else torch.zeros(param_shape(layout, shape)))
            else:
                setattr(self, name, None)

    def current(self, x: torch.Tensor) -> torch.Tensor:
        """The membrane's input ``[T, B, ...]`` from the node's input ``x`` ``[T, B, ...]``."""
        if self.synapse is not None:
            x = self.synapse(x)
        if self.gain is not None:
            x = x * _broadcast(self.gain, self.layout, x.dim() - 1)
        if self.bias is not None:
            x = x + _broadcast(self.bias, self.layout, x.dim() - 1)
        return x


class LeakyIntegrator(nn.Module):
    """A leaky integrator without spikes (NIR ``LI``, a readout): ``v[t] = leak * v[t-1] + gain * x[t] + bias``.

    Input ``[T, B, *shape]``, output the membrane ``v`` ``[T, B, *shape]`` (units of the input times ``gain``).
    """

    def __init__(self, node: dict):
        super().__init__()
        shape, layout = list(node["shape"]), node.get("layout", "layer")
        self.layout = layout
        self.register_buffer("leak", torch.ones(param_shape(layout, shape)))
        self.register_buffer("gain", torch.ones(param_shape(layout, shape)))
        self.register_buffer("bias", torch.zeros(param_shape(layout, shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leak, gain, bias = (_broadcast(p, self.layout, x.dim() - 1) for p in (self.leak, self.gain, self.bias))
        v, out = torch.zeros_like(x[0]), []
        for t in range(x.shape[0]):
            v = leak * v + gain * x[t] + bias
            out.append(v)
        return torch.stack(out)


class Scale(nn.Module):
    """NIR ``Scale``: ``x * scale`` elementwise; ``scale`` has the node's shape (without batch)."""

    def __init__(self, shape: list[int]):
        super().__init__()
        self.register_buffer("scale", torch.ones(tuple(int(v) for v in shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Flatten(nn.Module):
    """NIR ``Flatten``: dims ``start_dim`` .. ``end_dim`` of a sample (no batch dimension counted) into one."""

    def __init__(self, start_dim: int, end_dim: int):
        super().__init__()
        self.start_dim, self.end_dim = int(start_dim), int(end_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sample_dims = x.dim() - 1
        start = self.start_dim % sample_dims + 1
        end = self.end_dim % sample_dims + 1
        return x.flatten(start, end)


def _stateless_module(node: dict) -> nn.Module:
    kind = node["kind"]
    if kind in ("conv1d", "conv2d"):
        conv = nn.Conv1d if kind == "conv1d" else nn.Conv2d
        padding = node["padding"] if isinstance(node["padding"], str) else tuple(node["padding"])
        return conv(int(node["in_channels"]), int(node["out_channels"]), tuple(node["kernel"]),
                    stride=tuple(node["stride"]), padding=padding, dilation=tuple(node["dilation"]),
                    groups=int(node["groups"]), bias=bool(node["bias"]))
    if kind in ("linear", "affine"):
        return nn.Linear(int(node["in_features"]), int(node["out_features"]), bias=kind == "affine")
    if kind == "scale":
        return Scale(node["shape"])
    if kind == "flatten":
        return Flatten(node["start_dim"], node["end_dim"])
    if kind in ("sumpool2d", "avgpool2d"):
        return nn.AvgPool2d(tuple(node["kernel"]), tuple(node["stride"]), tuple(node["padding"]),
                            divisor_override=1 if kind == "sumpool2d" else None)
    if kind in ("input", "output"):
        return nn.Identity()
    raise ValueError(f"node {node.get('name')!r} has unknown kind {kind!r}; the graph family builds "
                     f"{', '.join(GRAPH_NODE_KINDS)}")


def _channel_values(value: torch.Tensor, layout: str, channels: int, node: str) -> torch.Tensor:
    """A node's parameter stored in ``layout`` as float64 ``[channels]`` (one value per output channel);
    ValueError when a per-neuron parameter differs within a channel (a chain unit has one per channel)."""
    v = value.detach().double().cpu()
    if layout == "layer" or v.numel() == 1:
        return v.reshape(1).expand(channels).clone()
    v = v.reshape(channels, -1)
    if not torch.equal(v, v[:, :1].expand_as(v)):
        raise ValueError(f"node {node!r} has per-neuron values that differ within a channel")
    return v[:, 0].clone()


def _chain_pool(unit: ChainUnit, name: str, kind: str, node: dict) -> None:
    """Add a pooling node of the spikes to ``unit``: square, stride = kernel, no padding."""
    kernel, stride, padding = list(node["kernel"]), list(node["stride"]), list(node["padding"])
    if unit.lif is None:
        raise ValueError(f"pooling node {name!r} pools currents (no neuron before it); the chain pools spikes")
    if len(set(kernel)) != 1 or stride != kernel or any(padding):
        raise ValueError(f"pooling node {name!r} is not k x k with stride k and no padding (kernel {kernel}, "
                         f"stride {stride}, padding {padding})")
    unit.pool *= int(kernel[0])
    unit.pool_divisor *= 1 if kind == "sumpool2d" else int(kernel[0]) ** 2


def module_key(name: str, taken: set[str]) -> str:
    """A ``ModuleDict`` key for node ``name`` (dots and other non-identifier characters become ``_``; unique)."""
    key = "".join(c if c.isalnum() or c == "_" else "_" for c in str(name)) or "node"
    if key[0].isdigit():
        key = f"n{key}"
    base, i = key, 1
    while key in taken:
        i += 1
        key = f"{base}_{i}"
    return key


def topological_order(names: list[str], edges: list[tuple[str, str]]) -> list[str]:
    """``names`` sorted so that every edge goes forward (Kahn's algorithm, ties in the given order).

    Raises ValueError naming the nodes on a cycle, or an edge to an unknown node.
    """
    known = set(names)
    for source, target in edges:
        if source not in known or target not in known:
            raise ValueError(f"edge {source!r} -> {target!r} names a node the graph does not have")
    incoming = {n: 0 for n in names}
    successors: dict[str, list[str]] = {n: [] for n in names}
    for source, target in edges:
        incoming[target] += 1
        successors[source].append(target)
    ready = [n for n in names if incoming[n] == 0]
    order = []
    while ready:
        node = ready.pop(0)
        order.append(node)
        for nxt in successors[node]:
            incoming[nxt] -= 1
            if incoming[nxt] == 0:
                ready.append(nxt)
    if len(order) != len(names):
        cyclic = [n for n in names if n not in order]
        raise ValueError(f"the graph has a cycle through {', '.join(map(repr, cyclic))} (recurrent connections "
                         f"are not supported)")
    return order


class GraphOptions(FamilyOptions):
    """The graph family has no options in a recipe: its networks come from an imported file."""


class GraphNetwork(SpikingNetwork):
    """A network built from ``spec["graph"]`` (see the module docstring): any feed-forward DAG of the kinds in
    :data:`GRAPH_NODE_KINDS`, one module per node in ``self.nodes`` (keys from :func:`module_key`)."""

    FAMILY = "graph"
    ARCHS: ClassVar[tuple[str, ...]] = ()  # not built by name: only from an imported graph's spec
    EXPORTS = frozenset({"nir", "c"})

    @classmethod
    def make_spec(cls, name: str, **options) -> dict:
        raise ValueError("graph networks are imported (snncompress import FILE.nir), not built by name")

    def channel_groups(self) -> list[ChannelGroup]:
        """One group per conv / linear layer followed by a neuron, when the graph is a single path of conv2d,
        conv1d, linear and affine layers (``groups`` 1) with Scale, neuron, pooling and flatten nodes between them:
        the group narrows the layer's outputs, every node up to the next layer (its shape's first entry, its
        per-channel or per-neuron values) and the next layer's inputs. ValueError otherwise."""
        index = {str(node["name"]): i for i, node in enumerate(self.spec["graph"]["nodes"])}
        groups: list[ChannelGroup] = []
        current: ChannelGroup | None = None
        for name in self._single_path("channel surgery"):
            kind, node = self.kinds[name], self.spec["graph"]["nodes"][index[name]]
            at, module = ("graph", "nodes", index[name]), f"nodes.{self.keys[name]}"
            if kind in ("conv1d", "conv2d", "linear", "affine"):
                if kind.startswith("conv") and node["groups"] != 1:
                    raise ValueError(f"channel surgery: node {name!r} is a grouped convolution")
                if current is not None:
                    size = "in_channels" if kind.startswith("conv") else "in_features"
                    flattened = not kind.startswith("conv") and node["in_features"] != current.size
                    if flattened:
                        current.spec_multiples.append(((*at, size), node["in_features"] // current.size))
                    else:
                        current.spec_paths.append((*at, size))
                    current.inputs.append((module, node["in_features"] // current.size if flattened else 1))
                current = ChannelGroup(module, int(node.get("out_channels", node.get("out_features"))),
                                       [(*at, "out_channels" if kind.startswith("conv") else "out_features")],
                                       [module])
                groups.append(current)
            elif current is not None and kind in ("scale", "lif", "if", "cubalif", "li"):
                current.spec_paths.append((*at, "shape", 0))
                current.outputs.append(module)
                if kind in ("lif", "if", "cubalif"):
                    current.lifs.append(f"{module}.lif")
            elif current is not None and kind == "flatten":
                current.spec_paths.append((*at, "input_shape", 0))
        return [g for g in groups if g.lifs and g is not current]  # the output layer's channels are the classes

    def _single_path(self, what: str) -> list[str]:
        """The node names from input to output when the graph is one path; ValueError naming a join or split."""
        for name in self.order:
            successors = sum(name in self.sources[b] for b in self.order)
            if len(self.sources[name]) > 1 or successors > 1:
                raise ValueError(f"{what}: node {name!r} ({self.kinds[name]}) joins or splits the graph; only a "
                                 f"graph that is one path from input to output has it")
        return list(self.order)

    def block_ends(self):
        raise ValueError("attention transfer is not available for imported graph networks")

    def synaptic_chain(self) -> list[ChainUnit]:
        """The graph as a chain (:mod:`snncompress.models.chain`) when it is one: a single path from input to
        output of conv2d / linear / affine layers, each followed by Scale nodes, an IF or LIF neuron (its input
        gain and bias folded into the unit) and sum or average pooling of its spikes, with a flatten before the
        first linear layer. ValueError naming the first node that does not fit."""
        nodes = {str(node["name"]): node for node in self.spec["graph"]["nodes"]}
        units: list[ChainUnit] = []
        for name in self._single_path("a chain"):
            kind, module = self.kinds[name], self.node_module(name)
            if kind in ("conv2d", "linear", "affine"):
                units.append(start_unit(module))
            elif kind in ("input", "output"):
                continue
            elif not units:
                raise ValueError(f"node {name!r} ({kind}) comes before the first conv2d / linear layer")
            elif kind in ("lif", "if"):
                self._chain_neuron(units[-1], name, module)
            elif kind == "scale":
                if units[-1].lif is not None:
                    raise ValueError(f"Scale node {name!r} scales spikes (it follows a neuron)")
                units[-1].scale_current(_channel_values(module.scale, "neuron", units[-1].out_channels, name))
            elif kind in ("sumpool2d", "avgpool2d"):
                _chain_pool(units[-1], name, kind, nodes[name])
            elif kind == "flatten":
                dims = len(nodes[name].get("input_shape", [0, 0, 0]))
                if nodes[name]["start_dim"] % dims != 0 or nodes[name]["end_dim"] % dims != dims - 1:
                    raise ValueError(f"Flatten node {name!r} flattens part of a sample (dims "
                                     f"{nodes[name]['start_dim']}..{nodes[name]['end_dim']}), not all of it")
            else:
                reason = {"cubalif": "its synaptic current is a second state per neuron",
                          "li": "a leaky readout membrane is not a sum of currents",
                          "conv1d": "one-dimensional convolution"}.get(kind, "")
                raise ValueError(f"node {name!r} is {kind} ({reason}), outside a chain of conv2d / linear "
                                 f"layers with IF / LIF neurons")
        return units

    @staticmethod
    def _chain_neuron(unit: ChainUnit, name: str, neuron: "GraphNeuron") -> None:
        """Fold an IF / LIF node's input gain and bias into ``unit`` and attach its LIF."""
        if unit.lif is not None:
            raise ValueError(f"neuron node {name!r} follows another neuron without a synaptic layer between")
        channels, layout = unit.out_channels, neuron.layout
        gain = torch.ones(channels) if neuron.gain is None else _channel_values(neuron.gain, layout, channels, name)
        bias = None if neuron.bias is None else _channel_values(neuron.bias, layout, channels, name)
        unit.scale_current(gain, bias)
        unit.set_neuron(neuron.lif, _channel_values(neuron.lif.leak, layout, channels, name),
                        _channel_values(neuron.lif.threshold, layout, channels, name))

    def __init__(self, spec: dict):
        super().__init__(spec)
        graph = self.spec["graph"]
        nodes = {str(node["name"]): node for node in graph["nodes"]}
        if len(nodes) != len(graph["nodes"]):
            raise ValueError("two nodes of the graph share a name")
        edges = [(str(a), str(b)) for a, b in graph["edges"]]
        self.order = topological_order(list(nodes), edges)
        self.sources = {name: [a for a, b in edges if b == name] for name in nodes}
        inputs = [n for n, node in nodes.items() if node["kind"] == "input"]
        outputs = [n for n, node in nodes.items() if node["kind"] == "output"]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"a graph network needs one input and one output node, found {len(inputs)} and "
                             f"{len(outputs)}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.kinds = {name: node["kind"] for name, node in nodes.items()}
        self.keys: dict[str, str] = {}
        self.nodes = nn.ModuleDict()
        neuron = dict(self.spec.get("neuron", {}))
        for name in self.order:
            node = nodes[name]
            key = module_key(name, set(self.keys.values()))
            self.keys[name] = key
            if node["kind"] in ("lif", "if", "cubalif"):
                self.nodes[key] = GraphNeuron(node, neuron)
            elif node["kind"] == "li":
                self.nodes[key] = LeakyIntegrator(node)
            else:
                self.nodes[key] = _stateless_module(node)

    def node_module(self, name: str) -> nn.Module:
        """The module of the graph node called ``name`` (its name in the imported file)."""
        return self.nodes[self.keys[name]]

    def node_names(self) -> dict[str, str]:
        """``{qualified module name: graph node name}`` for every node (e.g. ``"nodes.n1.lif": "1"`` for a
        neuron's LIF), to report per-layer numbers under the graph's own names."""
        names = {}
        for name, key in self.keys.items():
            names[f"nodes.{key}"] = name
            if isinstance(self.nodes[key], GraphNeuron):
                names[f"nodes.{key}.lif"] = name
        return names

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, *in_shape]`` (encoded over the spec's ``T``) or a sequence ``[T, B, *in_shape]``
        -> logits ``[B, classes]``: the output node summed over the steps (SNN mode)."""
        if images.dim() == len(self.spec["in_shape"]) + 2 and self.spiking:
            out, has_time = self.run_layers(images, True)
            return out.sum(0) if has_time else out * images.shape[0]
        return super().forward(images)

    def run_layers(self, x: torch.Tensor, has_time: bool):
        values: dict[str, tuple[torch.Tensor, bool]] = {}
        for name in self.order:
            module = self.nodes[self.keys[name]]
            if name == self.input_name:
                values[name] = (x, has_time)
                continue
            incoming = [values[s] for s in self.sources[name]]
            if not incoming:
                raise ValueError(f"node {name!r} has no input")
            value, timed = self._sum(incoming)
            values[name] = self._run_node(self.kinds[name], module, value, timed)
        out, has_time = values[self.output_name]
        return out.flatten(2 if has_time else 1), has_time  # logits: one value per output neuron

    def _sum(self, incoming: list[tuple[torch.Tensor, bool]]) -> tuple[torch.Tensor, bool]:
        """The sum of a node's inputs; a time-less one is broadcast over T when another has time."""
        if len(incoming) == 1:
            return incoming[0]
        steps = next((v.shape[0] for v, timed in incoming if timed), None)
        total = None
        for value, timed in incoming:
            if steps is not None and not timed:
                value = value.unsqueeze(0).expand(steps, *value.shape)
            total = value if total is None else total + value
        return total, steps is not None

    def _with_time(self, x: torch.Tensor, has_time: bool) -> torch.Tensor:
        return x if has_time else x.unsqueeze(0).expand(self.timesteps, *x.shape)

    def _run_node(self, kind: str, module: nn.Module, x: torch.Tensor, has_time: bool) -> tuple[torch.Tensor, bool]:
        if kind in ("lif", "if", "cubalif"):
            if not self.spiking:  # the ANN twin: ReLU in place of the neuron
                return F.relu(x), has_time
            return self.activation(module.lif, module.current(self._with_time(x, has_time)), True)
        if kind == "li":
            if not self.spiking:
                return x, has_time
            return module(self._with_time(x, has_time)), True
        return self.stateless(module, x, has_time), has_time

    def stateless(self, module: nn.Module, x: torch.Tensor, has_time: bool) -> torch.Tensor:
        return fold_time(module, x) if has_time else module(x)


GraphNetwork.Options = GraphOptions
