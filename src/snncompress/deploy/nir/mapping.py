"""What export and import share: the format constants, the ``nir`` import, the ``dt`` check and the layer walk."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ...compress.quantizers import quantizer_from_config
from ...errors import UserError
from ...models import SpikingNetwork
from ...models.base import TimeDropout
from ...neuron import LIF

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


def make_node(cls, **fields):
    """A NIR node (or graph) of class ``cls`` from the ``fields`` the installed nir knows: nir 1.0.4, which Sinabs
    pins, has no node metadata, no ``v_reset`` on IF and no ``type_check``; what it cannot hold is left out."""
    import inspect

    known = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in fields.items() if k in known})


def _check_dt(dt: float) -> float:
    dt = float(dt)
    if not math.isfinite(dt) or dt <= 0:
        raise UserError(f"dt must be a positive number of seconds, got {dt}")
    return dt


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
    if "nir" not in type(model).EXPORTS or not hasattr(model, "features"):
        arch = model.spec.get("arch", model.spec.get("family"))
        raise UserError(f"NIR export supports the VGG family (vgg5/9/11/16, convnet) and imported graph networks; "
                        f"{arch} is not supported yet (its residual sums would need multi-input nodes)")
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


def restore_compression(name: str, attr: str, meta: dict, value: np.ndarray, masks: dict, quantizers: dict) -> None:
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
