"""Compile a spiking network into the tables of the C engine (docs/deployment/c.md).

The engine runs any model that describes itself as a chain of synaptic layers
(:meth:`SpikingNetwork.synaptic_chain`, :mod:`snncompress.models.chain`): spiking VGG / convnet
models and imported graph networks of that shape. Each :class:`ChainUnit` (conv/linear, its
affine map, neuron and pooling) becomes one :class:`EngineLayer`.

:func:`compile_engine` turns a model into an :class:`Engine`: a list of :class:`EngineLayer`
holding numpy arrays, exactly the constants the generated ``snn_model.c`` stores and the
numpy reference (:mod:`.reference`) computes with. Both engines read the same tables, so
they cannot disagree about a folded constant.

Layout. Every feature map is stored channels-last (``[H, W, C]``, index ``(y*W + x)*C + c``):
a spike at input position ``(y, x)`` of channel ``ci`` fans out, for each of the 9 taps,
to a run of output channels at one output position. A classifier layer's input columns are
reordered from PyTorch's ``[C, H, W]`` flattening to that order at export.

Layer kinds:

* ``input_conv``: the first convolution, fed by the uint8 image; the input normalisation
  ``(p/255 - mean)/std`` and BatchNorm are folded into its weights and a bias table
  ``bias[c][border]`` (border = which taps fall outside the image, 16 classes), computed once
  per image (direct input, as the model does).
* ``conv`` / ``linear``: fed by spike events (index, count); a count > 1 comes from pooling
  (average pooling's ``1/k^2`` is folded into this layer's weights or units; sum pooling has none).
  The last layer is the output: without a neuron it sums currents into the logits, with one
  (a network that ends in spiking neurons) the logits count its spikes. A pruned layer
  (where that is smaller) stores only its nonzero weights: per input channel and tap (conv)
  or per input (linear), a run of ``(target, weight)`` pairs; otherwise the dense run of all
  output channels, with no targets.

Arithmetic. A float model runs float32: ``u = leak*u_hat [+ bias]``, then each event adds
``w*k``; spike when ``u/thr - 1 >= 0`` (PyTorch's test, which the runtime evaluates without a
division as ``u >= fire_at``, :func:`firing_point`); soft reset ``u - thr``, hard ``0``.
A model whose every conv/linear weight is quantized runs integer-only: weights are their
integer codes, the membrane of layer ``l`` is an int32 in units ``unit_c * 2^-F_l`` where
``unit_c = |scale_c * bn_gain_c| / pool_divisor`` (one fixed-point scale per layer, F_l chosen
at export so no int32 can overflow over T steps); leak is Q16 (``(leak*u + 2^15) >> 16``),
threshold and bias are rounded to the membrane's unit. Logits are int32 (units in
:attr:`Engine.logit_scale`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ...compress.quantizers import get_quantizers
from ...errors import UserError
from ...models.chain import ChainUnit, per_channel
from ...neuron import LIF

#: Fraction bits of the Q16 leak of the integer engine.
LEAK_BITS = 16
#: Extra fraction bits of the first layer's input-scale multiplier (integer engine).
INPUT_BITS = 16
#: Largest membrane magnitude the integer engine lets a layer reach (int32 with headroom).
MEMBRANE_LIMIT = 2 ** 30
#: Largest fraction-bit count of a membrane.
MAX_FRAC_BITS = 16


@dataclass
class EngineLayer:
    """One synaptic layer with its neuron (or the output layer); arrays are the stored constants.

    Shapes: conv maps ``(C, H, W)``; linear ``(N, 1, 1)``. ``weights`` is ``[out_c, in_c, 3, 3]``
    (input conv), ``[in_c*9, out_c]`` or ``[in, out]`` (dense event layers), or the flat kept
    weights of ``ptr``/``targets`` (sparse event layers).
    """

    kind: str                      # "input_conv" | "conv" | "linear"
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    spiking: bool
    weights: np.ndarray
    ptr: np.ndarray | None = None       # int32 [groups + 1] (sparse)
    targets: np.ndarray | None = None   # int32 [kept] output channel / output index (sparse)
    bias: np.ndarray | None = None      # [out_c] added each step (BatchNorm shift), membrane units
    input_scale: np.ndarray | None = None  # [in_c] input conv: 1/(255 std) (float) or its Q(F+16) (int)
    border_bias: np.ndarray | None = None  # [out_c, 16] input conv: normalisation + BN shift
    leak: np.ndarray | None = None      # [out_c] float32, or int32 Q16
    threshold: np.ndarray | None = None  # [out_c] float32, or int32 in membrane units
    fire_at: np.ndarray | None = None   # [out_c] float engine: least u with u/thr - 1 >= 0 in float32
    hard_reset: bool = False
    leak_one: bool = False              # every leak is exactly 1 and no bias: the leak pass is skipped
    pool: int = 1                       # k of the k x k average pooling after the spikes (1: none)
    frac_bits: int = 0                  # F of the integer membrane
    state_mul: np.ndarray | None = None  # [out_c] int64 (int) / float32 scale (float): membrane quantizer
    state_shift: int = 0
    state_back: np.ndarray | None = None  # [out_c] int32 code -> membrane units (int)
    state_qmax: int = 0
    name: str = ""
    #: integer input conv while compiling: float64 ``(1/(255 std), -mean/std, BN shift)``
    input_fold: tuple | None = None

    @property
    def out_count(self) -> int:
        return int(np.prod(self.out_shape))

    @property
    def pooled_shape(self) -> tuple[int, int, int]:
        c, h, w = self.out_shape
        return (c, h // self.pool, w // self.pool)

    @property
    def dense(self) -> bool:
        return self.ptr is None


@dataclass
class Engine:
    """A compiled model: layers in order (the last is the output layer), T, and the number type."""

    layers: list[EngineLayer]
    timesteps: int
    integer: bool
    in_shape: tuple[int, int, int]
    num_classes: int
    logit_mul: np.ndarray | None = None   # [K] int32 (integer engine): logits = sum * logit_mul
    logit_scale: float = 1.0              # real logit = integer logit * logit_scale (integer engine)
    weight_bits: int = 32


# ----------------------------------------------------------------------------- checks


def check_supported(model) -> list[ChainUnit]:
    """The model's chain of synaptic layers (:mod:`snncompress.models.chain`) when the C engine runs it;
    a one-line UserError naming what it does not run otherwise."""
    spec = getattr(model, "spec", {}) or {}
    family = spec.get("family")
    if family == "resnet":
        raise UserError("the C engine does not run ResNets (residual shortcuts); export a VGG or convnet")
    if family == "stdp":
        raise UserError("the C engine does not run the Diehl & Cook STDP network (lateral inhibition, "
                        "adaptive thresholds); export a VGG or convnet")
    if "c" not in getattr(model, "EXPORTS", ()):
        raise UserError(f"the C engine runs spiking VGG / convnet and imported graph models, not "
                        f"{type(model).__name__}")
    if not model.spiking:
        raise UserError("the C engine runs spiking models; this checkpoint is an ANN (ReLU)")
    if spec.get("encoding", "direct") != "direct":
        raise UserError(f"the C engine needs direct input; this model uses {spec.get('encoding')!r} "
                        f"encoding (random spike trains)")
    try:
        chain = model.synaptic_chain()
    except ValueError as err:
        raise UserError(f"the C engine runs a chain of conv / linear layers with neurons: {err}") from None
    if not chain or not isinstance(chain[0].op, nn.Conv2d):
        raise UserError("the C engine needs a convolution as the first layer")
    for index, unit in enumerate(chain):
        name = _name(model, unit.op)
        last = index == len(chain) - 1
        if isinstance(unit.op, nn.Conv2d):
            _check_conv(unit.op, name)
            if unit.lif is None:
                raise UserError("the C engine needs a neuron after every convolution")
        if unit.lif is None and not last:
            raise UserError(f"layer {name}: only the output layer may have no neuron in the C engine")
        if last and (not isinstance(unit.op, nn.Linear) or unit.pool > 1):
            raise UserError(f"layer {name}: the C engine's output layer is a linear layer without pooling")
    return chain


def _check_conv(conv: nn.Conv2d, name: str) -> None:
    """A UserError unless ``conv`` is the engine's 3x3, stride 1, padding 1 ('same') convolution."""
    same = (tuple(conv.kernel_size) == (3, 3) and tuple(conv.stride) == (1, 1) and conv.groups == 1
            and conv.padding in ((1, 1), "same") and tuple(conv.dilation) == (1, 1)
            and conv.padding_mode == "zeros")
    if not same:
        raise UserError(f"layer {name}: the C engine runs 3x3 convolutions with stride 1 and zero padding 1 "
                        f"(this one: kernel {tuple(conv.kernel_size)}, stride {tuple(conv.stride)}, padding "
                        f"{conv.padding}, dilation {tuple(conv.dilation)}, groups {conv.groups})")


# ----------------------------------------------------------------------------- compiling helpers


def _silence_channels_that_cannot_fire(codes: np.ndarray, input_unit: np.ndarray, shift: np.ndarray,
                                       threshold: np.ndarray, t: int) -> np.ndarray:
    """``codes`` with the channels zeroed whose membrane can never reach threshold in ``t`` steps.

    ``input_unit``: the largest real current per code unit from one input event ``[out]``; ``shift``: the
    folded bias ``[out]``; ``threshold``: ``[out]``.
    Even if every input spiked at every step, such a channel's membrane stays below ``t * (fan-in + |bias|)``
    (leak <= 1), below its threshold: it never spikes, in PyTorch or here, so its codes change nothing
    observable. Channels whose weights decayed to ~1e-38 (a power-of-two scale of 2^-127) would otherwise
    need a threshold beyond any int32 membrane.
    """
    out_c = codes.shape[0]
    fan_in = np.abs(codes.reshape(out_c, -1)).sum(1) * input_unit
    never = t * (fan_in + np.abs(shift)) < threshold
    if not never.any():
        return codes
    codes = codes.copy()
    codes[never] = 0
    return codes


def _units_of_dead_channels(codes: np.ndarray, unit_c: np.ndarray) -> np.ndarray:
    """``unit_c`` with the unit of every output channel whose codes are all zero set to the layer's largest.

    Such a channel's current is its bias alone, so its unit is free; the quantizer's scale for an all-zero
    channel can be subnormal (1e-39), which would put its threshold beyond any int32 membrane.
    """
    dead = ~np.any(codes.reshape(codes.shape[0], -1) != 0, axis=1)
    if not dead.any() or dead.all():
        return unit_c
    return np.where(dead, unit_c[~dead].max(), unit_c)


def _hwc_columns(weight: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Reorder a linear weight ``[out, C*H*W]`` (PyTorch's flattening) to ``[out, H*W*C]`` (ours)."""
    c, h, w = shape
    return weight.reshape(weight.shape[0], c, h, w).transpose(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _border_class(y: int, size: int) -> int:
    """Bit 0: the tap before ``y`` is inside; bit 1: the tap after ``y`` is inside."""
    return int(y > 0) | (int(y < size - 1) << 1)


def border_classes(h: int, w: int) -> np.ndarray:
    """``[H, W]`` int: the 16-way border class ``row_class*4 + col_class`` of each position."""
    rows = np.array([_border_class(y, h) for y in range(h)])
    cols = np.array([_border_class(x, w) for x in range(w)])
    return rows[:, None] * 4 + cols[None, :]


def _tap_inside(cls: int, k: int) -> bool:
    """Whether tap offset ``k`` (0, 1, 2) is inside for a 2-bit border class."""
    return k == 1 or (k == 0 and bool(cls & 1)) or (k == 2 and bool(cls & 2))


def _border_sums(weight: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``[out_c, 16]``: sum over the taps inside the image of ``weight[o, ci, ky, kx] * shift[ci]``."""
    out = np.zeros((weight.shape[0], 16))
    for cls in range(16):
        rows, cols = cls // 4, cls % 4
        inside = np.array([[_tap_inside(rows, ky) and _tap_inside(cols, kx) for kx in range(3)] for ky in range(3)])
        out[:, cls] = (weight * shift[None, :, None, None] * inside[None, None]).sum((1, 2, 3))
    return out


def _event_tables(weight: np.ndarray, integer: bool, weight_bytes: int) -> dict:
    """Fan-out tables of an event layer from its weight as ``[groups, out]`` (rows = input groups).

    The kept (nonzero) weights with their targets when that is smaller than the dense runs
    (a pruned layer), else the dense runs (zeros included: adding a zero changes nothing).
    """
    dtype = np.int32 if integer else np.float32
    groups, outputs = weight.shape
    rows, cols = np.nonzero(weight)
    target_bytes = 1 if outputs <= 256 else (2 if outputs <= 65536 else 4)
    sparse_bytes = rows.size * (weight_bytes + target_bytes) + (groups + 1) * 4
    if sparse_bytes >= weight.size * weight_bytes:
        return {"weights": weight.astype(dtype)}
    ptr = np.zeros(groups + 1, dtype=np.int64)
    np.add.at(ptr, rows + 1, 1)
    return {"weights": weight[rows, cols].astype(dtype), "ptr": np.cumsum(ptr).astype(np.int32),
            "targets": cols.astype(np.int32)}


def _fan_out(op: nn.Module, weight: np.ndarray, in_shape) -> np.ndarray:
    """Weight ``[groups, out]``: conv ``[ci*9 + tap, co]``, linear ``[input (HWC order), output]``."""
    if isinstance(op, nn.Conv2d):
        return weight.transpose(1, 2, 3, 0).reshape(-1, weight.shape[0])
    if in_shape[1] * in_shape[2] > 1:
        weight = _hwc_columns(weight, in_shape)
    return weight.T


# ----------------------------------------------------------------------------- compiling


def _weights(op: nn.Module, integer: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(weight float64 or integer codes, per-output scale [out] float64)`` of a conv/linear."""
    w = op.weight.detach().cpu()
    out = w.shape[0]
    if not integer:
        return w.double().numpy(), np.ones(out)
    quantizer = next(q for name, q in get_quantizers(op).items() if name == "weight")
    codes = quantizer.codes(w, stochastic=False).numpy().astype(np.int64)
    return codes, per_channel(quantizer.scale, out).numpy()


def _state_quantizer(lif: LIF):
    q = getattr(lif, "state_quantizer", None)
    if q is None:
        return None
    if q.scale.numel() != 1:
        raise UserError("the C engine supports a per-layer membrane quantizer scale, not per channel")
    return float(q.scale), int(q.q_max)


def compile_engine(model, mean, std) -> Engine:
    """The C engine's tables for ``model`` (a spiking VGG/convnet or an imported graph chain) fed
    ``(p/255 - mean)/std`` images.

    Args:
        model: the network (eval mode, on any device; read only).
        mean, std: per-channel normalisation on the 0..1 pixel scale (the dataset's).
    """
    chain = check_supported(model)
    model = model.eval()
    in_shape = tuple(int(v) for v in model.spec["in_shape"])
    if len(mean) != in_shape[0] or len(std) != in_shape[0]:
        raise UserError(f"normalisation has {len(mean)} channels, the model's input {in_shape[0]}")
    quantized = get_quantizers(model)
    integer = all(f"{_name(model, unit.op)}.weight" in quantized for unit in chain)
    t = model.timesteps
    bits = [q.bits for name, q in quantized.items() if name.endswith("weight")] if integer else [32]
    weight_bytes = 1 if max(bits) <= 8 else (2 if max(bits) <= 16 else 4)
    layers, shape = [], in_shape
    divisor, max_count = 1, 1  # the previous unit's pooling: divisor folded into weights, largest event count
    for index, unit in enumerate(chain):
        op, lif = unit.op, unit.lif
        first = index == 0
        weight, scale = _weights(op, integer)
        out_c = weight.shape[0]
        gain = unit.gain.numpy()
        shift = np.zeros(out_c) if unit.shift is None else unit.shift.numpy()
        out_shape = (out_c, shape[1], shape[2]) if isinstance(op, nn.Conv2d) else (out_c, 1, 1)
        kind = "input_conv" if first else ("conv" if isinstance(op, nn.Conv2d) else "linear")
        layer = EngineLayer(kind=kind, in_shape=shape, out_shape=out_shape, spiking=lif is not None,
                            weights=np.zeros(0), pool=unit.pool, name=_name(model, op))
        if integer:
            sign = np.where(gain < 0, -1, 1)
            unit_c = np.abs(scale * gain) / divisor
            unit_c = np.where(unit_c > 0, unit_c, scale / divisor)
            weight = weight * sign.reshape(-1, *([1] * (weight.ndim - 1)))
            if gain.min() == 0:
                weight[gain == 0] = 0
            if not first and lif is not None:
                weight = _silence_channels_that_cannot_fire(weight, unit_c * max_count, shift,
                                                            unit.threshold.numpy(), t)
            unit_c = _units_of_dead_channels(weight, unit_c)
        else:
            weight = weight * gain.reshape(-1, *([1] * (weight.ndim - 1))) / divisor
            unit_c = np.ones(out_c)
        if first:
            _compile_input(layer, weight, shift, unit_c, mean, std, integer)
        else:
            layer.__dict__.update(_event_tables(_fan_out(op, weight, shape), integer, weight_bytes))
            if unit.shift is not None:
                layer.bias = shift
        if lif is not None:
            _compile_neuron(layer, unit, unit_c, integer, t, max_count)
        layers.append(layer)
        shape = layer.pooled_shape if lif is not None else out_shape
        input_count = max_count  # the output layer's: its logits bound
        divisor, max_count = unit.pool_divisor, unit.pool ** 2
    engine = Engine(layers, t, integer, in_shape, layers[-1].out_shape[0], weight_bits=max(bits))
    if integer and not layers[-1].spiking:
        _compile_logits(engine, unit_c, layers[-1], t, input_count)
    elif integer:  # a spiking output layer: the logits are its spike counts
        engine.logit_mul, engine.logit_scale = np.ones(engine.num_classes, dtype=np.int32), 1.0
    return engine


def _name(model, op) -> str:
    return next(n for n, m in model.named_modules() if m is op)


def _compile_input(layer: EngineLayer, weight, shift, unit_c, mean, std, integer: bool) -> None:
    """Fold ``(p/255 - mean)/std`` and the BatchNorm shift into the first convolution."""
    scale_in = 1.0 / (255.0 * np.asarray(std, dtype=np.float64))
    offset_in = -np.asarray(mean, dtype=np.float64) / np.asarray(std, dtype=np.float64)
    if integer:
        layer.weights = weight.astype(np.int32)
        layer.input_fold = (scale_in, offset_in, shift)  # finished once F is known
    else:
        layer.weights = (weight * scale_in[None, :, None, None]).astype(np.float32)
        layer.border_bias = (_border_sums(weight, offset_in) + shift[:, None]).astype(np.float32)
        layer.input_scale = scale_in.astype(np.float32)


def firing_point(threshold: np.float32) -> np.float32:
    """The least float32 ``u`` with ``u / threshold - 1 >= 0`` in float32 arithmetic (``threshold > 0``).

    ``fl(u / thr)`` is non-decreasing in ``u``, so the spike test ``u/thr - 1 >= 0`` (PyTorch's) is
    exactly ``u >= firing_point(thr)``: the engine compares without dividing.
    """
    thr = np.float32(threshold)
    one, zero = np.float32(1.0), np.float32(0.0)
    u = thr
    while u / thr - one < zero:  # rounding may need a slightly larger u
        u = np.nextafter(u, np.float32(np.inf))
    while np.nextafter(u, zero) / thr - one >= zero:  # or allow a slightly smaller one
        u = np.nextafter(u, zero)
    return u


def _compile_neuron(layer: EngineLayer, unit: ChainUnit, unit_c, integer: bool, t: int, max_count: int) -> None:
    """Leak, threshold, reset and membrane quantizer of ``unit``'s neuron; the integer membrane's fraction
    bits from the largest current one step can bring (``max_count``: the largest input event count)."""
    out_c = layer.out_shape[0]
    leak = np.clip(unit.leak.numpy(), 0.0, 1.0)
    thr = unit.threshold.numpy()
    layer.hard_reset = unit.lif.reset == "hard"
    state = _state_quantizer(unit.lif)
    real_bias = layer.bias
    if not integer:
        layer.leak, layer.threshold = leak.astype(np.float32), thr.astype(np.float32)
        layer.fire_at = np.array([firing_point(v) for v in layer.threshold], dtype=np.float32)
        layer.bias = None if real_bias is None else real_bias.astype(np.float32)
        layer.leak_one = bool(np.all(layer.leak == 1.0)) and layer.bias is None
        if state is not None:
            layer.state_mul = np.full(out_c, state[0], dtype=np.float32)
            layer.state_qmax = state[1]
        return
    # the largest |current| per step in units of unit_c, per channel
    if layer.kind == "input_conv":
        scale_in, offset_in, shift = layer.input_fold
        per_ci = np.abs(layer.weights).sum((2, 3)).astype(np.float64)  # [out, in]
        peak = (per_ci * scale_in[None, :] * 255.0).sum(1) + \
            np.abs(_border_sums(layer.weights.astype(np.float64), offset_in)).max(1) + np.abs(shift) / unit_c
    else:
        peak = _abs_fan_in(layer, out_c) * max_count
        if real_bias is not None:
            peak = peak + np.abs(real_bias) / unit_c
    bound = t * peak + thr / unit_c
    if state is not None:
        bound = np.maximum(bound, state[1] * state[0] / unit_c)
    frac = int(np.floor(np.log2(MEMBRANE_LIMIT / max(float(bound.max()), 1.0))))
    if frac < 0:
        raise UserError(f"layer {layer.name}: its currents do not fit the integer engine's int32 membrane")
    frac = min(frac, MAX_FRAC_BITS)
    layer.frac_bits = frac
    one = 2.0 ** frac
    layer.threshold = np.maximum(np.round(thr / unit_c * one), 1).astype(np.int32)
    layer.leak = np.round(leak * 2 ** LEAK_BITS).astype(np.int32)
    if real_bias is not None:
        layer.bias = np.round(real_bias / unit_c * one).astype(np.int32)
    layer.leak_one = bool(np.all(layer.leak == 2 ** LEAK_BITS)) and layer.bias is None
    if layer.kind == "input_conv":
        scale_in, offset_in, shift = layer.input_fold
        layer.input_scale = np.round(scale_in * 2.0 ** (frac + INPUT_BITS)).astype(np.int64)
        real = _border_sums(layer.weights.astype(np.float64), offset_in) + (shift / unit_c)[:, None]
        layer.border_bias = np.round(real * one).astype(np.int32)
        layer.input_fold = None
    if state is not None:
        step, qmax = state
        ratio = unit_c / one / step                   # membrane unit -> state codes
        layer.state_shift = 30 + int(np.floor(-np.log2(ratio.max())))
        layer.state_mul = np.round(ratio * 2.0 ** layer.state_shift).astype(np.int64)
        layer.state_back = np.round(1.0 / ratio).astype(np.int32)
        layer.state_qmax = qmax


def _abs_fan_in(layer: EngineLayer, out_c: int) -> np.ndarray:
    """Per output channel, the largest sum of |weight| one output neuron receives (per unit count)."""
    if layer.dense:
        per_out = np.abs(layer.weights.astype(np.float64)).sum(0)
    else:
        per_out = np.zeros(out_c)
        np.add.at(per_out, layer.targets, np.abs(layer.weights.astype(np.float64)))
    return per_out


def _compile_logits(engine: Engine, unit_c, layer: EngineLayer, t: int, max_count: int) -> None:
    """Integer logits: ``sum_t sum q*k`` times a per-class multiplier when the classes' units differ."""
    if np.all(unit_c == unit_c[0]):
        engine.logit_mul = np.ones(len(unit_c), dtype=np.int32)
        engine.logit_scale = float(unit_c[0])
        return
    peak = float((_abs_fan_in(layer, len(unit_c)) * t * max_count).max())
    bits = max(0, min(15, 30 - int(math.ceil(math.log2(max(peak, 1.0) * 16)))))
    top = float(unit_c.max())
    engine.logit_mul = np.round(unit_c / top * 2 ** bits).astype(np.int32)
    engine.logit_scale = top / 2 ** bits
