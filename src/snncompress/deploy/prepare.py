"""Fast CPU inference for (pruned, low-T) spiking networks.

:func:`prepare_for_inference` turns a trained model into its fastest inference
form in place, without changing a single output:

* ``eval()`` mode and the fused LIF backend (``"auto"``: the C kernel on CPU,
  Triton on CUDA). Run it under ``torch.inference_mode()``: the kernels then
  save nothing and the first layer's current, broadcast over T, is read in
  place (never copied T times).
* channels_last memory order for convolutions (oneDNN's fast path on x86 CPUs;
  1.3-1.7x faster inference convolutions in our 2-core Xeon measurements), with a
  forward pre-hook that converts 4-D inputs. The LIF kernels walk channels_last
  timesteps natively.
* 2x2 average pooling through the C kernel for NCHW tensors (PyTorch's NCHW
  kernel is several times slower on CPU).

Everything is reversible by building the model again from its checkpoint;
parameters and state_dict are unchanged (conv weights only change strides).
"""

from __future__ import annotations

import torch
from torch import nn

from ..neuron import LIF
from ..training.memory import swap_pools


def _to_channels_last(module, args):
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4 and args[0].is_floating_point():
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    return None


def prepare_for_inference(model: nn.Module, channels_last: bool = True, backend: str = "auto",
                          fast_pool: bool = True) -> nn.Module:
    """Put ``model`` in its fastest inference form in place and return it (outputs unchanged).

    Args:
        model: an snncompress network (any ``nn.Module`` with :class:`LIF` layers works).
        channels_last: convert conv weights (and, via a pre-hook, 4-D inputs) to
            channels_last memory order.
        backend: LIF backend for every LIF layer (``"auto"`` = fastest for the device).
        fast_pool: use the C average-pool kernel (stride == kernel, no padding).
    """
    model.eval()
    for m in model.modules():
        if isinstance(m, LIF):
            m.backend = backend
    spec = getattr(model, "spec", None)
    if isinstance(spec, dict):
        spec.setdefault("neuron", {})["backend"] = backend
    if fast_pool:
        swap_pools(model, True)
    handle = model.__dict__.pop("_snn_cl_handle", None)
    if handle is not None:
        handle.remove()
    if channels_last:
        model.to(memory_format=torch.channels_last)
        model.__dict__["_snn_cl_handle"] = model.register_forward_pre_hook(_to_channels_last)
    return model


def tune_cpu_allocator(keep_freed_memory: bool = True) -> bool:
    """Ask glibc malloc to keep freed memory for reuse instead of returning it to the OS.

    PyTorch allocates every CPU tensor with malloc; glibc serves blocks above ~32 MB with
    fresh mmap()s, so each large activation pays page faults on first touch (on the 2-core
    VM used for the benchmarks, allocating and filling a new 33 MB tensor took ~3x as long
    as refilling an existing one). Setting ``M_MMAP_MAX = 0`` and a huge
    ``M_TRIM_THRESHOLD`` keeps freed blocks in the heap for reuse, at the price of a
    resident set that stays at its high-water mark. Opt-in and process-wide (it helps every
    framework alike; measure on your machine); returns False where unsupported (non-glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    if keep_freed_memory:
        ok = mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    else:
        ok = mallopt(M_MMAP_MAX, 65536) and mallopt(M_TRIM_THRESHOLD, 128 * 1024)
    return bool(ok)

