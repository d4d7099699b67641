"""Bring your own SNN: a NIR graph from any framework as a :class:`~snncompress.models.GraphNetwork`, and back.

Import (:func:`import_graph`)
-----------------------------

Every node becomes one module of the graph family, in the graph's own topology (edges into one node sum).
Shapes are propagated from the input shape (the ``Input`` node's, or ``input_shape``), so exporters that
leave types out or scalar parameters are fine. The continuous neurons of NIR are made discrete with the
step ``dt`` (seconds; the graph's metadata ``dt`` if it has one, else the caller's):

==========  ===============================================================================================
NIR node    discrete form (``a = dt / tau``; per neuron, reduced to one value per layer or channel if equal)
==========  ===============================================================================================
``LIF``     this package's LIF: ``v[t] = (1 - a) v[t-1] + a r x[t] + a v_leak``, i.e. ``leak = 1 - a``,
            input ``gain = a r`` (1 for snnTorch's export), ``bias = a v_leak``; spike at ``v >= v_threshold``
``IF``      ``leak = 1``, ``gain = dt r`` (``integration="euler"``) or ``r`` (``"jump"``: Norse's and
            Sinabs' IF add the input itself)
``CubaLIF`` a synaptic current ``I[t] = (1 - dt/tau_syn) I[t-1] + g x[t]`` with ``g = dt/tau_syn w_in``
            (``"euler"``: snnTorch's ``Synaptic``) or ``w_in`` (``"jump"``: Norse's ``LIFCell``), then the
            LIF above on ``I``
``LI``      a leaky integrator without spikes (``leak``, ``gain``, ``bias`` as for LIF): a readout
==========  ===============================================================================================

``integration="rockpool"`` is Rockpool's discretisation: decays ``exp(-dt/tau)``, inputs added as they are to
an LIF membrane, and into a CubaLIF's synaptic current before its decay (``I[t] = e^{-dt/tau_syn} (I[t-1] +
x[t])``, membrane gain 1); ``r`` and ``w_in`` are not read (Rockpool writes ``r = tau e^{-dt/tau} / dt``).

The reset: NIR neurons reset to ``v_reset`` (only 0 is taken: this package's neurons reset to 0), i.e.
a hard reset; a node whose metadata says ``reset: subtract`` (this package's own export) gets the soft
reset. A gain within float32 rounding of 1 (``|gain - 1| <= 1e-6``: ``r = tau/dt`` stored in float32) is
exactly 1. Refused, each with one line naming the node: a node kind outside :data:`SUPPORTED_NODES`, a
cycle (recurrent connections), a nested graph, ``v_reset != 0``, a neuron parameter that cannot be
broadcast to its layer's shape, a time step the graph does not record and the caller does not give.

Export (:func:`export_graph`)
-----------------------------

The inverse map, node by node, in NIR's own form (the ODE under forward Euler with the spec's ``dt``): the
framework's importer gets back the kinds it wrote. A model imported with ``integration="jump"`` is written
with what its gains mean in the ODE (an IF's ``r = gain / dt``, a CubaLIF's ``w_in = gain tau_syn / dt``).
A model imported with ``integration="rockpool"`` is written as Rockpool writes and reads it
(``tau = -dt / ln(leak)``, ``r = tau / dt - 1`` from which Rockpool's importer takes its ``dt``). Masked and
quantized weights are written as what the model computes with (zeros under the mask, ``codes * scale``); the
mask and codes travel as node metadata, the spec as graph metadata ``snncompress_spec`` so
:func:`snncompress.load` rebuilds the compressed, trainable model (nir 1.0.4, which Sinabs pins, has no node
metadata: there the values travel, the masks and codes do not).
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from ...compress.masks import original, set_masks
from ...compress.quantizers import attach_quantizer
from ...compress.state import stored_tensors
from ...errors import UserError
from ...models import GraphNetwork, build_from_spec
from ...models.base import NEURON_DEFAULTS
from ...models.graph import topological_order
from .mapping import LEAK_TOLERANCE, NIR_FORMAT, make_node, require_nir, restore_compression

#: NIR node types the graph family takes, by their NIR class name.
SUPPORTED_NODES = ("Input", "Output", "Conv1d", "Conv2d", "Linear", "Affine", "Scale", "Flatten", "SumPool2d",
                   "AvgPool2d", "IF", "LIF", "CubaLIF", "LI")
#: How an input enters an IF membrane and a CubaLIF's synaptic current (see the module docstring).
INTEGRATIONS = ("euler", "jump", "rockpool")
#: Reset rules an import may impose on every spiking node (default: the graph's, i.e. v_reset = 0: "zero").
RESETS = ("zero", "subtract")
#: A neuron's input gain this close to 1 is 1 (``r = tau / dt`` rounded to float32).
GAIN_ONE_TOLERANCE = 1e-6


def _a(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def _ints(value, n: int) -> list[int]:
    """An int or sequence as ``n`` ints (NIR stores kernel sizes, strides and paddings either way)."""
    flat = np.ravel(np.asarray(value if not isinstance(value, torch.Tensor) else value.cpu().numpy()))
    if flat.size == 1:
        return [int(flat[0])] * n
    if flat.size != n:
        raise ValueError(f"expected {n} values, got {flat.size}")
    return [int(v) for v in flat]


def _conv_out(size: list[int], kernel, stride, padding, dilation) -> list[int]:
    return [int(math.floor((size[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) / stride[i] + 1))
            for i in range(len(size))]


def _type_shape(types) -> list[int] | None:
    """The one shape in a NIR ``input_type`` / ``output_type`` dict, or None."""
    if not types:
        return None
    values = list(types.values()) if isinstance(types, dict) else [types]
    if len(values) != 1 or values[0] is None:
        return None
    shape = np.ravel(np.asarray(values[0]))
    return [int(v) for v in shape] if shape.size else None


class _Layout:
    """Per-neuron parameter arrays of one node, reduced together to one layout (layer, channel or neuron)."""

    def __init__(self, name: str, shape: list[int]):
        self.name, self.shape = name, list(shape)

    def full(self, what: str, value) -> np.ndarray:
        try:
            return np.broadcast_to(_a(value), tuple(self.shape)).astype(np.float64)
        except ValueError:
            raise UserError(f"node {self.name}: {what} of shape {tuple(np.shape(_a(value)))} does not fit the "
                            f"layer's shape {tuple(self.shape)}") from None

    def choose(self, arrays: list[np.ndarray]) -> str:
        if all(np.all(a == a.reshape(-1)[0]) for a in arrays):
            return "layer"
        rows = [a.reshape(self.shape[0], -1) for a in arrays]
        if all(np.all(r == r[:, :1]) for r in rows):
            return "channel"
        return "neuron"

    @staticmethod
    def stored_shape(size: int, shape: list[int]) -> tuple[int, ...]:
        """How ``size`` values broadcast over a layer of ``shape``: one per neuron, per channel, or one."""
        if size == int(np.prod(shape)):
            return tuple(shape)
        if size == shape[0]:
            return (-1, *([1] * (len(shape) - 1)))
        if size == 1:
            return ()
        raise UserError(f"{size} values do not fit a layer of shape {tuple(shape)}")

    @staticmethod
    def reduce(array: np.ndarray, layout: str) -> np.ndarray:
        if layout == "layer":
            return np.array(array.reshape(-1)[0])
        if layout == "channel":
            return array.reshape(array.shape[0], -1)[:, 0].copy()
        return array


def _reject(name: str, node) -> None:
    nir = require_nir()
    kind = type(node).__name__
    if node is None:
        raise UserError(f"node {name} is empty: the exporter could not convert that layer (Norse 1.1's to_nir has "
                        f"no pooling or flatten); remove the layer or export it another way")
    if isinstance(node, nir.NIRGraph):
        raise UserError(f"node {name} is a nested NIRGraph (a recurrent layer or subgraph); the graph family takes "
                        f"flat feed-forward graphs of {', '.join(SUPPORTED_NODES)}")
    if kind not in SUPPORTED_NODES:
        raise UserError(f"node {name} is a NIR {kind}, which snncompress cannot import; supported: "
                        f"{', '.join(SUPPORTED_NODES)}")


class _Importer:
    """Builds the spec and the tensors of a foreign graph (one pass in topological order)."""

    def __init__(self, graph, *, dt: float | None, integration: str, reset: str | None = None):
        self.graph, self.dt, self.integration, self.reset = graph, dt, integration, reset
        self.tensors: dict[str, dict[str, np.ndarray]] = {}  # node name -> {parameter: array}

    def need_dt(self, name: str) -> float:
        if self.dt is None:
            raise UserError(f"node {name}: the graph does not record its time step dt, which its neurons need; give "
                            f"--dt in seconds (snnTorch's export: 1e-4; Norse 1.1's: its dt squared, 1e-6 for "
                            f"1e-3; Rockpool's: its modules' dt)")
        return self.dt

    def neuron(self, name: str, node, kind: str, shape: list[int]) -> dict:
        nir = require_nir()
        lay = _Layout(name, shape)
        meta = dict(getattr(node, "metadata", None) or {})
        v_reset = getattr(node, "v_reset", None)
        if v_reset is not None and np.any(lay.full("v_reset", v_reset) != 0):
            raise UserError(f"node {name}: v_reset != 0 is not supported (snncompress neurons reset to 0 or "
                            f"subtract the threshold)")
        arrays: dict[str, np.ndarray] = {}
        rockpool = self.integration == "rockpool"

        def decay(tau_name: str, tau) -> tuple[np.ndarray, np.ndarray]:
            """``(1 - leak, leak)`` of a time constant: forward Euler ``dt/tau``, or Rockpool's exp(-dt/tau)."""
            ratio = self.need_dt(name) / lay.full(tau_name, tau)
            leak = np.exp(-ratio) if rockpool else 1.0 - ratio
            return 1.0 - leak if rockpool else ratio, leak

        if isinstance(node, (nir.LIF, nir.LI)):
            a, leak = decay("tau", node.tau)
            gain = (leak if isinstance(node, nir.LI) else np.ones(shape)) if rockpool else a * lay.full("r", node.r)
            arrays.update(leak=leak, gain=gain, bias=a * lay.full("v_leak", node.v_leak))
        elif isinstance(node, nir.IF):
            r = lay.full("r", node.r)
            arrays.update(leak=np.ones(shape), gain=r * self.need_dt(name) if self.integration == "euler" else r,
                          bias=np.zeros(shape))
        else:  # CubaLIF
            a_mem, leak = decay("tau_mem", node.tau_mem)
            a_syn, syn_decay = decay("tau_syn", node.tau_syn)
            w_in = lay.full("w_in", node.w_in)
            syn_gain = {"euler": a_syn * w_in, "jump": w_in, "rockpool": syn_decay}[self.integration]
            arrays.update(leak=leak, gain=np.ones(shape) if rockpool else a_mem * lay.full("r", node.r),
                          bias=a_mem * lay.full("v_leak", node.v_leak), decay=syn_decay, syn_gain=syn_gain)
        if not isinstance(node, nir.LI):
            arrays["threshold"] = lay.full("v_threshold", node.v_threshold)
        for key in ("gain", "syn_gain"):
            if key in arrays and np.all(np.abs(arrays[key] - 1.0) <= GAIN_ONE_TOLERANCE):
                arrays[key] = np.ones(shape)
        for key in ("decay", "syn_gain"):  # this package's export: the exact float32 synapse values
            if key in arrays and f"synapse.{key}" in meta:
                exact = np.broadcast_to(np.asarray(meta[f"synapse.{key}"], np.float64).reshape(
                    _Layout.stored_shape(np.size(meta[f"synapse.{key}"]), shape)), tuple(shape))
                if np.max(np.abs(exact - arrays[key])) > LEAK_TOLERANCE:
                    raise UserError(f"node {name}: metadata synapse.{key} disagrees with tau_syn and w_in")
                arrays[key] = exact.astype(np.float64)
        if "leak" in meta and kind in ("lif", "if", "cubalif"):  # this package's export: the exact float32 leak
            exact = np.asarray(meta["leak"], np.float64).reshape(-1)
            if exact.size == int(np.prod(shape)):  # one per neuron
                exact = exact.reshape(shape)
            elif exact.size == shape[0]:  # one per channel
                exact = exact.reshape(-1, *([1] * (len(shape) - 1)))
            elif exact.size != 1:
                raise UserError(f"node {name}: metadata leak has {exact.size} values for a layer of shape {shape}")
            exact = np.broadcast_to(exact, tuple(shape))
            if np.max(np.abs(exact - arrays["leak"])) > LEAK_TOLERANCE:
                raise UserError(f"node {name}: metadata leak disagrees with 1 - dt/tau")
            arrays["leak"] = exact.astype(np.float64)
        for key, value in arrays.items():
            if not np.all(np.isfinite(value)):
                raise UserError(f"node {name}: {key} is not finite (tau = 0 or a missing value?)")
        if np.any(arrays["leak"] < 0) or np.any(arrays["leak"] > 1):
            raise UserError(f"node {name}: dt / tau outside [0, 1] (dt {self.dt:g} s is larger than a time constant); "
                            f"give the dt the graph was exported with (--dt)")
        layout = lay.choose(list(arrays.values()))
        spec = {"name": name, "kind": kind, "shape": list(shape), "layout": layout}
        if kind != "li":
            reset = self.reset or str(meta.get("reset", "zero"))
            spec["reset"] = "soft" if reset == "subtract" else "hard"
            spec["gain"] = bool(np.any(arrays["gain"] != 1.0))
            spec["bias"] = bool(np.any(arrays["bias"] != 0.0))
        self.tensors[name] = {k: _Layout.reduce(v, layout) for k, v in arrays.items()}
        return spec

    def node(self, name: str, node, shape: list[int] | None) -> tuple[dict, list[int]]:
        """The spec entry of one node and its output shape, given its input shape."""
        _reject(name, node)
        kind = type(node).__name__
        if shape is None and kind != "Input":
            raise UserError(f"node {name}: its input shape is unknown (no path from the Input node)")
        if kind in ("Conv1d", "Conv2d"):
            weight = _a(node.weight)
            n = 1 if kind == "Conv1d" else 2
            if len(shape) != n + 1:
                raise UserError(f"node {name}: a {kind} needs input [C, {'L' if n == 1 else 'H, W'}], gets "
                                f"{shape}; give --input-shape")
            groups = int(node.groups)
            if shape[0] != weight.shape[1] * groups:
                raise UserError(f"node {name}: weight {tuple(weight.shape)} (groups {groups}) does not take "
                                f"{shape[0]} input channels")
            stride, dilation = _ints(node.stride, n), _ints(node.dilation, n)
            padding = node.padding if isinstance(node.padding, str) else _ints(node.padding, n)
            kernel = list(weight.shape[2:])
            if isinstance(padding, str):
                if padding not in ("same", "valid"):
                    raise UserError(f"node {name}: padding {padding!r} is neither 'same' nor 'valid'")
                out = list(shape[1:]) if padding == "same" else _conv_out(shape[1:], kernel, stride, [0] * n, dilation)
            else:
                out = _conv_out(shape[1:], kernel, stride, padding, dilation)
            bias = _a(node.bias) if getattr(node, "bias", None) is not None else np.zeros(weight.shape[0])
            bias = np.broadcast_to(bias, (weight.shape[0],))
            has_bias = bool(np.any(bias != 0))
            self.tensors[name] = {"weight": weight, **({"bias": bias} if has_bias else {})}
            return ({"name": name, "kind": kind.lower(), "in_channels": shape[0], "out_channels": weight.shape[0],
                     "kernel": kernel, "stride": stride, "padding": padding, "dilation": dilation,
                     "groups": groups, "bias": has_bias, "input_size": list(shape[1:])}, [int(weight.shape[0]), *out])
        if kind in ("Linear", "Affine"):
            weight = _a(node.weight)
            if weight.ndim != 2 or [weight.shape[1]] != [int(np.prod(shape))] or len(shape) != 1:
                raise UserError(f"node {name}: a {kind} of weight {tuple(weight.shape)} gets input {shape} (flatten "
                                f"first)")
            has_bias = kind == "Affine"  # kept even when zero: importers such as Sinabs' take Affine only
            self.tensors[name] = {"weight": weight,
                                  **({"bias": np.broadcast_to(_a(node.bias), (weight.shape[0],))} if has_bias else {})}
            return ({"name": name, "kind": "affine" if has_bias else "linear", "in_features": int(weight.shape[1]),
                     "out_features": int(weight.shape[0])}, [int(weight.shape[0])])
        if kind == "Scale":
            self.tensors[name] = {"scale": _Layout(name, shape).full("scale", node.scale)}
            return {"name": name, "kind": "scale", "shape": list(shape)}, list(shape)
        if kind == "Flatten":
            start, end = int(node.start_dim), int(node.end_dim)
            nd = len(shape)
            s, e = start % nd, end % nd
            if not (0 <= start + (nd if start < 0 else 0) < nd) or s > e:
                raise UserError(f"node {name}: Flatten({start}, {end}) of an input {shape}")
            out = [*shape[:s], int(np.prod(shape[s:e + 1])), *shape[e + 1:]]
            return {"name": name, "kind": "flatten", "start_dim": start, "end_dim": end,
                    "input_shape": list(shape)}, out
        if kind in ("SumPool2d", "AvgPool2d"):
            if len(shape) != 3:
                raise UserError(f"node {name}: 2-d pooling of an input {shape}; give --input-shape C,H,W")
            k, s, p = _ints(node.kernel_size, 2), _ints(node.stride, 2), _ints(node.padding, 2)
            out = [shape[0], *_conv_out(shape[1:], k, s, p, [1, 1])]
            return {"name": name, "kind": kind.lower(), "kernel": k, "stride": s, "padding": p}, out
        if kind in ("LIF", "IF", "CubaLIF", "LI"):
            return self.neuron(name, node, kind.lower(), shape), list(shape)
        if kind == "Output":
            return {"name": name, "kind": "output", "shape": list(shape)}, list(shape)
        raise AssertionError(kind)  # Input is handled by the caller


def _input_shape(graph, name: str, given) -> list[int]:
    if given is not None:
        return [int(v) for v in given]
    shape = _type_shape(getattr(graph.nodes[name], "input_type", None))
    if shape is None:
        raise UserError(f"the graph's Input node {name} has no shape; give --input-shape (e.g. 1,28,28)")
    return shape


@torch.no_grad()
def import_graph(graph, *, timesteps: int | None = None, input_shape=None, dt: float | None = None,
                 integration: str = "euler", neuron: dict | None = None, reset: str | None = None) -> GraphNetwork:
    """A NIR graph from any framework as a :class:`GraphNetwork` in eval mode (see the module docstring).

    Args:
        graph: a ``nir.NIRGraph``.
        timesteps: T for image input (default: the graph's metadata ``timesteps``; needed otherwise).
        input_shape: ``(C, H, W)`` or ``(N,)`` of one input, without batch (default: the Input node's type).
        dt: the step in seconds the neurons are made discrete with (default: metadata ``dt``).
        integration: ``"euler"``, ``"jump"`` or ``"rockpool"`` (see the module docstring).
        reset: ``"zero"`` or ``"subtract"`` for every spiking node, whatever the graph says (exporters write
            ``v_reset = 0`` for networks that subtracted: snnTorch's default, Sinabs' MembraneSubtract, Rockpool).
        neuron: LIF options for training (``surrogate``, ``learn_leak``, ...; defaults otherwise).

    Returns:
        the network: ``model(images [B, *input_shape])`` (the image fed at every step) or
        ``model(x [T, B, *input_shape])`` gives logits ``[B, output size]`` (output summed over steps).
    """
    nir = require_nir()
    if integration not in INTEGRATIONS:
        raise UserError(f"integration must be one of {', '.join(INTEGRATIONS)}, got {integration!r}")
    if reset is not None and reset not in RESETS:
        raise UserError(f"reset must be one of {', '.join(RESETS)}, got {reset!r}")
    meta = dict(getattr(graph, "metadata", None) or {})
    if dt is None and "dt" in meta:
        dt = float(meta["dt"])
    if dt is not None and (not math.isfinite(float(dt)) or float(dt) <= 0):
        raise UserError(f"dt must be a positive number of seconds, got {dt}")
    if timesteps is None and "timesteps" in meta:
        timesteps = int(meta["timesteps"])
    if timesteps is None:
        raise UserError("the graph does not say how many timesteps to run; give --timesteps")
    if int(timesteps) < 1:
        raise UserError(f"timesteps must be >= 1, got {timesteps}")
    names = [str(n) for n in graph.nodes]
    for name in names:
        _reject(name, graph.nodes[name])
    edges = [(str(a), str(b)) for a, b in graph.edges]
    try:
        order = topological_order(names, edges)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    inputs = [n for n in names if isinstance(graph.nodes[n], nir.Input)]
    outputs = [n for n in names if isinstance(graph.nodes[n], nir.Output)]
    if len(inputs) != 1 or len(outputs) != 1:
        raise UserError(f"the graph needs one Input and one Output node, has {len(inputs)} and {len(outputs)}")
    first = _input_shape(graph, inputs[0], input_shape)
    # exporters that trace with a batch of one (Norse) or a [batch, time] sample (Rockpool) write those into the
    # Input type: without --input-shape, leading dims are dropped until the graph takes the shape
    candidates = [first] if input_shape is not None or first[0] != 1 else [first[i:] for i in range(len(first))]
    failures: list[tuple[int, UserError]] = []
    for shape in candidates:
        try:
            spec, tensors = _build(graph, order, edges, inputs[0], outputs[0], shape, dt, integration, reset)
            break
        except UserError as exc:
            failures.append((getattr(exc, "nodes_built", 0), exc))
    else:  # the error of the shape that got furthest through the graph
        raise max(failures, key=lambda f: f[0])[1] from None
    spec.update({"timesteps": int(timesteps), "neuron": {**NEURON_DEFAULTS, **(neuron or {})}})
    model = build_from_spec(spec)
    _load_values(model, tensors)
    return model.eval()


def _build(graph, order, edges, input_name, output_name, input_shape, dt, integration, reset):
    """The spec (without ``timesteps`` and ``neuron``) and the tensors of each node, for one input shape."""
    importer = _Importer(graph, dt=None if dt is None else float(dt), integration=integration, reset=reset)
    inputs, outputs = [input_name], [output_name]
    shapes: dict[str, list[int]] = {inputs[0]: list(input_shape)}
    spec_nodes = [{"name": inputs[0], "kind": "input", "shape": shapes[inputs[0]]}]
    for name in order:
        if name == inputs[0]:
            continue
        sources = [a for a, b in edges if b == name]
        in_shapes = [shapes[s] for s in sources if s in shapes]
        if len({tuple(s) for s in in_shapes}) > 1:
            raise UserError(f"node {name}: its inputs have different shapes {in_shapes}")
        try:
            entry, shapes[name] = importer.node(name, graph.nodes[name], in_shapes[0] if in_shapes else None)
        except ValueError as exc:
            error = UserError(f"node {name}: {exc}")
            error.nodes_built = len(spec_nodes)
            raise error from None
        except UserError as exc:
            exc.nodes_built = len(spec_nodes)
            raise
        spec_nodes.append(entry)
    out_shape = shapes[outputs[0]]
    spec = {"family": "graph", "arch": "graph", "in_shape": shapes[inputs[0]], "num_classes": int(np.prod(out_shape)),
            "encoding": "direct", "dt": dt, "integration": integration,
            "graph": {"nodes": spec_nodes, "edges": [list(e) for e in edges]}}
    return spec, importer.tensors


def _load_values(model: GraphNetwork, tensors: dict[str, dict[str, np.ndarray]]) -> None:
    """Copy the imported arrays into the modules (through masks and quantizers: into what is stored)."""
    for name, values in tensors.items():
        module = model.node_module(name)
        targets = {"weight": (module, "weight"), "bias": (module, "bias"), "scale": (module, "scale")}
        if model.kinds[name] in ("lif", "if", "cubalif"):
            targets = {"leak": (module.lif, "leak"), "threshold": (module.lif, "threshold"),
                       "gain": (module, "gain"), "bias": (module, "bias"),
                       "decay": (module.synapse, "decay"), "syn_gain": (module.synapse, "gain")}
        elif model.kinds[name] == "li":
            targets = {"leak": (module, "leak"), "gain": (module, "gain"), "bias": (module, "bias")}
        for key, value in values.items():
            owner, attr = targets[key]
            if owner is None or getattr(owner, attr, None) is None:
                continue  # a gain of 1 or a bias of 0 the module leaves out
            target = original(owner, attr)
            value = torch.tensor(np.array(value), dtype=torch.float32)
            if tuple(value.shape) != tuple(target.shape):
                raise UserError(f"node {name}: {key} has shape {tuple(value.shape)}, the module "
                                f"{tuple(target.shape)}")
            target.data.copy_(value)


# ----------------------------------------------------------------------------- export


def _np(t: torch.Tensor | None, shape=None) -> np.ndarray:
    a = np.asarray(t.detach().to("cpu", torch.float64).numpy()) if t is not None else np.array(0.0)
    return a if shape is None else np.broadcast_to(a, shape).copy()


def _per_neuron(t: torch.Tensor | None, layout: str, shape: list[int], default: float) -> np.ndarray:
    if t is None:
        return np.full(shape, default, np.float64)
    a = _np(t)
    if layout == "channel" and len(shape) > 1:
        a = a.reshape(-1, *([1] * (len(shape) - 1)))
    return np.broadcast_to(a, tuple(shape)).astype(np.float64).copy()


def _neuron_export(nir, model: GraphNetwork, entry: dict, module, stored: dict, compression_metadata):
    shape, layout, kind = entry["shape"], entry.get("layout", "layer"), entry["kind"]
    dt = _export_dt(model)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    rockpool = model.spec.get("integration") == "rockpool"

    def tau_of(leak: np.ndarray) -> np.ndarray:
        """The time constant a leak stands for: ``dt / (1 - leak)`` (Euler) or ``-dt / ln(leak)`` (Rockpool)."""
        return -dt / np.log(leak) if rockpool else dt / (1.0 - leak)

    def r_of(tau: np.ndarray, gain: np.ndarray) -> np.ndarray:
        """NIR's r: ``gain tau / dt`` (Euler), or ``tau / dt - 1``, from which Rockpool's importer recovers dt."""
        return tau / dt - 1.0 if rockpool else gain * tau / dt

    if kind == "li":
        leak = _per_neuron(module.leak, layout, shape, 1.0)
        gain, bias = _per_neuron(module.gain, layout, shape, 1.0), _per_neuron(module.bias, layout, shape, 0.0)
        tau = tau_of(leak)
        return make_node(nir.LI, tau=f32(tau), r=f32(r_of(tau, gain)), v_leak=f32(bias / (1.0 - leak)))
    lif = module.lif
    leak = _per_neuron(lif.leak, layout, shape, 1.0)
    threshold = f32(_per_neuron(lif.threshold, layout, shape, 1.0))
    gain, bias = _per_neuron(module.gain, layout, shape, 1.0), _per_neuron(module.bias, layout, shape, 0.0)
    zeros = np.zeros(shape, np.float32)
    key = model.keys[entry["name"]]
    meta = {"reset": "subtract" if lif.reset == "soft" else "zero", "leak": f32(leak).reshape(-1)}
    for attr in ("leak", "threshold"):
        meta.update(compression_metadata(stored.get(f"nodes.{key}.lif.{attr}"), attr))
    if kind == "if":
        if np.any(leak != 1.0):
            raise UserError(f"node {entry['name']}: an IF node whose leak was trained below 1 has no IF form")
        return make_node(nir.IF, r=f32(gain / dt), v_threshold=threshold, v_reset=zeros, metadata=meta)
    if np.any(leak >= 1.0):
        raise UserError(f"node {entry['name']}: a leak of 1 in a {kind.upper()} node has no finite tau")
    tau = tau_of(leak)
    if kind == "lif":
        return make_node(nir.LIF, tau=f32(tau), r=f32(r_of(tau, gain)), v_leak=f32(bias / (1.0 - leak)),
                       v_threshold=threshold, v_reset=zeros, metadata=meta)
    syn = module.synapse
    decay = _per_neuron(syn.decay, layout, shape, 0.0)
    syn_gain = _per_neuron(syn.gain, layout, shape, 1.0)
    meta.update({"synapse.decay": f32(decay).reshape(-1), "synapse.syn_gain": f32(syn_gain).reshape(-1)})
    tau_syn = tau_of(decay)
    w_in = np.ones(shape) if rockpool else syn_gain * tau_syn / dt
    return make_node(nir.CubaLIF, tau_syn=f32(tau_syn), tau_mem=f32(tau), r=f32(r_of(tau, gain)),
                     v_leak=f32(bias / (1.0 - leak)), v_threshold=threshold, v_reset=zeros, w_in=f32(w_in),
                     metadata=meta)


def _export_dt(model: GraphNetwork) -> float:
    """The step the export writes the neurons with: the imported ``dt`` (1 s for a graph of jump-integrated IF
    nodes only, which needed none)."""
    dt = model.spec.get("dt")
    return 1.0 if dt is None else float(dt)


@torch.no_grad()
def export_graph(model: GraphNetwork, compression_metadata, version: str):
    """A :class:`GraphNetwork` (compressed or not) as a ``nir.NIRGraph`` of the node kinds it was imported from."""
    nir = require_nir()
    if not model.spiking:
        raise UserError("the model is in ANN mode (ReLU twin); NIR export needs a spiking model")
    was_training = model.training
    model.eval()
    try:
        stored = {t.name: t for t in stored_tensors(model)}
        nodes = {}
        for entry in model.spec["graph"]["nodes"]:
            name, kind = entry["name"], entry["kind"]
            module = model.node_module(name)
            key = model.keys[name]
            if kind == "input":
                nodes[name] = make_node(nir.Input, input_type={"input": np.array(entry["shape"])})
            elif kind == "output":
                nodes[name] = make_node(nir.Output, output_type={"output": np.array(entry.get("shape",
                                                                                [model.spec["num_classes"]]))})
            elif kind in ("conv1d", "conv2d"):
                meta = compression_metadata(stored.get(f"nodes.{key}.weight"), "weight")
                bias = _np(module.bias) if module.bias is not None else np.zeros(module.out_channels)
                cls = nir.Conv1d if kind == "conv1d" else nir.Conv2d
                padding = entry["padding"] if isinstance(entry["padding"], str) else tuple(entry["padding"])
                size = entry["input_size"]
                nodes[name] = make_node(cls, input_shape=size[0] if kind == "conv1d" else tuple(size),
                                        weight=np.asarray(_np(module.weight), np.float32),
                                        stride=tuple(entry["stride"]), padding=padding,
                                        dilation=tuple(entry["dilation"]), groups=int(entry["groups"]),
                                        bias=np.asarray(bias, np.float32), metadata=meta)
            elif kind in ("linear", "affine"):
                meta = compression_metadata(stored.get(f"nodes.{key}.weight"), "weight")
                weight = np.asarray(_np(module.weight), np.float32)
                if module.bias is not None:
                    nodes[name] = make_node(nir.Affine, weight=weight, bias=np.asarray(_np(module.bias), np.float32),
                                             metadata=meta)
                else:
                    nodes[name] = make_node(nir.Linear, weight=weight, metadata=meta)
            elif kind == "scale":
                nodes[name] = make_node(nir.Scale, scale=np.asarray(_np(module.scale), np.float32))
            elif kind == "flatten":
                nodes[name] = make_node(nir.Flatten, input_type={"input": np.array(entry["input_shape"])},
                                        start_dim=entry["start_dim"], end_dim=entry["end_dim"])
            elif kind in ("sumpool2d", "avgpool2d"):
                cls = nir.SumPool2d if kind == "sumpool2d" else nir.AvgPool2d
                nodes[name] = cls(kernel_size=np.array(entry["kernel"]), stride=np.array(entry["stride"]),
                                  padding=np.array(entry["padding"]))
            else:
                node = _neuron_export(nir, model, entry, module, stored, compression_metadata)
                node.input_type = {"input": np.array(entry["shape"])}  # importers size their neurons from it
                node.output_type = {"output": np.array(entry["shape"])}
                nodes[name] = node
    finally:
        model.train(was_training)
    metadata = {"producer": f"snncompress {version}", "snncompress_format": NIR_FORMAT,
                "snncompress_spec": json.dumps(model.spec, sort_keys=True), "timesteps": int(model.timesteps),
                "readout": "logits = sum of the output node over the T steps"}
    metadata["dt"] = _export_dt(model)
    return make_node(nir.NIRGraph, nodes=nodes, edges=[tuple(e) for e in model.spec["graph"]["edges"]],
                     metadata=metadata, type_check=False)


# ----------------------------------------------------------------------------- re-import of our own graph export


@torch.no_grad()
def import_own_graph(graph, spec: dict) -> GraphNetwork:
    """A :class:`GraphNetwork` exported by :func:`export_graph`: its spec, the nodes' values, masks and quantizers."""
    integration = "rockpool" if spec.get("integration") == "rockpool" else "euler"  # the form export_graph wrote
    model = import_graph(graph, timesteps=int(spec["timesteps"]), input_shape=spec["in_shape"],
                         dt=float(dict(graph.metadata)["dt"]), integration=integration, neuron=spec.get("neuron"))
    if [n["name"] for n in model.spec["graph"]["nodes"]] != [n["name"] for n in spec["graph"]["nodes"]]:
        raise UserError("the graph's nodes differ from its snncompress_spec")
    rebuilt = build_from_spec(spec)
    rebuilt.load_state_dict(model.state_dict(), strict=False)
    for name, own in model.state_dict().items():
        if name not in rebuilt.state_dict():
            raise UserError(f"the graph's values do not fit its snncompress_spec ({name})")
    masks, quantizers = {}, {}
    for entry in spec["graph"]["nodes"]:
        node = graph.nodes[entry["name"]]
        meta = dict(getattr(node, "metadata", None) or {})
        key = rebuilt.keys[entry["name"]]
        if entry["kind"] in ("conv1d", "conv2d", "linear", "affine"):
            restore_compression(f"nodes.{key}", "weight", meta, np.asarray(node.weight, np.float32), masks,
                                 quantizers)
        elif entry["kind"] in ("lif", "if", "cubalif"):
            lif = rebuilt.node_module(entry["name"]).lif
            for attr in ("leak", "threshold"):
                restore_compression(f"nodes.{key}.lif", attr, meta, getattr(lif, attr).detach().numpy(), masks,
                                     quantizers)
    set_masks(rebuilt, masks)
    for name, quantizer in quantizers.items():
        attach_quantizer(rebuilt, name, quantizer, calibrate=False)
    return rebuilt.eval()
