"""Import: read a NIR file this package wrote and rebuild the snncompress model it holds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...compress.masks import original, set_masks
from ...compress.quantizers import attach_quantizer
from ...errors import UserError
from ...models import SpikingNetwork, build_from_spec
from ...neuron import LIF
from .graph import import_graph, import_own_graph
from .mapping import (DEFAULT_DT, HDF5_MAGIC, LEAK_TOLERANCE, NIR_FORMAT, Layer, _check_dt, _pair, layers,
                      require_nir, restore_compression)


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
    _check_version(path, nir)
    try:
        graph = nir.read(str(path))
    except Exception as exc:  # noqa: BLE001 - h5py / nir raise many kinds on a damaged file
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"{path} is not a readable NIR graph: {type(exc).__name__}: {reason}") from None
    if not isinstance(graph, nir.NIRGraph):
        raise UserError(f"{path} holds a single NIR node, not a graph")
    return graph


def _check_version(path: Path, nir) -> None:
    """Refuse a file whose NIR major version is newer than the installed ``nir`` reads (or that has none)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "version" not in f or "node" not in f:
                raise UserError(f"{path} is an HDF5 file but not a NIR graph (no 'version' and 'node' entries)")
            raw = f["version"][()]
    except OSError as exc:
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"{path} is not a readable NIR graph: {reason}") from None
    written = (raw.decode("utf8") if isinstance(raw, bytes) else str(raw)).strip()
    installed = str(getattr(nir, "version", "1"))
    try:
        major, ours = int(written.split(".")[0]), int(installed.split(".")[0])
    except ValueError:
        raise UserError(f"{path}: NIR version {written!r} is not a version number") from None
    if major > ours:
        raise UserError(f"{path} was written by NIR {written}, a newer major version than the installed nir "
                        f"{installed} reads; upgrade nir (pip install -U nir) or export with NIR {ours}.x")


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
        restore_compression(layer.name, attr, meta, value.detach().numpy(), masks, quantizers)


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
    restore_compression(layer.name, "weight", _meta(node), weight, masks, quantizers)
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
        raise UserError("this NIR graph was not written by snncompress (no snncompress_spec metadata); import it "
                        "as a graph network: snncompress import FILE.nir --out CKPT (or load_nir(path, timesteps=...))")
    if int(meta.get("snncompress_format", 0)) != NIR_FORMAT:
        raise UserError(f"NIR metadata format {meta.get('snncompress_format')} is not {NIR_FORMAT}")
    try:
        spec = json.loads(str(meta["snncompress_spec"]))
    except (json.JSONDecodeError, RecursionError):
        raise UserError("the graph's snncompress_spec metadata is not JSON") from None
    if not isinstance(spec, dict):
        raise UserError("the graph's snncompress_spec metadata is not a mapping")
    if spec.get("family") == "graph":
        return import_own_graph(graph, spec)
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


def load_nir(path, **import_options) -> SpikingNetwork:
    """The model in the NIR file ``path``, in eval mode: the one :func:`write_nir` wrote (its spec is in the file),
    or, for a graph from another framework, a graph network built by :func:`.graph.import_graph` with
    ``import_options`` (``timesteps``, ``input_shape``, ``dt``, ``integration``)."""
    graph = read_nir(path)
    if "snncompress_spec" not in _meta(graph):
        return import_graph(graph, **import_options)
    return import_nir(graph)
