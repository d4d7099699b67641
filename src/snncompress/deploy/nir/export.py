"""Export: a spiking VGG / convnet as a ``nir.NIRGraph`` (the mapping is in the package docstring)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...compress.state import stored_tensors
from ...errors import UserError
from ...io import atomic_write
from ...models import SpikingNetwork
from ...models.chain import batchnorm_affine
from ...neuron import LIF
from .graph import export_graph
from .mapping import (DEFAULT_DT, LEAK_ONE_MODES, LEAK_ONE_TAU_STEPS, NIR_FORMAT, SOFT_RESET_MODES, Layer, _check_dt,
                      _pair, layers, make_node, require_nir)


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
        return make_node(nir.IF, r=np.full(shape, 1.0 / dt, np.float32), v_threshold=threshold, v_reset=zeros,
                         metadata=meta)
    if leak_one == "if" and bool((leak == 1).any()):
        raise UserError(f"{layer.name}: per-channel leaks mix 1 (IF, no finite tau) and values below 1 (LIF); "
                        f"NIR has no node for such a layer (--leak-one lif writes leak 1 as tau = 1e8 dt)")
    one_minus = 1.0 - _per_neuron(leak, shape)
    one_minus[one_minus == 0] = 1.0 / LEAK_ONE_TAU_STEPS
    return make_node(nir.LIF, tau=(dt / one_minus).astype(np.float32), r=(1.0 / one_minus).astype(np.float32),
                   v_leak=zeros, v_threshold=threshold, v_reset=zeros.copy(), metadata=meta)


def _batchnorm_node(nir, layer: Layer):
    bn: nn.BatchNorm2d = layer.module
    c = bn.num_features
    scale, shift = batchnorm_affine(bn)
    meta = {"batchnorm.running_mean": _array(bn.running_mean), "batchnorm.running_var": _array(bn.running_var),
            "batchnorm.eps": float(bn.eps), "batchnorm.affine": bool(bn.affine)}
    if bn.affine:
        meta.update({"batchnorm.weight": _array(bn.weight), "batchnorm.bias": _array(bn.bias)})
    # A diagonal 1x1 convolution rather than a depthwise one: nir 1.0's type check takes a Conv2d's input
    # channels from weight.shape[1], which a grouped convolution's weight does not hold.
    return make_node(nir.Conv2d, input_shape=tuple(layer.in_shape[1:]),
                     weight=_array(torch.diag(scale)).reshape(c, c, 1, 1), stride=(1, 1), padding=(0, 0),
                     dilation=(1, 1), groups=1,
                     bias=_array(shift), metadata=meta)


def _node(nir, layer: Layer, dt: float, soft_reset: str, leak_one: str, stored: dict):
    m = layer.module
    if layer.kind == "conv":
        bias = _array(m.bias) if m.bias is not None else np.zeros(m.out_channels, np.float32)
        return make_node(nir.Conv2d, input_shape=tuple(layer.in_shape[1:]), weight=_array(m.weight),
                         stride=_pair(m.stride), padding=_pair(m.padding), dilation=_pair(m.dilation),
                         groups=int(m.groups), bias=bias,
                          metadata=_compression_metadata(stored.get(f"{layer.name}.weight"), "weight"))
    if layer.kind == "linear":
        meta = _compression_metadata(stored.get(f"{layer.name}.weight"), "weight")
        if m.bias is not None:
            return make_node(nir.Affine, weight=_array(m.weight), bias=_array(m.bias), metadata=meta)
        return make_node(nir.Linear, weight=_array(m.weight), metadata=meta)
    if layer.kind == "batchnorm":
        return _batchnorm_node(nir, layer)
    if layer.kind == "lif":
        return _neuron_node(nir, layer, dt, soft_reset, leak_one, stored)
    if layer.kind == "pool":
        k = _pair(m.kernel_size)
        s = _pair(m.stride if m.stride is not None else m.kernel_size)
        return make_node(nir.AvgPool2d, kernel_size=np.array(k), stride=np.array(s), padding=np.array([0, 0]))
    return make_node(nir.Flatten, input_type={"input": np.array(layer.in_shape)}, start_dim=0, end_dim=-1)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("snncompress")
    except Exception:  # noqa: BLE001 - a source tree that was never installed
        return "0+unknown"


@torch.no_grad()
def export_nir(model: SpikingNetwork, *, dt: float = DEFAULT_DT, soft_reset: str = "annotate",
               leak_one: str = "if"):
    """The model as a ``nir.NIRGraph`` (see the module docstring for the mapping and its conventions).

    Args:
        model: a spiking VGG / convnet or an imported graph network (pruned, masked, quantized or not); it is
            left as it was. A graph network is written in the node kinds, ``dt`` and reset it was imported
            with (:mod:`.graph`); ``dt``, ``soft_reset`` and ``leak_one`` apply to the VGG family.
        dt: the simulation step the consumer must use; ``tau = dt / (1 - leak)``.
        soft_reset: ``"annotate"`` (keep soft reset as node metadata ``reset = "subtract"``) or
            ``"refuse"`` (raise UserError for a soft-reset model).
        leak_one: neurons with leak 1 as ``"if"`` (IF nodes, ``r = 1/dt``) or ``"lif"``
            (LIF nodes with ``tau = 1e8 dt``; see the module docstring).
    """
    nir = require_nir()
    if "nir" not in type(model).EXPORTS:
        arch = model.spec.get("arch", model.spec.get("family"))
        raise UserError(f"{arch} is not supported by NIR export (family {model.spec.get('family')}): it writes the "
                        f"VGG family (vgg5/9/11/16, convnet) and imported graph networks")
    if model.spec.get("family") == "graph":  # the graph's own node kinds, dt and integration
        return export_graph(model, _compression_metadata, _version())
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
        nodes = {"input": make_node(nir.Input, input_type={"input": np.array(found[0].in_shape if found else
                                                                  model.spec["in_shape"])})}
        for layer in found:
            nodes[layer.name] = _node(nir, layer, dt, soft_reset, leak_one, stored)
        nodes["output"] = make_node(nir.Output, output_type={"output": np.array(found[-1].out_shape)})
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
    return make_node(nir.NIRGraph, nodes=nodes, edges=list(zip(names[:-1], names[1:])), metadata=metadata,
                     type_check=True)


def export_notes(graph) -> list[str]:
    """One line per thing a consumer must know about ``graph`` beyond NIR's own semantics."""
    soft = [n for n, node in graph.nodes.items() if getattr(node, "metadata", {}).get("reset") == "subtract"]
    per_channel = [n for n, node in graph.nodes.items()
                   if hasattr(node, "v_threshold") and np.unique(node.v_threshold).size > 1]
    if_nodes = [n for n, node in graph.nodes.items() if type(node).__name__ == "IF"]
    step = f"dt = {float(graph.metadata['dt']):g}" if "dt" in graph.metadata else "any dt (no node depends on it)"
    notes = [f"simulate with {step} and feed the input at each of the {int(graph.metadata['timesteps'])} steps; "
             f"logits = sum of the output over the steps"]
    if soft:
        notes.append(f"soft reset kept as metadata reset='subtract' on {', '.join(soft)}: a consumer that ignores "
                     f"it resets to v_reset = 0 (hard reset)")
    if per_channel:
        notes.append(f"per-neuron thresholds on {', '.join(per_channel)} (importers that take one threshold per "
                     f"layer, such as snnTorch's, refuse them)")
    if if_nodes:
        notes.append(f"leak 1 exported as IF with r = 1/dt on {', '.join(if_nodes)}; snnTorch 1.0's importer "
                     f"refuses IF nodes (r != 1): for snnTorch export with --leak-one lif")
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
