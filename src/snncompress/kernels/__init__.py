"""Fast backends of :func:`snncompress.neuron.lif_multistep`, registered on import.

=========  ===========================================================  ===============
name       what                                                         chosen by auto
=========  ===========================================================  ===============
cpu        fused C kernel (built with the system C compiler on first    CPU tensors
           use, cached; PyTorch fallback without a compiler)
triton     fused Triton kernel (forward + backward in one launch each)  CUDA tensors
torch      lean-memory pure-PyTorch loop, any device                    never (explicit)
reference  :func:`~snncompress.neuron.lif_multistep` itself             never (explicit)
=========  ===========================================================  ===============

All compute the reference's spikes exactly and its gradients for ``current``,
``leak`` and ``threshold`` (scalar or per-channel), save only the pre-reset
potential ``u`` for backward, and save nothing under ``torch.inference_mode``.
Layouts they do not cover (other dtypes, other parameter shapes,
``return_membrane``) go to the reference.

Also here: :func:`lean_memory` (store spike-valued activations as uint8 for
backward), :func:`checkpoint_layers` (recompute each spiking layer in backward)
and :func:`prepare_for_inference`.
"""

from __future__ import annotations

from ..neuron import LIF_BACKENDS
from .cpu import build_error, cext_available, lif_cpu, lif_torch


def lif_triton(current, leak, threshold, reset="soft", surrogate="linear", scale=None,
               return_membrane=False):
    """Triton backend (CUDA); imports Triton on first use, falls back to :func:`lif_torch`."""
    global _triton_impl
    if _triton_impl is None:
        try:
            from .triton_lif import lif_triton as impl
        except Exception:  # noqa: BLE001 - no Triton / no working toolchain: stay usable
            impl = lif_torch
        _triton_impl = impl
    return _triton_impl(current, leak, threshold, reset, surrogate, scale, return_membrane)


_triton_impl = None

LIF_BACKENDS["cpu"] = lif_cpu
LIF_BACKENDS["triton"] = lif_triton
LIF_BACKENDS["torch"] = lif_torch

from .checkpointing import checkpoint_layers, lean_memory  # noqa: E402
from .inference import prepare_for_inference, tune_cpu_allocator  # noqa: E402

__all__ = ["lif_cpu", "lif_triton", "lif_torch", "cext_available", "build_error",
           "lean_memory", "checkpoint_layers", "prepare_for_inference", "tune_cpu_allocator"]
