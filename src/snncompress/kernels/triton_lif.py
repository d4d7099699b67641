"""Fused multi-step LIF for CUDA in Triton: one launch forward, one backward.

Each program owns ``BLOCK`` neurons and walks all T timesteps with the
membrane state in registers: forward reads ``I`` once and writes spikes and
the pre-reset potential ``u`` once; backward reads ``grad_o`` and ``u`` once,
writes ``grad_I`` once and leaves per-neuron partial sums of ``dL/dleak`` and
``dL/dthr`` that a reduction over the broadcast dimensions turns into the
parameter gradients (scalar or per-channel). The recurrence is the one
documented in :mod:`snncompress.kernels.cpu`.

``u = leak * h + I`` and ``u / thr`` use correctly rounded ``mul_rn`` /
``add_rn`` / ``div_rn`` so that they are never contracted into an FMA or an
approximate division: spikes are bit-identical to the PyTorch reference.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    # Triton's CPU interpreter (used to test this file without a GPU) runs numpy, which
    # never contracts or approximates: the plain operators are correctly rounded there.
    @triton.jit
    def _mul_rn(a, b):
        return a * b

    @triton.jit
    def _add_rn(a, b):
        return a + b

    @triton.jit
    def _div_rn(a, b):
        return a / b
else:
    from triton.language.extra.cuda import libdevice

    _mul_rn, _add_rn, _div_rn = libdevice.mul_rn, libdevice.add_rn, libdevice.div_rn

from ..neuron import lif_multistep, surrogate_scale
from .cpu import SURROGATE_IDS, _supported, channel_layout, lif_torch, mark_keep


@triton.jit
def _lif_fwd_kernel(I_ptr, its, O_ptr, U_ptr, leak_ptr, thr_ptr, T, N, C, S,
                    HARD: tl.constexpr, SAVE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    ch = (offs // S) % C
    lk = tl.load(leak_ptr + ch, mask=mask, other=1.0)
    th = tl.load(thr_ptr + ch, mask=mask, other=1.0)
    h = tl.zeros([BLOCK], dtype=lk.dtype)
    for t in range(T):
        cur = tl.load(I_ptr + t * its + offs, mask=mask, other=0.0)
        u = _add_rn(_mul_rn(lk, h), cur)
        z = _div_rn(u, th) - 1.0
        o = tl.where(z >= 0.0, 1.0, 0.0).to(u.dtype)
        tl.store(O_ptr + t * N + offs, o, mask=mask)
        if SAVE:
            tl.store(U_ptr + t * N + offs, u, mask=mask)
        if HARD:
            h = u * (1.0 - o)
        else:
            h = u - th * o


# KIND is cpu.SURROGATE_IDS[name]: the surrogate's position in neuron.SURROGATE_TABLE.
@triton.jit
def _surrogate(z, s, half_pi_s, half_s, KIND: tl.constexpr):
    if KIND == 0:
        return s * tl.maximum(1.0 - tl.abs(z), 0.0)
    elif KIND == 1:
        q = half_pi_s * z
        return half_s / (1.0 + q * q)
    else:
        d = 1.0 + s * tl.abs(z)
        return 1.0 / (d * d)


@triton.jit
def _lif_bwd_kernel(G_ptr, gts, U_ptr, DI_ptr, leak_ptr, thr_ptr, PL_ptr, PT_ptr, T, N, C, S, K_ptr,
                    HARD: tl.constexpr, KIND: tl.constexpr, NEED_LEAK: tl.constexpr,
                    NEED_THR: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    ch = (offs // S) % C
    lk = tl.load(leak_ptr + ch, mask=mask, other=1.0)
    th = tl.load(thr_ptr + ch, mask=mask, other=1.0)
    rt = 1.0 / th
    s = tl.load(K_ptr)              # surrogate constants in the working dtype: s, pi/2*s, s/2
    half_pi_s = tl.load(K_ptr + 1)
    half_s = tl.load(K_ptr + 2)
    u = tl.load(U_ptr + (T - 1) * N + offs, mask=mask, other=0.0)
    z = _div_rn(u, th) - 1.0
    carry = tl.zeros([BLOCK], dtype=lk.dtype)
    al = tl.zeros([BLOCK], dtype=lk.dtype)
    at = tl.zeros([BLOCK], dtype=lk.dtype)
    for i in range(T):
        t = T - 1 - i
        o = tl.where(z >= 0.0, 1.0, 0.0).to(u.dtype)
        g = tl.load(G_ptr + t * gts + offs, mask=mask, other=0.0)
        gz = g * _surrogate(z, s, half_pi_s, half_s, KIND) * rt
        if HARD:
            du = gz + carry * (1.0 - o)
        else:
            du = gz + carry
        tl.store(DI_ptr + t * N + offs, du, mask=mask)
        if NEED_THR:
            if HARD:
                at -= gz * u * rt
            else:
                at -= gz * u * rt + carry * o
        carry = lk * du
        if t > 0:
            up = tl.load(U_ptr + (t - 1) * N + offs, mask=mask, other=0.0)
            zp = _div_rn(up, th) - 1.0
            if NEED_LEAK:
                op = tl.where(zp >= 0.0, 1.0, 0.0).to(u.dtype)
                if HARD:
                    hp = up * (1.0 - op)
                else:
                    hp = up - th * op
                al += du * hp
            u = up
            z = zp
    if NEED_LEAK:
        tl.store(PL_ptr + offs, al, mask=mask)
    if NEED_THR:
        tl.store(PT_ptr + offs, at, mask=mask)


BLOCK = 1024


def _vec(p: torch.Tensor, c: int) -> torch.Tensor:
    p = p.detach().reshape(-1)
    return (p.expand(c) if p.numel() == 1 else p).contiguous()


def _per_channel(part: torch.Tensor, c: int, s: int, p: torch.Tensor) -> torch.Tensor:
    """Per-neuron partial sums ``[N]`` -> gradient of parameter ``p`` (scalar or per-channel)."""
    if p.numel() == 1:
        return part.sum(dtype=torch.float64).reshape(p.shape).to(p.dtype)
    return part.view(-1, c, s).sum((0, 2), dtype=torch.float64).reshape(p.shape).to(p.dtype)


class _LIFTriton(torch.autograd.Function):
    """Triton LIF on CUDA; saves u first like the CPU kernels (kernels.membrane.saved_membrane reads it)."""

    SAVES_MEMBRANE = True
    @staticmethod
    def forward(ctx, current, leak, threshold, hard, kind, scale, layout):
        c, s = layout
        steps, n = current.shape[0], current[0].numel()
        if steps > 1 and current.stride(0) == 0 and current[0].is_contiguous():
            its = 0
        else:
            current = current.contiguous()
            its = n
        need_grad = any(ctx.needs_input_grad[:3])
        out = torch.empty(current.shape, dtype=current.dtype, device=current.device)
        u = torch.empty_like(out) if need_grad else out  # dummy pointer when not saving
        lk, th = _vec(leak, c), _vec(threshold, c)
        grid = (triton.cdiv(n, BLOCK),)
        _lif_fwd_kernel[grid](current, its, out, u, lk, th, steps, n, c, s,
                              HARD=bool(hard), SAVE=need_grad, BLOCK=BLOCK)
        if need_grad:
            mark_keep(u)
            ctx.save_for_backward(u, leak, threshold)
            ctx.cfg = (hard, kind, scale, layout)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        u, leak, threshold = ctx.saved_tensors
        hard, kind, scale, (c, s) = ctx.cfg
        steps, n = u.shape[0], u[0].numel()
        grad_out = grad_out.to(u.dtype)
        if steps > 1 and grad_out.stride(0) == 0 and grad_out[0].is_contiguous():
            gts = 0
        else:
            grad_out = grad_out.contiguous()
            gts = n
        need_leak, need_thr = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_in = torch.empty_like(u)
        pl = torch.empty(n, dtype=u.dtype, device=u.device) if need_leak else grad_in
        pt = torch.empty(n, dtype=u.dtype, device=u.device) if need_thr else grad_in
        lk, th = _vec(leak, c), _vec(threshold, c)
        consts = torch.tensor([scale, math.pi / 2.0 * scale, scale / 2.0], dtype=u.dtype, device=u.device)
        grid = (triton.cdiv(n, BLOCK),)
        _lif_bwd_kernel[grid](grad_out, gts, u, grad_in, lk, th, pl, pt, steps, n, c, s, consts,
                              HARD=bool(hard), KIND=SURROGATE_IDS[kind], NEED_LEAK=bool(need_leak),
                              NEED_THR=bool(need_thr), BLOCK=BLOCK)
        g_leak = _per_channel(pl, c, s, leak) if need_leak else None
        g_thr = _per_channel(pt, c, s, threshold) if need_thr else None
        return grad_in, g_leak, g_thr, None, None, None, None


def lif_triton(current, leak, threshold, reset="soft", surrogate="linear", scale=None,
               return_membrane=False):
    """Triton implementation of :func:`snncompress.neuron.lif_multistep` for CUDA tensors."""
    if return_membrane or not _supported(current, leak, threshold, reset, surrogate):
        return lif_multistep(current, leak, threshold, reset, surrogate, scale, return_membrane)
    if not current.is_cuda:
        return lif_torch(current, leak, threshold, reset, surrogate, scale)
    if channel_layout(current, leak, threshold) is None:
        return lif_multistep(current, leak, threshold, reset, surrogate, scale)
    if not current[0].is_contiguous():
        current = current.contiguous()
    layout = channel_layout(current, leak, threshold)
    s = surrogate_scale(surrogate, scale)
    return _LIFTriton.apply(current, leak, threshold, reset == "hard", surrogate, s, layout)
