"""Lean BPTT memory: compact saved activations and layer checkpointing.

Two opt-in tools; both leave the model's parameters, state_dict and outputs
unchanged, and its gradients too (bit-identical, except that a large
convolution's weight gradient is summed over batch chunks: equal up to float
rounding).

:func:`lean_memory` (model-level flag, or the :func:`lean_saved_tensors`
context manager for the packing part) stores every activation that autograd
saves for backward and whose values are ``k/16`` with ``k`` in 0..255 as one
uint8 per element instead of a float32: spikes (0/1), 2x2 average-pooled
spikes (multiples of 1/4), binary dropout masks scaled by 1.25, sums of a few
spike maps. The test is exact and stops at the first value that does not fit,
so a membrane-potential-like tensor costs almost nothing to reject; the LIF
kernels' own saved ``u`` is never tested. It also switches the model's average
pools to :class:`LeanAvgPool2d` (keeps nothing for backward; PyTorch's keeps
its whole input to read its shape) and its convolutions to
:class:`LeanConv2d` (uint8 spike input, backward in batch chunks so that
oneDNN's temporaries stay small).

:func:`checkpoint_layers` recomputes each spiking layer in backward: the
model's layer sequences are cut after every LIF (trailing pooling / dropout
stay with it); each segment keeps only its input (itself packed by
:func:`lean_memory` when that is on) and reruns its forward during backward,
so no membrane potential is stored at all. It costs one extra forward pass
for the largest memory cut. RNG state is replayed (dropout masks match) and
BatchNorm running statistics are not updated twice.
"""

from __future__ import annotations

import contextlib
import types
import weakref
from typing import Callable, Iterator

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.nn.utils import parametrize

from ..neuron import LIF
from ..kernels.cpu import avg_pool_fast, pack_u8

#: Values are stored as uint8 k with value == k / LEVELS.
LEVELS = 16.0
#: Tensors smaller than this are never packed (not worth a check).
MIN_NUMEL = 1 << 14


class _Packed:
    """A saved activation stored as uint8 ``k`` (value ``k / LEVELS``)."""

    __slots__ = ("q", "dtype")

    def __init__(self, q: torch.Tensor, dtype: torch.dtype):
        self.q, self.dtype = q, dtype

    def unpack(self) -> torch.Tensor:
        return self.q.to(self.dtype).mul_(1.0 / LEVELS)


def _pack(t: torch.Tensor):
    if (t.dtype != torch.float32 or t.device.type != "cpu" or t.numel() < MIN_NUMEL
            or isinstance(t, nn.Parameter) or getattr(t, "_snn_keep", False)
            or not t.is_contiguous()):
        return t
    q = pack_u8(t, LEVELS)
    return t if q is None else _Packed(q, t.dtype)


def _unpack(obj):
    return obj.unpack() if isinstance(obj, _Packed) else obj


class _PackCache:
    """Pack hook that packs each distinct tensor once per forward (several nodes may save it).

    Holds only weak references, so a packed float tensor is freed as soon as the forward
    pass no longer uses it.
    """

    def __init__(self):
        self.seen: dict[int, tuple[weakref.ref, object]] = {}

    def pack(self, t: torch.Tensor):
        key = id(t)
        hit = self.seen.get(key)
        if hit is not None and hit[0]() is t:
            return hit[1]
        packed = _pack(t)
        if packed is not t:
            self.seen[key] = (weakref.ref(t), packed)
        return packed


@contextlib.contextmanager
def lean_saved_tensors() -> Iterator[None]:
    """Within this context, spike-valued tensors saved for backward are stored as uint8."""
    cache = _PackCache()
    with torch.autograd.graph.saved_tensors_hooks(cache.pack, _unpack):
        try:
            yield
        finally:
            cache.seen.clear()


def _lean_pre_hook(module, args):
    if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        ctx = lean_saved_tensors()
        ctx.__enter__()
        module.__dict__.setdefault("_snn_lean_stack", []).append(ctx)
    else:
        module.__dict__.setdefault("_snn_lean_stack", []).append(None)


def _lean_post_hook(module, args, output):
    stack = module.__dict__.get("_snn_lean_stack")
    if stack:
        ctx = stack.pop()
        if ctx is not None:
            ctx.__exit__(None, None, None)


class LeanAvgPool2d(nn.AvgPool2d):
    """``nn.AvgPool2d`` whose stride == kernel, unpadded case runs the C kernel and saves nothing
    for backward (PyTorch's saves its whole input only to read its shape). Bit-identical."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size if isinstance(self.kernel_size, int) else None
        if (k is not None and self.stride in (k, (k, k)) and self.padding in (0, (0, 0))
                and not self.ceil_mode and self.divisor_override is None):
            y = avg_pool_fast(x, k)
            if y is not None:
                return y
        return super().forward(x)


#: LeanConv2d runs backward in this many batch chunks when its input has >= CHUNK_MIN elements.
CONV_CHUNKS = 4
CHUNK_MIN = 1 << 21


class _LeanConv(torch.autograd.Function):
    """conv2d that keeps a spike-valued input as uint8 and runs backward in batch chunks.

    oneDNN's convolution backward needs ~3.6x its output in temporaries (blocked-format
    copies of input, grad and result); chunking the batch bounds them, at equal speed on a
    2-core Xeon. Input gradients are per sample, hence unchanged; the weight gradient is
    summed over chunks (same value up to float rounding).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        y = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)
        q = _pack(x)
        if isinstance(q, _Packed):
            ctx.packed, ctx.x_shape = q, None
            ctx.save_for_backward(weight)
        else:
            ctx.packed = None
            ctx.save_for_backward(weight, x)
        ctx.conf = (stride, padding, dilation, groups, bias is not None)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        saved = ctx.saved_tensors
        weight = saved[0]
        x = saved[1] if ctx.packed is None else None
        stride, padding, dilation, groups, has_bias = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        n = g.shape[0]
        numel = ctx.packed.q.numel() if x is None else x.numel()
        chunks = min(CONV_CHUNKS, n) if numel >= CHUNK_MIN else 1
        size = -(-n // chunks)
        gx = None
        gw = torch.zeros_like(weight) if need_w else None
        for a in range(0, n, size):
            xa = ctx.packed.q[a:a + size].to(g.dtype).mul_(1.0 / LEVELS) if x is None else x[a:a + size]
            gxa, gwa, _ = torch.ops.aten.convolution_backward(
                g[a:a + size], xa, weight, None, list(stride), list(padding), list(dilation), False,
                [0, 0], groups, [need_x, need_w, False])
            if need_x:
                if gx is None:
                    gx = torch.empty((n, *gxa.shape[1:]), dtype=gxa.dtype, device=gxa.device,
                                     memory_format=torch.contiguous_format)
                gx[a:a + size] = gxa
            if need_w:
                gw += gwa
            del xa, gxa, gwa
        gb = g.sum((0, 2, 3)) if (need_b and has_bias) else None
        return gx, gw, gb, None, None, None, None


class LeanConv2d(nn.Conv2d):
    """``nn.Conv2d`` that stores a spike-valued input as uint8 and chunks its backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.padding_mode != "zeros" or isinstance(self.padding, str) or x.dim() != 4
                or x.device.type != "cpu" or not torch.is_grad_enabled()
                or not (x.requires_grad or self.weight.requires_grad)):
            return super().forward(x)
        return _LeanConv.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                               self.groups)


_LEAN_CLASSES = {nn.AvgPool2d: LeanAvgPool2d, nn.Conv2d: LeanConv2d}


def swap_pools(model: nn.Module, enable: bool) -> None:
    """Switch ``nn.AvgPool2d`` modules to :class:`LeanAvgPool2d` (or back)."""
    _swap(model, enable, (nn.AvgPool2d,))


def _lean_parametrized(cls: type, lean: type) -> type:
    """The lean class of a parametrized module's class ``cls`` (masks, quantizers; see
    :mod:`snncompress.compress`): the lean forward over ``cls``, whose tensor properties it keeps."""
    made = _LEAN_PARAMETRIZED.get(cls)
    if made is None:
        made = type(f"Lean{cls.__name__}", (lean, cls), {"_snn_plain_class": cls})
        _LEAN_PARAMETRIZED[cls] = made
    return made


_LEAN_PARAMETRIZED: "weakref.WeakKeyDictionary[type, type]" = weakref.WeakKeyDictionary()


def _swap(model: nn.Module, enable: bool, kinds) -> None:
    """Switch modules of exactly the classes in ``kinds`` (or parametrized versions of them) to their
    lean subclasses, or back."""
    for m in model.modules():
        cls = type(m)
        for plain in kinds:
            lean = _LEAN_CLASSES[plain]
            if enable and cls is plain:
                m.__class__ = lean
            elif enable and parametrize.is_parametrized(m) and cls.__bases__ == (plain,):
                m.__class__ = _lean_parametrized(cls, lean)
            elif not enable and cls is lean:
                m.__class__ = plain
            elif not enable and getattr(cls, "_snn_plain_class", None) is not None and lean in cls.__bases__:
                m.__class__ = cls._snn_plain_class


def lean_memory(model: nn.Module, enable: bool = True) -> nn.Module:
    """Turn compact storage of saved spike tensors on (or off) for ``model``'s forward; returns it.

    Implemented with forward hooks around the model's own forward, and by switching its
    ``nn.AvgPool2d`` modules to :class:`LeanAvgPool2d` (a pool that keeps no input for
    backward) and ``nn.Conv2d`` to :class:`LeanConv2d` (uint8 spike input, batch-chunked
    backward); a masked or quantized conv gets a lean subclass of its own parametrized class.
    The model class, its parameters and state_dict are untouched.
    Deep copies (e.g. ``ann_twin()``) keep the setting (harmless in ANN mode: ReLU
    outputs are rarely k/16-valued, and the check rejects them at their first value).
    """
    _swap(model, enable, (nn.AvgPool2d, nn.Conv2d))
    handles = model.__dict__.pop("_snn_lean_handles", None)
    if handles:
        for h in handles:
            h.remove()
    if enable:
        model.__dict__["_snn_lean_handles"] = (
            model.register_forward_pre_hook(_lean_pre_hook),
            model.register_forward_hook(_lean_post_hook, always_call=True),
        )
    return model


def is_lean(model: nn.Module) -> bool:
    return bool(model.__dict__.get("_snn_lean_handles"))


# --------------------------------------------------------------------------------------
# Layer checkpointing
# --------------------------------------------------------------------------------------
class _BNState:
    """Snapshot / restore of BatchNorm running statistics around a recompute."""

    def __init__(self, modules):
        self.items = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                      for mod in modules for m in mod.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm)
                      and m.training and m.track_running_stats and m.running_mean is not None]

    def restore(self) -> None:
        with torch.no_grad():
            for m, mean, var, n in self.items:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(n)


class _Checkpoint(torch.autograd.Function):
    """Runs ``run(x)`` without saving anything but ``x``; reruns it with autograd in backward.

    ``params`` (the segment's parameters) are passed again flattened as inputs so that
    autograd routes their gradients through this node.
    """

    @staticmethod
    def forward(ctx, run, modules, params, lean, x, *flat_params):
        ctx.run, ctx.modules, ctx.params, ctx.lean = run, modules, params, lean
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        with torch.no_grad():
            out, has_time = run(x)
        ctx.has_time = has_time
        ctx.save_for_backward(x)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        need_x, need_p = ctx.needs_input_grad[4], ctx.needs_input_grad[5:]
        x = x.detach()
        edge = None
        bn = _BNState(ctx.modules)
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            with torch.enable_grad(), (lean_saved_tensors() if ctx.lean else contextlib.nullcontext()):
                if need_x:
                    # The recompute starts from an alias of x behind a tiny root node, so x's
                    # storage is freed once the recomputed layers have saved what they need
                    # (with lean_memory: a uint8 copy); dL/dx is read at the root's edge.
                    x = _GradRoot.apply(_ANCHOR, x)
                    edge = get_gradient_edge(x)
                out, _ = ctx.run(x)
        del x
        wanted = ([edge] if need_x else []) + [p for p, need in zip(ctx.params, need_p) if need]
        if wanted and out.requires_grad:
            grads = list(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        else:
            grads = [None] * len(wanted)
        del out
        bn.restore()  # after autograd.grad: BatchNorm's backward still reads the buffers
        gx = grads.pop(0) if need_x else None
        return (None, None, None, None, gx, *[grads.pop(0) if need else None for need in need_p])


class _GradRoot(torch.autograd.Function):
    """Identity whose output starts a fresh graph (its gradient edge marks the segment input)."""

    @staticmethod
    def forward(ctx, anchor, x):
        return x.detach()

    @staticmethod
    def backward(ctx, g):
        return None, g


_ANCHOR = torch.zeros((), requires_grad=True)


def _run_checkpointed(run: Callable, modules: list[nn.Module], x: torch.Tensor, lean: bool):
    """``run(x) -> (out, has_time)`` as a checkpointed segment over ``modules``."""
    params = [p for m in modules for p in m.parameters()]
    holder = {}

    def run_and_record(inp):
        out, has_time = run(inp)
        holder["has_time"] = has_time
        return out, has_time

    out = _Checkpoint.apply(run_and_record, modules, params, lean, x, *params)
    return out, holder["has_time"]


def _segments(seq) -> list[list[nn.Module]]:
    """Cut a layer sequence after each LIF; pooling / dropout right after a LIF stay with it."""
    segs: list[list[nn.Module]] = []
    cur: list[nn.Module] = []
    after_lif = False
    for m in seq:
        if after_lif and (isinstance(m, LIF) or any(True for _ in m.parameters())):
            segs.append(cur)
            cur, after_lif = [], False
        cur.append(m)
        if isinstance(m, LIF):
            after_lif = True
    if cur:
        segs.append(cur)
    return segs


def _checkpointed_run(orig: Callable) -> Callable:
    """Wrap a model's ``run_sequence(seq, x, has_time)`` so each segment is checkpointed."""

    def run(self, seq, x, has_time):
        if not (torch.is_grad_enabled() and self.training):
            return orig(self, seq, x, has_time)
        for seg in _segments(seq):
            if not any(isinstance(m, LIF) for m in seg):
                x, has_time = orig(self, seg, x, has_time)
                continue
            ht = has_time
            x, has_time = _run_checkpointed(lambda inp, seg=seg, ht=ht: orig(self, seg, inp, ht), seg, x,
                                            is_lean(self))
        return x, has_time

    return run


def _checkpointed_block(orig: Callable) -> Callable:
    def run_block(self, block, x, has_time):
        if not (torch.is_grad_enabled() and self.training):
            return orig(self, block, x, has_time)
        return _run_checkpointed(lambda inp: orig(self, block, inp, has_time), [block], x, is_lean(self))

    return run_block


_WRAPPED = {"run_sequence": _checkpointed_run, "run_block": _checkpointed_block}


def checkpoint_layers(model: nn.Module, enable: bool = True) -> nn.Module:
    """Recompute every spiking layer during backward instead of storing its state; returns ``model``.

    Works on the networks that run their layers through ``run_sequence`` (and ResNet's
    ``run_block``) by binding checkpointed versions of those methods on
    the instance (class, parameters and state_dict unchanged; deep copies keep
    it). Active only in training mode with autograd enabled. Combine with
    :func:`lean_memory` so that the segment inputs (spikes) are stored as uint8.
    """
    if not getattr(type(model), "RUNS_SEQUENCES", False):
        if not enable:
            return model  # nothing was wrapped, nothing to undo (e.g. an imported graph network)
        raise TypeError(f"checkpoint_layers does not know how to segment {type(model).__name__}")
    names = [n for n in _WRAPPED if callable(getattr(type(model), n, None))]
    for name in names:
        model.__dict__.pop(name, None)
        if enable:
            orig = getattr(type(model), name)
            model.__dict__[name] = types.MethodType(_WRAPPED[name](orig), model)
    return model


def is_checkpointed(model: nn.Module) -> bool:
    return any(n in model.__dict__ for n in _WRAPPED)
