"""Fused multi-step LIF on CPU: one pass over memory forward, one backward.

The reference :func:`snncompress.neuron.lif_multistep` runs ~10 tensor ops per
timestep forward and ~20 in autograd's backward, each a full pass over
``[B, ...]`` memory, and saves 3-4 tensors per step. This module computes the
same function with

* a C kernel (sources in ``csrc/``, built and loaded by :mod:`.library`). Forward
  reads ``I`` once and writes spikes ``o`` and the pre-reset potential ``u``
  once; backward reads ``grad_o`` and ``u`` once and writes ``grad_I`` once,
  reducing ``dL/dleak`` and ``dL/dthr`` per channel on the fly;
* a pure-PyTorch fallback with the same saved state (``u`` only) for machines
  without a C compiler or for other devices.

Saved for backward: ``u`` ``[T, B, ...]`` in the working dtype, nothing else;
spikes, ``z`` and the reset state are recomputed from it bit-exactly. Under
``torch.inference_mode`` / ``no_grad`` nothing is saved.

Backward recurrence (``h`` = ``u_hat``, ``g[t] = dL/do[t]``, ``sg`` the
surrogate derivative at ``z[t] = u[t]/thr - 1``; ``dh[T-1] = 0``)::

    du[t]   = g[t] * sg[t] / thr + dh[t] * (1 | hard: 1 - o[t])
    dh[t-1] = leak * du[t]
    dI[t]   = du[t]
    dleak   = sum_t du[t] * h[t-1]
    dthr    = sum_t -g[t] * sg[t] * u[t] / thr^2  (soft reset: - dh[t] * o[t])

summed over every broadcast dimension of ``leak`` / ``thr`` (scalar: all;
per-channel: all but the channel dimension). When the input is one tensor
broadcast over T (conv1's output feeding the first LIF), the kernel takes that
tensor itself as its autograd input and returns ``sum_t dI[t]``.

Memory layouts: each timestep must be dense (contiguous or channels_last; the
kernel walks it in memory order); the time stride is free (0 = broadcast).

Environment: ``SNNCOMPRESS_NO_CEXT=1`` disables the C kernel,
``SNNCOMPRESS_CACHE`` sets the build cache folder, ``CC`` the compiler.
"""

from __future__ import annotations

import torch

from ..neuron import RESETS, SURROGATES, lif_multistep, surrogate_grad, surrogate_scale
from .library import build_error, cext_available, load_library

__all__ = [
    "KERNEL_SURROGATES", "SURROGATE_IDS", "mark_keep", "load_library", "build_error", "cext_available",
    "step_format", "channel_layout", "time_broadcast_base", "launch_forward", "lif_torch", "lif_cpu",
    "pack_u8", "avgpool_forward", "avg_pool_fast",
]

#: How many surrogate formulas the C and Triton kernels implement (``KIND`` 0, 1, 2).
KERNEL_SURROGATES = 3

#: ``KIND`` of each surrogate the fused kernels support: its position in
#: :data:`snncompress.neuron.SURROGATE_TABLE`. Other surrogates run the reference.
SURROGATE_IDS = {name: kind for kind, name in enumerate(SURROGATES[:KERNEL_SURROGATES])}


def mark_keep(t: torch.Tensor) -> torch.Tensor:
    """Flag a tensor our kernels save (membrane potentials) so the lean-memory pack hook skips it."""
    t._snn_keep = True
    return t


# --------------------------------------------------------------------------------------
# Argument checks shared by all backends
# --------------------------------------------------------------------------------------
def step_format(current: torch.Tensor) -> str | None:
    """Memory order of one timestep ``current[t]``: "contiguous", "channels_last" or None.

    The kernels walk a timestep as one dense run of memory, so any dense order works for
    scalar parameters; per-channel parameters are indexed by the order's channel position.
    """
    step = current[0]
    if step.is_contiguous():
        return "contiguous"
    if step.dim() == 4 and step.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return None


def channel_layout(current: torch.Tensor, leak: torch.Tensor, threshold: torch.Tensor,
                   fmt: str = "contiguous"):
    """``(C, S)``: element n (in memory order) of a timestep uses parameter index ``(n // S) % C``.

    Parameters are scalars (one element) or per-channel, broadcasting over dimension 1 of
    ``[B, C, ...]``. Returns None for any other layout (the caller falls back to the
    reference).
    """
    nd = current.dim() - 1  # dims of one timestep, [B, C, ...]
    per_channel = False
    for p in (leak, threshold):
        if not isinstance(p, torch.Tensor):
            return None
        if p.numel() == 1:
            if p.dim() > nd:
                return None
            continue
        shape = (1,) * (nd - p.dim()) + tuple(p.shape)
        if p.dim() > nd or nd < 2 or shape[1] != current.shape[2] or any(
                d != 1 for i, d in enumerate(shape) if i != 1):
            return None
        per_channel = True
    if not per_channel:
        return 1, max(1, current[0].numel())
    c = current.shape[2]
    if fmt == "channels_last":  # [B, H, W, C] in memory: channel is the fastest index
        return c, 1
    s = 1
    for d in current.shape[3:]:
        s *= d
    return c, max(1, s)


def _like_steps(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` [T, ...] with each timestep dense in ``like[0]``'s memory order (copied only if needed)."""
    if x[0].stride() == like[0].stride() or step_format(x) == step_format(like):
        return x
    return _empty_steps(like).copy_(x)


def _empty_steps(like: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    """An uninitialised ``[T, ...]`` tensor, timesteps packed, each in ``like[0]``'s memory order.

    With ``steps``, ``like`` is one timestep ``[B, ...]`` and the result has ``steps`` of them.
    """
    step = like if steps is not None else like[0]
    shape = (steps, *like.shape) if steps is not None else like.shape
    return torch.empty_strided(shape, (step.numel(), *step.stride()), dtype=like.dtype, device=like.device)


def time_broadcast_base(current: torch.Tensor) -> torch.Tensor | None:
    """``b`` if ``current`` is exactly ``b`` broadcast over a new leading time dimension, else None.

    The models feed the first LIF with conv1's output ``c.unsqueeze(0).expand(T, ...)``.
    Running the backend on ``c`` itself (same memory, read with time stride 0) lets its
    backward return ``dL/dc = sum_t dL/dI[t]`` directly, instead of a ``[T, ...]`` gradient
    that the expand's backward would sum: one ``[T, B, ...]`` tensor less, written and read.
    """
    if current.dim() < 2 or current.shape[0] < 2 or current.stride(0) != 0:
        return None
    base = current._base
    if (base is None or base.shape != current.shape[1:] or base.stride() != current.stride()[1:]
            or base.storage_offset() != current.storage_offset()
            or base.requires_grad != current.requires_grad or base.dtype != current.dtype):
        return None
    return base


def _param_vector(p: torch.Tensor, c: int) -> torch.Tensor:
    """A parameter as a contiguous length-``c`` vector (scalar parameters repeated)."""
    p = p.detach().reshape(-1)
    return (p.expand(c) if p.numel() == 1 else p).contiguous()


def _reduce_param_grad(g_channels: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per-channel gradient ``[C]`` -> gradient of the parameter's own shape."""
    if p.numel() == 1:
        return g_channels.sum().reshape(p.shape).to(p.dtype)
    return g_channels.reshape(p.shape).to(p.dtype)


def _time_stride(x: torch.Tensor) -> int:
    """Element stride between timesteps (0 when the input is broadcast over time)."""
    return x.stride(0) if x.shape[0] > 1 else 0


def _threads(n: int) -> int:
    return 1 if n < 1 << 15 else max(1, torch.get_num_threads())


def _ptr(x: torch.Tensor | None):
    return None if x is None else x.data_ptr()


def launch_forward(current, its, lk, th, hard, layout, steps, out, u=None) -> None:
    """Call the C forward kernel on prepared parameter vectors ``lk``, ``th`` (length ``C``).

    Spikes go into ``out`` (``steps`` dense timesteps, ``[T, ...]`` or time-folded ``[T*B, ...]``),
    pre-reset potentials into ``u`` (same shape; None saves nothing); ``current``'s timestep t is
    read at element offset ``t * its`` (0: one tensor broadcast over time).
    """
    c, s = layout
    n = out.numel() // steps
    lib = load_library()
    fn = lib.lif_fwd_f32 if current.dtype == torch.float32 else lib.lif_fwd_f64
    fn(_ptr(current), its, _ptr(out), _ptr(u), _ptr(lk), _ptr(th), steps, n, c, s, int(hard),
       _threads(steps * n))


class BoundForward:
    """The C forward kernel bound once to a layer's prepared ``leak``/``threshold`` vectors (length 1 or ``C``),
    reset and ``timesteps``, for inference (no membrane kept): the inference plan's LIF step.

    ``bound(current, has_time)`` -> spikes ``[T*B, ...]`` of currents ``[T*B, ...]`` (time-folded), or of
    ``[B, ...]`` read once and broadcast over the T steps (``has_time`` False). Same arithmetic as
    :func:`launch_forward`; at batch 1 and T = 1 its per-call Python work (library lookup, pointer and
    layout arguments) cost about as much as the kernel itself, so it is done here once.
    """

    __slots__ = ("leak", "threshold", "timesteps", "_kernel", "_vectors", "_channels", "_hard")

    def __init__(self, leak: torch.Tensor, threshold: torch.Tensor, hard: bool, timesteps: int):
        self.leak, self.threshold, self.timesteps = leak, threshold, int(timesteps)  # kept alive: raw pointers below
        lib = load_library()
        self._kernel = lib.lif_fwd_f32 if threshold.dtype == torch.float32 else lib.lif_fwd_f64
        self._vectors = (leak.data_ptr(), threshold.data_ptr())
        self._channels, self._hard = threshold.numel(), int(hard)

    def __call__(self, current: torch.Tensor, has_time: bool) -> torch.Tensor:
        current, t, c = current.contiguous(), self.timesteps, self._channels
        batch = current.shape[0] // t if has_time else current.shape[0]
        out = torch.empty((t * batch, *current.shape[1:]), dtype=current.dtype)
        n = out.numel() // t
        self._kernel(current.data_ptr(), n if has_time else 0, out.data_ptr(), None, *self._vectors, t, n,
                     c, n if c == 1 else n // (batch * c), self._hard, _threads(t * n))
        return out


def _forward_kernel(current, its, leak, threshold, hard, layout, out, u=None) -> None:
    """:func:`launch_forward` with the LIF's own ``leak`` / ``threshold`` tensors (scalar or per channel)."""
    c = layout[0]
    launch_forward(current, its, _param_vector(leak, c), _param_vector(threshold, c), hard, layout,
                   out.shape[0], out, u)


# --------------------------------------------------------------------------------------
# The C-kernel autograd function
# --------------------------------------------------------------------------------------
class _LIFCext(torch.autograd.Function):
    """C-kernel LIF. ``current`` is ``[T, B, ...]``, or ``[B, ...]`` broadcast over ``steps``."""

    SAVES_MEMBRANE = True  # saved_tensors[0] is u (kernels.membrane.saved_membrane reads it)

    @staticmethod
    def forward(ctx, current, leak, threshold, hard, kind, scale, layout, steps):
        bcast = steps is not None
        steps = steps if bcast else current.shape[0]
        its = 0 if bcast else _time_stride(current)
        out = _empty_steps(current, steps if bcast else None)
        need_grad = any(ctx.needs_input_grad[:3])
        u = torch.empty_like(out) if need_grad else None
        _forward_kernel(current, its, leak, threshold, hard, layout, out, u)
        if need_grad:
            mark_keep(u)
            ctx.save_for_backward(u, leak, threshold)
            ctx.cfg = (hard, kind, scale, layout, bcast)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        u, leak, threshold = ctx.saved_tensors
        hard, kind, scale, (c, s), bcast = ctx.cfg
        steps = u.shape[0]
        n = u[0].numel()
        if grad_out.dtype != u.dtype:
            grad_out = grad_out.to(u.dtype)
        grad_out = _like_steps(grad_out, u)
        gts = _time_stride(grad_out)
        lk, th = _param_vector(leak, c), _param_vector(threshold, c)
        nthreads = _threads(steps * n)
        need_in, need_leak, need_thr = ctx.needs_input_grad[:3]
        acc_leak = torch.zeros(nthreads, c, dtype=torch.float64) if need_leak else None
        acc_thr = torch.zeros(nthreads, c, dtype=torch.float64) if need_thr else None
        grad_in = torch.empty_like(u[0]) if bcast else _empty_steps(u)
        lib = load_library()
        fn = lib.lif_bwd_f32 if u.dtype == torch.float32 else lib.lif_bwd_f64
        fn(_ptr(grad_out), gts, _ptr(u), _ptr(grad_in), _ptr(lk), _ptr(th), _ptr(acc_leak),
           _ptr(acc_thr), steps, n, c, s, int(hard), SURROGATE_IDS[kind], float(scale), int(bcast),
           nthreads)
        g_leak = _reduce_param_grad(acc_leak.sum(0), leak) if need_leak else None
        g_thr = _reduce_param_grad(acc_thr.sum(0), threshold) if need_thr else None
        return grad_in if need_in else None, g_leak, g_thr, None, None, None, None, None


def _lif_cext_inference(current, leak, threshold, hard, layout):
    """Spikes ``[T, B, ...]`` of the C forward kernel, no autograd bookkeeping (nothing needs grad).

    At batch 1 and T = 1 the autograd.Function wrapper and the per-call helpers cost more
    than the kernel itself, so inference calls the kernel directly.
    """
    out = _empty_steps(current)
    _forward_kernel(current, _time_stride(current), leak, threshold, hard, layout, out)
    return out


# --------------------------------------------------------------------------------------
# Pure-PyTorch fallback with the same lean saved state (any device)
# --------------------------------------------------------------------------------------
class _LIFTorch(torch.autograd.Function):
    """The same LIF in torch ops (layouts the C kernel does not cover); saves u like it."""

    SAVES_MEMBRANE = True
    @staticmethod
    def forward(ctx, current, leak, threshold, hard, kind, scale):
        steps = current.shape[0]
        need_grad = any(ctx.needs_input_grad[:3])
        leak_d, thr_d = leak.detach(), threshold.detach()
        out = torch.empty_like(current, memory_format=torch.preserve_format)
        u = torch.empty_like(out) if need_grad else None
        h = torch.zeros_like(current[0])
        for t in range(steps):
            ut = u[t] if need_grad else torch.empty_like(h)
            torch.mul(h, leak_d, out=ut)
            ut.add_(current[t])  # two roundings, as in the reference: bit-exact spikes
            z = torch.div(ut, thr_d).sub_(1.0)
            o = out[t].copy_(z >= 0)
            if hard:
                h = ut * (1.0 - o)
            else:
                h = ut - thr_d * o
        if need_grad:
            mark_keep(u)
            ctx.save_for_backward(u, leak, threshold)
            ctx.cfg = (hard, kind, scale)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        u, leak, threshold = ctx.saved_tensors
        hard, kind, scale = ctx.cfg
        leak_d, thr_d = leak.detach(), threshold.detach()
        need_leak, need_thr = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_in = torch.empty_like(u)
        gl = torch.zeros_like(u[0]) if need_leak else None
        gt = torch.zeros_like(u[0]) if need_thr else None
        carry = None
        z = u[-1] / thr_d - 1.0
        for t in range(u.shape[0] - 1, -1, -1):
            o = (z >= 0).to(u.dtype)
            gz = grad_out[t] * surrogate_grad(z, kind, scale)
            du = torch.div(gz, thr_d, out=grad_in[t])
            if carry is not None:
                du.add_(carry * (1.0 - o) if hard else carry)
            if need_thr:
                gt.sub_(gz * u[t] / (thr_d * thr_d))
                if carry is not None and not hard:
                    gt.sub_(carry * o)
            if t > 0:
                z = u[t - 1] / thr_d - 1.0
                if need_leak:
                    op = (z >= 0).to(u.dtype)
                    hp = u[t - 1] * (1.0 - op) if hard else u[t - 1] - thr_d * op
                    gl.add_(du * hp)
                carry = du * leak_d
        g_leak = _sum_to(gl, leak) if need_leak else None
        g_thr = _sum_to(gt, threshold) if need_thr else None
        return grad_in, g_leak, g_thr, None, None, None


def _sum_to(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Sum an element-wise gradient ``[B, ...]`` down to parameter ``p``'s broadcast shape."""
    if p.numel() == 1:
        return g.sum().reshape(p.shape).to(p.dtype)
    return g.sum_to_size((1,) * (g.dim() - p.dim()) + tuple(p.shape)).reshape(p.shape).to(p.dtype)


# --------------------------------------------------------------------------------------
# Public backend functions (signature of neuron.lif_multistep)
# --------------------------------------------------------------------------------------
def _supported(current, leak, threshold, reset, surrogate) -> bool:
    return (reset in RESETS and surrogate in SURROGATE_IDS and current.dim() >= 2
            and current.shape[0] >= 1 and current[0].numel() > 0
            and current.dtype in (torch.float32, torch.float64)
            and isinstance(leak, torch.Tensor) and isinstance(threshold, torch.Tensor)
            and leak.dtype == current.dtype and threshold.dtype == current.dtype
            and leak.device == current.device and threshold.device == current.device)


def lif_torch(current, leak, threshold, reset="soft", surrogate="linear", scale=None,
              return_membrane=False):
    """Lean-memory PyTorch implementation of :func:`lif_multistep` (any device)."""
    if return_membrane or not _supported(current, leak, threshold, reset, surrogate):
        return lif_multistep(current, leak, threshold, reset, surrogate, scale, return_membrane)
    if channel_layout(current, leak, threshold) is None:
        return lif_multistep(current, leak, threshold, reset, surrogate, scale)
    s = surrogate_scale(surrogate, scale)
    return _LIFTorch.apply(current, leak, threshold, reset == "hard", surrogate, s)


def lif_cpu(current, leak, threshold, reset="soft", surrogate="linear", scale=None,
            return_membrane=False):
    """Fused CPU implementation of :func:`lif_multistep` (same signature and results).

    Uses the compiled C kernel when it is available, else :func:`lif_torch`; tensors on
    other devices, other dtypes and parameter layouts other than scalar / per-channel go
    to the PyTorch paths.
    """
    if return_membrane or not _supported(current, leak, threshold, reset, surrogate):
        return lif_multistep(current, leak, threshold, reset, surrogate, scale, return_membrane)
    if channel_layout(current, leak, threshold) is None:
        return lif_multistep(current, leak, threshold, reset, surrogate, scale)
    s = surrogate_scale(surrogate, scale)
    if current.device.type != "cpu" or load_library() is None:
        return _LIFTorch.apply(current, leak, threshold, reset == "hard", surrogate, s)
    fmt = step_format(current)
    if fmt is None:
        current, fmt = current.contiguous(), "contiguous"
    layout = channel_layout(current, leak, threshold, fmt)
    if not (torch.is_grad_enabled() and (current.requires_grad or leak.requires_grad
                                         or threshold.requires_grad)):
        return _lif_cext_inference(current, leak, threshold, reset == "hard", layout)
    base = time_broadcast_base(current)
    if base is not None:
        return _LIFCext.apply(base, leak, threshold, reset == "hard", surrogate, s, layout, current.shape[0])
    return _LIFCext.apply(current, leak, threshold, reset == "hard", surrogate, s, layout, None)


def pack_u8(x: torch.Tensor, levels: float = 16.0) -> torch.Tensor | None:
    """``x`` as uint8 ``k`` where ``x == k / levels`` exactly for every element, else None.

    Spikes ({0, 1}) and 2x2 average-pooled spikes (multiples of 1/4) fit ``levels=16``.
    Stops at the first value that does not fit (C kernel) so a failed try is cheap.
    """
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        return None
    out = torch.empty(x.shape, dtype=torch.uint8)
    lib = load_library()
    if lib is not None:
        ok = lib.pack_u8_f32(x.data_ptr(), x.numel(), out.data_ptr(), float(levels),
                             _threads(x.numel()))
        return out if ok else None
    q = x * levels
    k = q.round()
    if not bool(((q == k) & (k >= 0) & (k <= 255)).all()):
        return None
    return out.copy_(k)


# --------------------------------------------------------------------------------------
# Average pooling with stride == kernel (the only pooling in DIET networks)
# --------------------------------------------------------------------------------------
def avgpool_forward(x: torch.Tensor, k: int) -> torch.Tensor:
    """C k x k / stride k average pool of a contiguous CPU float tensor ``[..., H, W]`` ->
    ``[..., H // k, W // k]`` (no autograd; the library must be loaded)."""
    lead, (h, w) = x.shape[:-2], x.shape[-2:]
    planes = x.numel() // (h * w) if h * w else 0
    y = torch.empty(*lead, h // k, w // k, dtype=x.dtype)
    lib = load_library()
    fn = lib.avgpool_fwd_f32 if x.dtype == torch.float32 else lib.avgpool_fwd_f64
    fn(x.data_ptr(), y.data_ptr(), planes, h, w, k, _threads(x.numel()))
    return y


class _AvgPoolCext(torch.autograd.Function):
    """k x k / stride k average pool; saves only the input shape for backward."""

    @staticmethod
    def forward(ctx, x, k):
        ctx.shape, ctx.k = x.shape, k
        return avgpool_forward(x, k)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        g = g.contiguous()
        h, w = ctx.shape[-2:]
        planes = g.numel() // max(1, g.shape[-2] * g.shape[-1]) if g.dim() >= 2 else 0
        dx = torch.empty(ctx.shape, dtype=g.dtype)
        lib = load_library()
        fn = lib.avgpool_bwd_f32 if g.dtype == torch.float32 else lib.avgpool_bwd_f64
        fn(g.data_ptr(), dx.data_ptr(), planes, h, w, ctx.k, _threads(dx.numel()))
        return dx, None


def avg_pool_fast(x: torch.Tensor, k: int) -> torch.Tensor | None:
    """``F.avg_pool2d(x, k)`` (stride k, no padding) on contiguous CPU float tensors with the C
    kernel, bit-identical to PyTorch's and saving nothing for backward; None when not applicable.
    """
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() not in (3, 4)
            or not x.is_contiguous() or x.shape[-1] < k or x.shape[-2] < k or load_library() is None):
        return None
    return _AvgPoolCext.apply(x, int(k))
