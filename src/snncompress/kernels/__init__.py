"""Fast backends of :func:`snncompress.neuron.lif_multistep`, registered on import.

``import snncompress`` imports this package, which adds its backends to
:data:`snncompress.neuron.LIF_BACKENDS`; :mod:`snncompress.neuron` itself never
imports it.

=========  ===========================================================  ===============
name       what                                                         chosen by auto
=========  ===========================================================  ===============
cpu        fused C kernel (built with the system C compiler on first    CPU tensors
           use, cached; PyTorch fallback without a compiler)
triton     fused Triton kernel (forward + backward in one launch each)  CUDA tensors
torch      lean-memory pure-PyTorch loop, any device                    never (explicit)
reference  :func:`~snncompress.neuron.lif_multistep` itself             never (explicit)
=========  ===========================================================  ===============

All compute the spikes of the :func:`~snncompress.neuron.lif_step` loop exactly
and its gradients for ``current``, ``leak`` and ``threshold`` (scalar or
per-channel), save only the pre-reset potential ``u`` for backward, and save
nothing under ``torch.inference_mode``. Layouts they do not cover (other dtypes,
other parameter shapes, surrogates beyond the kernels' formulas,
``return_membrane``) go to the reference; :class:`~snncompress.neuron.LIF` with a
``state_quantizer`` never calls them.

The memory tools of training (``lean_memory``, ``checkpoint_layers``) live in
:mod:`snncompress.training.memory`, the inference forms in :mod:`snncompress.deploy`.
"""

from __future__ import annotations

from ..neuron import LIF_BACKENDS
from . import population  # noqa: F401  (registers the Diehl & Cook population kernel)
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


__all__ = ["lif_cpu", "lif_triton", "lif_torch", "cext_available", "build_error"]
