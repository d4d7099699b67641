"""Export a spiking VGG / convnet to NIR (the Neuromorphic Intermediate Representation) and import it back.

NIR (``pip install nir``) is the exchange format that snnTorch, SpikingJelly,
Norse, sinabs, Lava and several chips read: a graph of nodes (``Conv2d``,
``Linear``, ``AvgPool2d``, ``Flatten``, ``LIF``, ``IF`` ...) stored as HDF5.
This module writes one node per layer of the model, named after the module
(``features.0``, ``features.1``, ``flatten``, ``classifier.0`` ...), plus
``input`` and ``output``, connected in a chain.

How this package's discrete neuron maps onto NIR's continuous one
-----------------------------------------------------------------

NIR's LIF is the ODE ``tau dv/dt = (v_leak - v) + r I`` with ``z = [v > v_threshold]``
and ``v <- v_reset`` on a spike; NIR's IF is ``dv/dt = r I``. A simulator
discretises it with its own step ``dt``. Forward Euler gives::

    v[t] = (1 - dt/tau) v[t-1] + (dt/tau) r I[t]            (v_leak = 0)

and this package's LIF (:mod:`snncompress.neuron`) is ``u[t] = leak u_hat[t-1] + I[t]``.
The two agree step by step **under the convention that the consumer uses the
``dt`` recorded in the graph** (metadata ``dt``, default 1e-4, the step
snnTorch's importer hard-codes) when

    tau = dt / (1 - leak),   r = tau / dt = 1 / (1 - leak),   v_leak = 0,   v_threshold = thr

so ``1 - dt/tau = leak`` and the input gain ``(dt/tau) r = 1``. A neuron with
``leak == 1`` has no finite ``tau``. With ``leak_one="if"`` (default) a layer whose
leaks are all 1 becomes an ``IF`` node with ``r = 1/dt`` (``v += dt r I = I``:
exact), and a layer whose per-channel leaks mix 1 and values below 1 is refused.
With ``leak_one="lif"`` such neurons are ``LIF`` nodes with ``tau = 1e8 dt`` and
``r = 1e8``: ``1 - dt/tau = 1 - 1e-8``, which is exactly 1.0 in float32 arithmetic
(a float64 consumer leaks 1e-8 per step); this form exists because snnTorch 1.0's
importer cannot run ``IF`` nodes (it asserts ``r == 1`` and substitutes a leak of
0.9), and it also exports mixed layers. Scalar and per-channel leaks and
thresholds are written as per-neuron arrays of the layer's shape (NIR's
parameters are per neuron); the exact float32 leak is kept in the node's
metadata (``leak``), since ``1 - dt/tau`` recomputed in float32 can be one ulp
off.

What NIR cannot say, and what the export does about it
------------------------------------------------------

* **Soft reset** (``u_hat = u - thr``): NIR's LIF/IF reset to ``v_reset``. With
  ``soft_reset="annotate"`` (default) the node is written with ``v_reset = 0`` and
  metadata ``reset = "subtract"``; :func:`import_nir` honours it, a consumer that
  ignores metadata runs a hard reset (more spikes are lost). ``soft_reset="refuse"``
  refuses instead. Hard reset is exact (``v_reset = 0``, metadata ``reset = "zero"``).
* **Spike condition**: this package fires at ``u >= thr`` (``u / thr - 1 >= 0``), NIR
  at ``v > v_threshold``: they differ only when the potential lands exactly on the
  threshold (recorded in metadata ``spike_condition``).
* **Direct input, conv1 once**: the graph's input is the normalised image, fed
  unchanged at every one of the ``T`` steps (metadata ``input``); conv1 is
  stateless, so computing it at every step gives what this package computes once.
  Poisson models expect their already-encoded spike train (``encoding``).
* **Readout**: the last linear layer has no neuron; the logits are the sum of the
  ``output`` node over the ``T`` steps (metadata ``readout``, ``timesteps``).
* **Trainable parameters, surrogate gradients**: NIR holds values, not what is
  trainable; the architecture (``model.spec``, with ``learn_leak``,
  ``learn_threshold``, the surrogate) travels as JSON in the graph metadata
  ``snncompress_spec``, so :func:`import_nir` rebuilds the same trainable model.
* **Pruning**: a physically narrowed model is written in its narrow shapes; masked
  weights are zeros in the node's ``weight`` and the mask is kept as metadata
  ``weight.mask`` (uint8).
* **Quantization**: weights (and quantized leaks / thresholds) are written
  dequantized (``codes * scale``, exactly what the model computes with); the integer
  codes, the scale, the bit width and the quantizer's configuration are metadata
  (``weight.codes``, ``weight.scale``, ``weight.bits``, ``weight.quantizer``).
* **BatchNorm** (eval mode) becomes a 1x1 ``Conv2d`` with a diagonal weight
  ``gamma / sqrt(var + eps)`` and bias ``beta - mean * weight``: the same affine map
  (not a grouped convolution, which nir 1.0's type check mis-sizes); the exact
  running statistics are metadata (``batchnorm.*``) for the round trip.
* **Refused**: ResNets (not yet exported), ANN-mode models, a membrane-state
  quantizer (NIR has no quantized state), mixed IF/LIF leaks in one layer under
  ``leak_one="if"``.

:func:`import_nir` reads only files this module wrote (the spec metadata gives
the architecture); every value it loads comes from the NIR fields (weights,
``v_threshold``, ``tau``/``r``), checked against the metadata, and the model it
returns computes the same logits as the exported one, bit for bit. Files are
read with h5py (HDF5), never unpickled.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..compress.masks import original, set_masks
from ..compress.quantizers import attach_quantizer, quantizer_from_config
from ..compress.state import stored_tensors
from ..errors import UserError
from ..io import atomic_write
from ..metrics.ops import SpikeMeter
from ..models import SpikingNetwork, build_from_spec
from ..models.base import TimeDropout
from ..models.vgg import SpikingVGG
from ..neuron import LIF

#: The simulation step a consumer should use (snnTorch's NIR importer hard-codes 1e-4).
DEFAULT_DT = 1e-4
#: Version of the metadata layout written here.
NIR_FORMAT = 1
SOFT_RESET_MODES = ("annotate", "refuse")
LEAK_ONE_MODES = ("if", "lif")
#: ``tau / dt`` of a leak-1 neuron written as a LIF (``leak_one="lif"``): ``1 - 1e-8`` is 1.0 in float32.
LEAK_ONE_TAU_STEPS = 1e8
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
#: How far ``1 - dt/tau`` (recomputed from float32 fields) may sit from the metadata's exact leak.
LEAK_TOLERANCE = 1e-5


def require_nir():
    """The ``nir`` module, or a UserError saying how to install it."""
    try:
        import nir
    except ImportError:
        raise UserError("NIR export needs the 'nir' package: pip install 'snncompress[nir]' "
                        "(or: pip install nir nirtorch)") from None
    return nir


# ----------------------------------------------------------------------------- the layer walk


@dataclass
class Layer:
    """One NIR node of the chain: module name (= node name), kind, module, shapes without the batch dimension."""

    name: str
    kind: str  # conv | batchnorm | lif | pool | flatten | linear
    module: nn.Module | None
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_out(shape, kernel, stride, padding, dilation) -> tuple[int, int]:
    return tuple(int(math.floor((shape[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) / stride[i] + 1))
                 for i in range(2))


def layers(model: SpikingNetwork) -> list[Layer]:
    """The model's layers in forward order as NIR nodes will hold them (dropout left out: identity in eval).

    Raises UserError for what cannot be exported (see the module docstring).
    """
    if not isinstance(model, SpikingVGG):
        arch = model.spec.get("arch", model.spec.get("family"))
        raise UserError(f"NIR export supports the VGG family (vgg5/9/11/16, convnet); {arch} is not supported yet "
                        f"(its residual sums would need multi-input nodes)")
    if not model.spiking:
        raise UserError("the model is in ANN mode (ReLU twin); NIR export needs a spiking model")
    shape: tuple[int, ...] = tuple(int(v) for v in model.spec["in_shape"])
    found: list[Layer] = []
    for part in ("features", "classifier"):
        if part == "classifier":
            flat = (int(np.prod(shape)),)
            found.append(Layer("flatten", "flatten", None, shape, flat))
            shape = flat
        for i, m in enumerate(getattr(model, part)):
            name = f"{part}.{i}"
            if isinstance(m, TimeDropout):
                continue
            if isinstance(m, nn.Conv2d):
                k, s, p, d = _pair(m.kernel_size), _pair(m.stride), m.padding, _pair(m.dilation)
                if isinstance(p, str):
                    raise UserError(f"{name}: string padding {p!r} is not exported")
                out = (m.out_channels, *_conv_out(shape[1:], k, s, _pair(p), d))
                found.append(Layer(name, "conv", m, shape, out))
            elif isinstance(m, nn.BatchNorm2d):
                if getattr(m, "parametrizations", None):
                    raise UserError(f"{name}: masked or quantized BatchNorm parameters are not exported")
                if m.running_mean is None:
                    raise UserError(f"{name}: BatchNorm without running statistics has no inference form")
                found.append(Layer(name, "batchnorm", m, shape, shape))
            elif isinstance(m, LIF):
                if m.state_quantizer is not None:
                    raise UserError(f"{name}: a membrane-state quantizer cannot be expressed in NIR "
                                    f"(its neurons hold real-valued state)")
                found.append(Layer(name, "lif", m, shape, shape))
            elif isinstance(m, nn.AvgPool2d):
                k, s = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size)
                if _pair(m.padding) != (0, 0) or m.ceil_mode:
                    raise UserError(f"{name}: average pooling with padding or ceil_mode is not exported")
                out = (shape[0], *_conv_out(shape[1:], k, s, (0, 0), (1, 1)))
                found.append(Layer(name, "pool", m, shape, out))
            elif isinstance(m, nn.Linear):
                found.append(Layer(name, "linear", m, shape, (m.out_features,)))
            else:
                raise UserError(f"{name}: {type(m).__name__} has no NIR node here")
            shape = found[-1].out_shape
    return found


# ----------------------------------------------------------------------------- export


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy().copy()


def _code_dtype(bits: int):
    return np.int8 if bits <= 8 else np.int16 if bits <= 16 else np.int32


def _compression_metadata(stored, attr: str) -> dict:
    """Metadata keeping a tensor's mask and quantizer (codes, scale, bits, configuration) beside its values."""
    meta = {}
    if stored is None:
        return meta
    if stored.mask is not None:
        meta[f"{attr}.mask"] = np.atleast_1d(stored.mask.detach().cpu().numpy().astype(np.uint8))  # HDF5: no 0-d
    if stored.quantizer is not None:
        q = stored.quantizer
        codes, scale = q.export(stored.values)
        meta[f"{attr}.codes"] = np.atleast_1d(codes.numpy().astype(_code_dtype(q.bits)))
        meta[f"{attr}.scale"] = float(scale)
        meta[f"{attr}.bits"] = int(q.bits)
        meta[f"{attr}.quantizer"] = json.dumps(q.config())
    return meta


def _per_neuron(value: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """A scalar or per-channel parameter as one value per neuron of a layer of ``shape`` ([C, H, W] or [N])."""
    v = value.detach().to("cpu", torch.float64).numpy()
    if v.ndim == 1:
        v = v.reshape(-1, *([1] * (len(shape) - 1)))
    return np.broadcast_to(v, shape).copy()


def _neuron_node(nir, layer: Layer, dt: float, soft_reset: str, leak_one: str, stored: dict):
    lif: LIF = layer.module
    leak, thr = lif.leak.detach().float().cpu(), lif.threshold.detach().float().cpu()
    if not torch.isfinite(leak).all() or not torch.isfinite(thr).all():
        raise UserError(f"{layer.name}: leak or threshold is not finite")
    if (leak < 0).any() or (leak > 1).any():
        raise UserError(f"{layer.name}: leak outside [0, 1] has no NIR form")
    if lif.reset == "soft" and soft_reset == "refuse":
        raise UserError(f"{layer.name}: soft reset (subtract the threshold) cannot be expressed by NIR's LIF/IF, "
                        f"which reset to v_reset; export with soft reset annotated (--soft-reset annotate) to "
                        f"keep it as node metadata")
    shape = layer.out_shape
    threshold = _per_neuron(thr, shape).astype(np.float32)
    zeros = np.zeros(shape, np.float32)
    meta = {"reset": "subtract" if lif.reset == "soft" else "zero",
            "leak": leak.numpy().reshape(-1).astype(np.float32), "per_channel": bool(lif.per_channel)}
    for attr in ("leak", "threshold"):
        meta.update(_compression_metadata(stored.get(f"{layer.name}.{attr}"), attr))
    if leak_one == "if" and bool((leak == 1).all()):
        return nir.IF(r=np.full(shape, 1.0 / dt, np.float32), v_threshold=threshold, v_reset=zeros, metadata=meta)
    if leak_one == "if" and bool((leak == 1).any()):
        raise UserError(f"{layer.name}: per-channel leaks mix 1 (IF, no finite tau) and values below 1 (LIF); "
                        f"NIR has no node for such a layer (--leak-one lif writes leak 1 as tau = 1e8 dt)")
    one_minus = 1.0 - _per_neuron(leak, shape)
    one_minus[one_minus == 0] = 1.0 / LEAK_ONE_TAU_STEPS
    return nir.LIF(tau=(dt / one_minus).astype(np.float32), r=(1.0 / one_minus).astype(np.float32),
                   v_leak=zeros, v_threshold=threshold, v_reset=zeros.copy(), metadata=meta)


def _batchnorm_node(nir, layer: Layer):
    bn: nn.BatchNorm2d = layer.module
    c = bn.num_features
    mean, var = bn.running_mean.detach().double().cpu(), bn.running_var.detach().double().cpu()
    gamma = bn.weight.detach().double().cpu() if bn.weight is not None else torch.ones(c, dtype=torch.float64)
    beta = bn.bias.detach().double().cpu() if bn.bias is not None else torch.zeros(c, dtype=torch.float64)
    scale = gamma / torch.sqrt(var + bn.eps)
    meta = {"batchnorm.running_mean": _array(bn.running_mean), "batchnorm.running_var": _array(bn.running_var),
            "batchnorm.eps": float(bn.eps), "batchnorm.affine": bool(bn.affine)}
    if bn.affine:
        meta.update({"batchnorm.weight": _array(bn.weight), "batchnorm.bias": _array(bn.bias)})
    # A diagonal 1x1 convolution rather than a depthwise one: nir 1.0's type check takes a Conv2d's input
    # channels from weight.shape[1], which a grouped convolution's weight does not hold.
    return nir.Conv2d(input_shape=tuple(layer.in_shape[1:]), weight=_array(torch.diag(scale)).reshape(c, c, 1, 1),
                      stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                      bias=_array(beta - mean * scale), metadata=meta)


def _node(nir, layer: Layer, dt: float, soft_reset: str, leak_one: str, stored: dict):
    m = layer.module
    if layer.kind == "conv":
        bias = _array(m.bias) if m.bias is not None else np.zeros(m.out_channels, np.float32)
        return nir.Conv2d(input_shape=tuple(layer.in_shape[1:]), weight=_array(m.weight), stride=_pair(m.stride),
                          padding=_pair(m.padding), dilation=_pair(m.dilation), groups=int(m.groups), bias=bias,
                          metadata=_compression_metadata(stored.get(f"{layer.name}.weight"), "weight"))
    if layer.kind == "linear":
        meta = _compression_metadata(stored.get(f"{layer.name}.weight"), "weight")
        if m.bias is not None:
            return nir.Affine(weight=_array(m.weight), bias=_array(m.bias), metadata=meta)
        return nir.Linear(weight=_array(m.weight), metadata=meta)
    if layer.kind == "batchnorm":
        return _batchnorm_node(nir, layer)
    if layer.kind == "lif":
        return _neuron_node(nir, layer, dt, soft_reset, leak_one, stored)
    if layer.kind == "pool":
        k = _pair(m.kernel_size)
        s = _pair(m.stride if m.stride is not None else m.kernel_size)
        return nir.AvgPool2d(kernel_size=np.array(k), stride=np.array(s), padding=np.array([0, 0]))
    return nir.Flatten(input_type={"input": np.array(layer.in_shape)}, start_dim=0, end_dim=-1)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("snncompress")
    except Exception:  # noqa: BLE001 - a source tree that was never installed
        return "0+unknown"


def _check_dt(dt: float) -> float:
    dt = float(dt)
    if not math.isfinite(dt) or dt <= 0:
        raise UserError(f"dt must be a positive number of seconds, got {dt}")
    return dt


@torch.no_grad()
def export_nir(model: SpikingNetwork, *, dt: float = DEFAULT_DT, soft_reset: str = "annotate",
               leak_one: str = "if"):
    """The model as a ``nir.NIRGraph`` (see the module docstring for the mapping and its conventions).

    Args:
        model: a spiking VGG / convnet (pruned, masked, quantized or not); it is left as it was.
        dt: the simulation step the consumer must use; ``tau = dt / (1 - leak)``.
        soft_reset: ``"annotate"`` (keep soft reset as node metadata ``reset = "subtract"``) or
            ``"refuse"`` (raise UserError for a soft-reset model).
        leak_one: neurons with leak 1 as ``"if"`` (IF nodes, ``r = 1/dt``) or ``"lif"``
            (LIF nodes with ``tau = 1e8 dt``; see the module docstring).
    """
    nir = require_nir()
    dt = _check_dt(dt)
    if soft_reset not in SOFT_RESET_MODES:
        raise UserError(f"soft_reset must be one of {SOFT_RESET_MODES}, got {soft_reset!r}")
    if leak_one not in LEAK_ONE_MODES:
        raise UserError(f"leak_one must be one of {LEAK_ONE_MODES}, got {leak_one!r}")
    found = layers(model)
    was_training = model.training
    model.eval()
    try:
        stored = {t.name: t for t in stored_tensors(model)}
        nodes = {"input": nir.Input(input_type={"input": np.array(found[0].in_shape if found else
                                                                  model.spec["in_shape"])})}
        for layer in found:
            nodes[layer.name] = _node(nir, layer, dt, soft_reset, leak_one, stored)
        nodes["output"] = nir.Output(output_type={"output": np.array(found[-1].out_shape)})
    finally:
        model.train(was_training)
    names = list(nodes)
    soft = any(layer.kind == "lif" and layer.module.reset == "soft" for layer in found)
    encoding = model.spec.get("encoding", "direct")
    metadata = {
        "producer": f"snncompress {_version()}",
        "snncompress_format": NIR_FORMAT,
        "snncompress_spec": json.dumps(model.spec, sort_keys=True),
        "dt": dt,
        "timesteps": int(model.timesteps),
        "encoding": encoding,
        "input": ("the normalised image [C, H, W], fed unchanged at every one of the T steps (direct input)"
                  if encoding == "direct" else "the signed Poisson spike train of the normalised image, one frame "
                                               "per step"),
        "readout": "logits = sum of the output node over the T steps",
        "spike_condition": "v >= v_threshold (NIR nodes say v > v_threshold; equal only at a tie)",
        "leak_one": (f"neurons with leak 1 are LIF nodes with tau = {LEAK_ONE_TAU_STEPS:g} dt" if leak_one == "lif"
                     else "neurons with leak 1 are IF nodes with r = 1/dt"),
        "reset": ("subtract: LIF/IF nodes with metadata reset='subtract' subtract v_threshold on a spike "
                  "instead of resetting to v_reset" if soft else "zero: v <- v_reset = 0 on a spike"),
    }
    return nir.NIRGraph(nodes=nodes, edges=list(zip(names[:-1], names[1:])), metadata=metadata, type_check=True)


def export_notes(graph) -> list[str]:
    """One line per thing a consumer must know about ``graph`` beyond NIR's own semantics."""
    soft = [n for n, node in graph.nodes.items() if getattr(node, "metadata", {}).get("reset") == "subtract"]
    per_channel = [n for n, node in graph.nodes.items()
                   if hasattr(node, "v_threshold") and np.unique(node.v_threshold).size > 1]
    if_nodes = [n for n, node in graph.nodes.items() if type(node).__name__ == "IF"]
    notes = [f"simulate with dt = {float(graph.metadata['dt']):g} and feed the input at each of the "
             f"{int(graph.metadata['timesteps'])} steps; logits = sum of the output over the steps"]
    if soft:
        notes.append(f"soft reset kept as metadata reset='subtract' on {', '.join(soft)}: a consumer that ignores "
                     f"it resets to v_reset = 0 (hard reset)")
    if per_channel:
        notes.append(f"per-neuron thresholds on {', '.join(per_channel)} (importers that take one threshold per "
                     f"layer, such as snnTorch's, refuse them)")
    if if_nodes:
        notes.append(f"leak 1 exported as IF with r = 1/dt on {', '.join(if_nodes)}")
    slow = [n for n, node in graph.nodes.items() if type(node).__name__ == "LIF"
            and np.any(np.asarray(node.r, np.float64) >= LEAK_ONE_TAU_STEPS / 2)]
    if slow:
        notes.append(f"leak 1 exported as LIF with tau = {LEAK_ONE_TAU_STEPS:g} dt on {', '.join(slow)} "
                     f"(exact in float32, a leak of 1e-8 per step in float64)")
    return notes


def write_nir(model: SpikingNetwork, path, *, dt: float = DEFAULT_DT, soft_reset: str = "annotate",
              leak_one: str = "if"):
    """Export ``model`` (:func:`export_nir`) to the HDF5 file ``path`` atomically; returns the graph."""
    nir = require_nir()
    graph = export_nir(model, dt=dt, soft_reset=soft_reset, leak_one=leak_one)
    atomic_write(Path(path), lambda tmp: nir.write(tmp, graph))
    return graph


# ----------------------------------------------------------------------------- import


def is_nir_file(path) -> bool:
    """Whether ``path`` starts like an HDF5 file (NIR's format); only its first bytes are read."""
    try:
        with open(path, "rb") as f:
            return f.read(len(HDF5_MAGIC)) == HDF5_MAGIC
    except OSError:
        return False


def read_nir(path):
    """The ``nir.NIRGraph`` stored at ``path`` (HDF5, read with h5py); a UserError for anything else."""
    nir = require_nir()
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a NIR file")
    if not path.is_file():
        raise UserError(f"NIR file not found: {path}")
    if not is_nir_file(path):
        raise UserError(f"{path} is not a NIR file (HDF5)")
    try:
        graph = nir.read(str(path))
    except Exception as exc:  # noqa: BLE001 - h5py / nir raise many kinds on a damaged file
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"{path} is not a readable NIR graph: {type(exc).__name__}: {reason}") from None
    if not isinstance(graph, nir.NIRGraph):
        raise UserError(f"{path} holds a single NIR node, not a graph")
    return graph


def _reduce(name: str, what: str, per_neuron: np.ndarray, per_channel: bool) -> torch.Tensor:
    """Per-neuron values back to one per channel (``per_channel``) or one scalar; refuses values that vary inside."""
    a = np.asarray(per_neuron, dtype=np.float64)
    rows = a.reshape(a.shape[0], -1) if per_channel else a.reshape(1, -1)
    if not (rows == rows[:, :1]).all():
        raise UserError(f"node {name}: {what} varies {'within a channel' if per_channel else 'across neurons'}; "
                        f"snncompress holds one value {'per channel' if per_channel else 'per layer'}")
    return torch.from_numpy(rows[:, 0].copy() if per_channel else np.array(rows[0, 0]))


def _meta(node) -> dict:
    return dict(getattr(node, "metadata", None) or {})


def _set(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    target = original(module, attr)
    if tuple(value.shape) != tuple(target.shape):
        raise UserError(f"{attr} has shape {tuple(value.shape)} in the file and {tuple(target.shape)} in the model")
    target.copy_(value.to(target.dtype))


def _restore_compression(name: str, attr: str, meta: dict, value: np.ndarray, masks: dict, quantizers: dict) -> None:
    """Collect the mask and quantizer metadata of tensor ``name.attr``; checks that the codes give ``value``."""
    if f"{attr}.mask" in meta:
        mask = np.asarray(meta[f"{attr}.mask"])
        if mask.size != np.size(value):
            raise UserError(f"node {name}: {attr}.mask has {mask.size} entries, the {attr} {np.size(value)}")
        masks[f"{name}.{attr}"] = torch.from_numpy(mask.reshape(np.shape(value))).bool()
    if f"{attr}.quantizer" in meta:
        quantizer = quantizer_from_config(json.loads(str(meta[f"{attr}.quantizer"])))
        quantizer.scale.fill_(float(meta[f"{attr}.scale"]))
        codes = np.asarray(meta[f"{attr}.codes"]).astype(np.int64)
        if codes.size != np.size(value):
            raise UserError(f"node {name}: {attr}.codes has {codes.size} entries, the {attr} {np.size(value)}")
        decoded = quantizer.dequantize(torch.from_numpy(codes.reshape(np.shape(value)))).numpy()
        if not np.array_equal(decoded, np.asarray(value, np.float32)):
            raise UserError(f"node {name}: {attr}.codes * {attr}.scale differ from the node's {attr}")
        quantizers[f"{name}.{attr}"] = quantizer


def _import_neuron(nir, layer: Layer, node, dt: float, masks: dict, quantizers: dict) -> None:
    lif: LIF = layer.module
    meta = _meta(node)
    if not isinstance(node, (nir.LIF, nir.IF)):
        raise UserError(f"node {layer.name} is a {type(node).__name__}, expected LIF or IF")
    if not np.all(np.asarray(node.v_reset) == 0):
        raise UserError(f"node {layer.name}: v_reset != 0; snncompress resets to 0 (or subtracts the threshold)")
    reset = "soft" if str(meta.get("reset", "zero")) == "subtract" else "hard"
    if reset != lif.reset:
        raise UserError(f"node {layer.name}: reset {reset!r} disagrees with the architecture's {lif.reset!r}")
    threshold = np.asarray(node.v_threshold, np.float32)
    if threshold.shape != tuple(layer.out_shape):
        raise UserError(f"node {layer.name}: neuron parameters of shape {threshold.shape}, the layer has shape "
                        f"{tuple(layer.out_shape)}")
    if isinstance(node, nir.IF):
        if not np.allclose(np.asarray(node.r, np.float64) * dt, 1.0, rtol=1e-5):
            raise UserError(f"node {layer.name}: IF with r != 1/dt scales its input current; not representable")
        leak_field = np.ones(threshold.shape)
    else:
        tau, r = np.asarray(node.tau, np.float64), np.asarray(node.r, np.float64)
        if not np.all(np.asarray(node.v_leak) == 0):
            raise UserError(f"node {layer.name}: v_leak != 0 is not representable")
        if not np.allclose(r * dt / tau, 1.0, rtol=1e-5):
            raise UserError(f"node {layer.name}: r != tau/dt scales the input current; not representable")
        leak_field = 1.0 - dt / tau
    leak = _reduce(layer.name, "the leak (1 - dt/tau)", leak_field, lif.per_channel)
    if "leak" in meta:
        exact = torch.from_numpy(np.asarray(meta["leak"], np.float32).reshape(leak.shape).copy())
        if (exact.double() - leak).abs().max() > LEAK_TOLERANCE:
            raise UserError(f"node {layer.name}: metadata leak disagrees with 1 - dt/tau")
        leak = exact
    thr = _reduce(layer.name, "v_threshold", threshold, lif.per_channel)
    _set(lif, "leak", leak.float())
    _set(lif, "threshold", thr.float())
    for attr, value in (("leak", lif.leak), ("threshold", lif.threshold)):
        _restore_compression(layer.name, attr, meta, value.detach().numpy(), masks, quantizers)


def _import_batchnorm(layer: Layer, node) -> None:
    bn: nn.BatchNorm2d = layer.module
    meta = _meta(node)
    needed = ["batchnorm.running_mean", "batchnorm.running_var", "batchnorm.eps"]
    if not all(k in meta for k in needed):
        raise UserError(f"node {layer.name}: a Conv2d without the batchnorm metadata snncompress wrote")
    bn.running_mean.copy_(torch.from_numpy(np.asarray(meta["batchnorm.running_mean"], np.float32)))
    bn.running_var.copy_(torch.from_numpy(np.asarray(meta["batchnorm.running_var"], np.float32)))
    if bn.affine:
        bn.weight.copy_(torch.from_numpy(np.asarray(meta["batchnorm.weight"], np.float32)))
        bn.bias.copy_(torch.from_numpy(np.asarray(meta["batchnorm.bias"], np.float32)))
    scale = (bn.weight.double() if bn.affine else 1.0) / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = np.asarray(node.weight, np.float64)
    c = bn.num_features
    if weight.shape != (c, c, 1, 1) or not np.allclose(weight[:, :, 0, 0], np.diag(scale.numpy()), rtol=1e-5,
                                                        atol=1e-7):
        raise UserError(f"node {layer.name}: the diagonal 1x1 weight disagrees with its batchnorm metadata")


def _import_layer(nir, layer: Layer, node, dt: float, masks: dict, quantizers: dict) -> None:
    m = layer.module
    expected = {"conv": nir.Conv2d, "batchnorm": nir.Conv2d, "linear": (nir.Linear, nir.Affine),
                "pool": nir.AvgPool2d, "flatten": nir.Flatten}
    if layer.kind == "lif":
        return _import_neuron(nir, layer, node, dt, masks, quantizers)
    if not isinstance(node, expected[layer.kind]):
        raise UserError(f"node {layer.name} is a {type(node).__name__}, the architecture has a {layer.kind} there")
    if layer.kind == "batchnorm":
        return _import_batchnorm(layer, node)
    if layer.kind == "pool":
        k, s = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size)
        if (tuple(int(v) for v in np.ravel(node.kernel_size)) != k or tuple(int(v) for v in np.ravel(node.stride)) != s
                or np.any(np.asarray(node.padding) != 0)):
            raise UserError(f"node {layer.name}: pooling differs from the architecture's {k} / stride {s}")
        return None
    if layer.kind == "flatten":
        return None
    weight = np.asarray(node.weight, np.float32)
    if layer.kind == "conv":
        if (_pair(node.stride) != _pair(m.stride) or _pair(node.padding) != _pair(m.padding)
                or _pair(node.dilation) != _pair(m.dilation) or int(node.groups) != m.groups):
            raise UserError(f"node {layer.name}: stride, padding, dilation or groups differ from the architecture")
    bias = getattr(node, "bias", None)
    if m.bias is None and bias is not None and np.any(np.asarray(bias) != 0):
        raise UserError(f"node {layer.name} has a nonzero bias; this architecture's layer has none")
    try:
        _set(m, "weight", torch.from_numpy(weight.copy()))
    except UserError as exc:
        raise UserError(f"node {layer.name}: {exc}") from None
    if m.bias is not None and bias is not None:
        _set(m, "bias", torch.from_numpy(np.asarray(bias, np.float32).copy()))
    _restore_compression(layer.name, "weight", _meta(node), weight, masks, quantizers)
    return None


@torch.no_grad()
def import_nir(graph) -> SpikingNetwork:
    """Rebuild the snncompress model of a NIR graph this module wrote (a ``nir.NIRGraph`` or a file path).

    The architecture comes from the graph metadata ``snncompress_spec``; weights, leaks and
    thresholds from the nodes' NIR fields; masks and quantizers from the nodes' metadata.
    Returns the model in eval mode; a UserError when the graph is not one snncompress can hold.
    """
    nir = require_nir()
    if not isinstance(graph, nir.NIRGraph):
        graph = read_nir(graph)
    meta = _meta(graph)
    if "snncompress_spec" not in meta:
        raise UserError("this NIR graph was not written by snncompress (no snncompress_spec metadata); "
                        "importing foreign graphs is not supported")
    if int(meta.get("snncompress_format", 0)) != NIR_FORMAT:
        raise UserError(f"NIR metadata format {meta.get('snncompress_format')} is not {NIR_FORMAT}")
    try:
        spec = json.loads(str(meta["snncompress_spec"]))
    except (json.JSONDecodeError, RecursionError):
        raise UserError("the graph's snncompress_spec metadata is not JSON") from None
    if not isinstance(spec, dict):
        raise UserError("the graph's snncompress_spec metadata is not a mapping")
    dt = _check_dt(meta.get("dt", DEFAULT_DT))
    try:
        with torch.device("meta"):  # a spec asking for a huge network fails before memory is allocated
            build_from_spec(spec)
        model = build_from_spec(spec)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"the graph's snncompress_spec does not describe a model: {exc}") from None
    found = layers(model)
    names = ["input", *(layer.name for layer in found), "output"]
    if set(graph.nodes) != set(names):
        extra, missing = sorted(set(graph.nodes) - set(names)), sorted(set(names) - set(graph.nodes))
        raise UserError(f"the graph's nodes differ from its architecture (extra {extra}, missing {missing})")
    if sorted(map(tuple, graph.edges)) != sorted(zip(names[:-1], names[1:])):
        raise UserError("the graph's edges are not the chain of its architecture's layers")
    masks, quantizers = {}, {}
    for layer in found:
        _import_layer(nir, layer, graph.nodes[layer.name], dt, masks, quantizers)
    set_masks(model, masks)
    for name, quantizer in quantizers.items():
        attach_quantizer(model, name, quantizer, calibrate=False)
    return model.eval()


def load_nir(path) -> SpikingNetwork:
    """The snncompress model stored in the NIR file ``path`` (written by :func:`write_nir`), in eval mode."""
    return import_nir(read_nir(path))


# ----------------------------------------------------------------------------- spike counts, cross-framework


@torch.no_grad()
def layer_spike_counts(model: SpikingNetwork, images: torch.Tensor) -> tuple[dict[str, int], torch.Tensor]:
    """``({LIF name: spikes over all steps and images}, logits [B, classes])`` of ``model`` on ``images``."""
    with SpikeMeter(model) as meter:
        logits = model.eval()(images)
    return {name: int(spikes) for name, spikes in meter.spikes.items()}, logits


@torch.no_grad()
def snntorch_spike_counts(graph, images: torch.Tensor, timesteps: int) -> tuple[dict[str, int], torch.Tensor]:
    """Run ``graph`` through snnTorch's own NIR importer (``snntorch.import_nir.import_from_nir``).

    The images are fed one at a time, each unchanged at every one of ``timesteps`` steps
    (snnTorch's importer turns NIR's ``Flatten(start_dim=0)`` into ``torch.nn.Flatten(0)``, which
    would merge a batch). Returns ``({NIR node name: spikes}, logits [B, classes])`` where the
    logits are the output summed over the steps. Raises what snnTorch raises for nodes it refuses.
    """
    import copy
    import contextlib
    import io

    import snntorch
    from snntorch.import_nir import import_from_nir

    with contextlib.redirect_stdout(io.StringIO()):  # the importer prints progress lines
        net = import_from_nir(copy.deepcopy(graph))
    sanitized = {name.replace(".", "_"): name for name in graph.nodes}
    neurons = {sanitized.get(name, name): m for name, m in net.named_modules() if isinstance(m, snntorch.Leaky)}
    counts = {name: 0 for name in neurons}
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: counts.__setitem__(name, counts[name] + int(o.sum())))
             for name, m in neurons.items()]
    logits = []
    try:
        for image in images:
            for m in neurons.values():
                m.mem = torch.zeros(0)  # fresh state: Leaky re-creates zeros of the input's shape
            total = 0
            for _ in range(int(timesteps)):
                out = net(image.unsqueeze(0))
                total = total + (out[0] if isinstance(out, tuple) else out)
            logits.append(torch.as_tensor(total).reshape(-1))
    finally:
        for h in hooks:
            h.remove()
    return counts, torch.stack(logits)


# ----------------------------------------------------------------------------- the command


def export_command(source, fmt: str, out, *, dt: float = DEFAULT_DT, soft_reset: str = "annotate",
                   leak_one: str = "if") -> None:
    """``snncompress export SOURCE --format nir|safetensors --out FILE``.

    ``SOURCE`` is a checkpoint (``.safetensors``) or a NIR file this package wrote
    (recognised by its HDF5 header). Checks everything before writing; prints what was written.
    """
    from ..checkpoint import load_checkpoint, save_checkpoint

    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name")
    folder = next((p for p in out.parents if p.exists()), Path("."))
    if not folder.is_dir():
        raise UserError(f"--out {out}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {folder} is not writable")
    dt = _check_dt(dt)
    if fmt not in ("nir", "safetensors"):
        raise UserError(f"--format must be nir or safetensors, got {fmt!r}")
    if fmt == "nir":
        require_nir()
    source = Path(source)
    from_nir = source.is_file() and is_nir_file(source)
    model = load_nir(source) if from_nir else load_checkpoint(source).model
    if fmt == "safetensors":
        save_checkpoint(out, model, info={"imported_from": source.name} if from_nir else {"copied_from": source.name})
        print(f"wrote {out}: snncompress checkpoint of {model.spec.get('arch')} (T = {model.timesteps}) "
              f"from {'NIR file' if from_nir else 'checkpoint'} {source.name}")
        return
    graph = write_nir(model, out, dt=dt, soft_reset=soft_reset, leak_one=leak_one)
    kinds: dict[str, int] = {}
    for node in graph.nodes.values():
        kinds[type(node).__name__] = kinds.get(type(node).__name__, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in kinds.items() if k not in ("Input", "Output"))
    print(f"wrote {out}: NIR graph of {model.spec.get('arch')} ({summary}), dt {dt:g}, T {model.timesteps}")
    for note in export_notes(graph):
        print(f"note: {note}")
