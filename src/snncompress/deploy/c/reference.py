"""The C engine's arithmetic in numpy: what ``snn_runtime.c`` computes, bit for bit.

:func:`run_reference` runs one uint8 image through an :class:`~.engine.Engine` with the same
operations in the same order as the C runtime (float32 additions in event order, int32 /
int64 integer arithmetic with the same shifts and roundings), and returns every layer's
spikes and membrane per timestep and the logits. Tests compare the C build's trace with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .engine import INPUT_BITS, LEAK_BITS, Engine, EngineLayer, border_classes

INT32 = (-(2 ** 31), 2 ** 31 - 1)


@dataclass
class Trace:
    """One image: ``spikes[t][l]`` (ascending neuron indices, channels-last), ``membranes[t][l]``
    (after reset), ``logits`` ``[K]`` (float32, or int32 for the integer engine)."""

    spikes: list[list[np.ndarray]]
    membranes: list[list[np.ndarray]]
    logits: np.ndarray

    @property
    def prediction(self) -> int:
        return int(np.argmax(self.logits))  # first maximum, as the C loop


def _checked(values: np.ndarray) -> np.ndarray:
    """int64 values that must fit int32 (the engine's bound guarantees it)."""
    if values.size and (values.min() < INT32[0] or values.max() > INT32[1]):
        raise OverflowError("integer engine value outside int32")
    return values


def input_current(layer: EngineLayer, image: np.ndarray, integer: bool) -> np.ndarray:
    """The first layer's current ``[H*W*C]`` (channels-last) of a uint8 image ``[C, H, W]``."""
    cin, h, w = layer.in_shape
    cout = layer.out_shape[0]
    padded = np.zeros((cin, h + 2, w + 2), dtype=np.int64)
    padded[:, 1:-1, 1:-1] = image
    classes = border_classes(h, w)
    bias = layer.border_bias[:, classes].transpose(1, 2, 0)  # [H, W, C]
    if not integer:
        acc = bias.astype(np.float32).copy()
        pixels = padded.astype(np.float32)
        for ci in range(cin):
            for ky in range(3):
                for kx in range(3):
                    acc += layer.weights[None, None, :, ci, ky, kx] * pixels[ci, ky:ky + h, kx:kx + w, None]
        return acc.reshape(-1)
    total = np.zeros((h, w, cout), dtype=np.int64)
    for ci in range(cin):
        partial = np.zeros((h, w, cout), dtype=np.int64)
        for ky in range(3):
            for kx in range(3):
                partial += layer.weights[None, None, :, ci, ky, kx].astype(np.int64) * padded[ci, ky:ky + h, kx:kx + w, None]
        total += int(layer.input_scale[ci]) * partial
    current = ((total + (1 << (INPUT_BITS - 1))) >> INPUT_BITS) + bias.astype(np.int64)
    return _checked(current).reshape(-1)


def _leak(layer: EngineLayer, mem: np.ndarray, channels: np.ndarray, integer: bool, extra=None) -> np.ndarray:
    """``leak*u_hat (+ bias or the first layer's current)``, as the runtime's leak pass."""
    if integer:
        out = (layer.leak[channels].astype(np.int64) * mem + (1 << (LEAK_BITS - 1))) >> LEAK_BITS
        if layer.bias is not None:
            out = out + layer.bias[channels]
        return out + extra if extra is not None else out
    if extra is not None:
        return mem + extra if layer.leak_one else layer.leak[channels] * mem + extra
    if layer.bias is not None:
        return layer.leak[channels] * mem + layer.bias[channels]
    return mem if layer.leak_one else layer.leak[channels] * mem


def _event_targets(layer: EngineLayer, index: int, count: int, integer: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(neuron indices, contributions)`` of one input event, in the runtime's order."""
    cout = layer.out_shape[0]
    if layer.kind == "linear":
        groups = [(index, 0)]
    else:
        cin, h, w = layer.in_shape
        ci, pos = index % cin, index // cin
        y, x = pos // w, pos % w
        groups = []
        for tap in range(9):
            oy, ox = y + 1 - tap // 3, x + 1 - tap % 3
            if 0 <= oy < h and 0 <= ox < w:
                groups.append((ci * 9 + tap, (oy * w + ox) * cout))
    targets, values = [], []
    for group, base in groups:
        if layer.dense:
            t, v = np.arange(cout), layer.weights[group]
        else:
            lo, hi = layer.ptr[group], layer.ptr[group + 1]
            t, v = layer.targets[lo:hi], layer.weights[lo:hi]
        targets.append(base + t)
        values.append(v)
    if not targets:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    t, v = np.concatenate(targets), np.concatenate(values)
    if integer:
        return t, (v.astype(np.int64) * count) << layer.frac_bits
    return t, v if count == 1 else v * np.float32(count)


def _add_events(layer: EngineLayer, mem: np.ndarray, events, integer: bool) -> np.ndarray:
    parts = [_event_targets(layer, i, k, integer) for i, k in events]
    if parts:
        targets = np.concatenate([p[0] for p in parts])
        values = np.concatenate([p[1] for p in parts])
        np.add.at(mem, targets, values.astype(mem.dtype))  # sequential, in event order
    return mem


def _fire(layer: EngineLayer, u: np.ndarray, channels: np.ndarray, integer: bool):
    """``(spikes bool, membrane after reset and state quantizer)``."""
    thr = layer.threshold[channels]
    spikes = u >= thr if integer else (u / thr - np.float32(1.0)) >= np.float32(0.0)
    if layer.hard_reset:
        u = np.where(spikes, 0, u).astype(u.dtype)
    else:
        u = np.where(spikes, u - thr, u).astype(u.dtype)
    if layer.state_mul is None:
        return spikes, u
    q = layer.state_qmax
    if integer:
        codes = (u * layer.state_mul[channels] + (1 << (layer.state_shift - 1))) >> layer.state_shift
        codes = np.clip(codes, -q, q)
        return spikes, _checked(codes * layer.state_back[channels])
    step = layer.state_mul[channels]
    r = u / step
    r = np.clip(r, np.float32(-q - 1), np.float32(q + 1))
    rounded = np.where(r >= 0, r + np.float32(0.5), r - np.float32(0.5)).astype(np.float32)
    codes = np.clip(np.trunc(rounded).astype(np.int64), -q, q)
    return spikes, (codes.astype(np.float32) * step).astype(np.float32)


def _pool(layer: EngineLayer, spikes: np.ndarray) -> list[tuple[int, int]]:
    """Events ``(index, count)`` after the layer's pooling, in the runtime's first-touch order."""
    index = np.nonzero(spikes)[0]
    if layer.pool == 1:
        return [(int(i), 1) for i in index]
    c, h, w = layer.out_shape
    pc, ph, pw = layer.pooled_shape
    ch, pos = index % c, index // c
    py, px = (pos // w) // layer.pool, (pos % w) // layer.pool
    keep = (py < ph) & (px < pw)
    pooled = ((py * pw + px) * c + ch)[keep]
    if pooled.size == 0:
        return []
    unique, first, counts = np.unique(pooled, return_index=True, return_counts=True)
    order = np.argsort(first, kind="stable")
    return [(int(unique[i]), int(counts[i])) for i in order]


def run_reference(engine: Engine, image: np.ndarray) -> Trace:
    """Run uint8 ``image`` ``[C, H, W]`` through ``engine``; see :class:`Trace`."""
    integer = engine.integer
    dtype = np.int64 if integer else np.float32
    layers = engine.layers
    channels = [np.tile(np.arange(l.out_shape[0]), l.out_shape[1] * l.out_shape[2]) for l in layers]
    mems = [np.zeros(l.out_count, dtype=dtype) for l in layers]
    current = input_current(layers[0], np.asarray(image, dtype=np.uint8).reshape(engine.in_shape), integer)
    logits = np.zeros(engine.num_classes, dtype=dtype)
    all_spikes, all_mems = [], []
    for _ in range(engine.timesteps):
        events, step_spikes, step_mems = None, [], []
        for l, layer in enumerate(layers):
            if layer.kind == "input_conv":
                u = _leak(layer, mems[l], channels[l], integer, current)
            elif layer.spiking:
                u = _add_events(layer, _leak(layer, mems[l], channels[l], integer), events, integer)
            else:
                out = _add_events(layer, np.zeros(layer.out_count, dtype=dtype), events, integer)
                logits = _checked(logits + out) if integer else (logits + out).astype(np.float32)
                continue
            u = _checked(u) if integer else u.astype(np.float32)
            spikes, mems[l] = _fire(layer, u, channels[l], integer)
            step_spikes.append(np.nonzero(spikes)[0])
            step_mems.append(mems[l].copy())
            events = _pool(layer, spikes)
            if l == len(layers) - 1:  # a spiking output layer: the logits count its spikes
                logits = logits + spikes.astype(dtype)
        all_spikes.append(step_spikes)
        all_mems.append(step_mems)
    if integer:
        logits = _checked(logits * engine.logit_mul.astype(np.int64))
    return Trace(all_spikes, all_mems, logits)
