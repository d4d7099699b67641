"""The pre-reset membrane potential ``u`` of a LIF layer from the fused kernels, without the reference loop.

This is the package's one membrane recorder: PCA pruning and the criticality
meter read ``u`` through :func:`record_membranes` (a forward hook on each LIF).
The fused backends compute ``u`` anyway and keep it for backward (it is the one
tensor they save). Two ways to get it:

* :func:`saved_membrane`: after a training forward pass, read it from the
  spikes' autograd node (free: nothing is recomputed);
* :func:`membrane`: run the fused forward once more, writing ``u``: on CPU the
  C kernel directly (any grad mode, inference mode included); on other devices
  the layer's backend under ``enable_grad`` on a detached input, reading its
  saved ``u``; the reference loop only where neither applies (a state
  quantizer, a layout the kernels do not cover).

:func:`layer_membrane` takes the first that applies.

Shapes: currents and potentials ``[T, B, ...]``; ``leak`` / ``threshold`` scalar
or per channel, already shaped to broadcast over ``[B, C, ...]``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch

from ..neuron import LIF, lif_multistep, select_backend
from .cpu import (_empty_steps, _param_vector, _supported, channel_layout, launch_forward, load_library,
                  step_format)

def saved_membrane(spikes: torch.Tensor) -> torch.Tensor | None:
    """The pre-reset potential ``u`` ``[T, B, ...]`` a fused kernel saved for the backward of ``spikes``, or None.

    A fused kernel's autograd Function says so with a true ``SAVES_MEMBRANE`` class attribute
    (its first saved tensor is then ``u``).
    """
    node = spikes.grad_fn
    forward_cls = getattr(node, "_forward_cls", None)
    if not getattr(forward_cls, "SAVES_MEMBRANE", False):
        return None
    u = node.saved_tensors[0]
    return u if tuple(u.shape) == tuple(spikes.shape) else None


def _cpu_membrane(current: torch.Tensor, leak: torch.Tensor, threshold: torch.Tensor, hard: bool):
    """``u`` from the C forward kernel (one pass, spikes written to scratch), or None where it does not apply."""
    if (current.device.type != "cpu" or not _supported(current, leak, threshold, "hard" if hard else "soft", "linear")
            or load_library() is None):
        return None
    fmt = step_format(current)
    if fmt is None:
        current, fmt = current.contiguous(), "contiguous"
    layout = channel_layout(current, leak, threshold, fmt)
    if layout is None:
        return None
    steps = current.shape[0]
    its = current.stride(0) if steps > 1 else 0  # 0: one tensor broadcast over time (conv1's output)
    out, u = _empty_steps(current), _empty_steps(current)
    launch_forward(current, its, _param_vector(leak, layout[0]), _param_vector(threshold, layout[0]), hard, layout,
                   steps, out, u)
    return u


def membrane(lif: LIF, current: torch.Tensor) -> torch.Tensor:
    """The pre-reset potentials ``u`` ``[T, B, ...]`` that ``lif`` computes for input currents ``current``.

    Equal to ``lif_multistep(..., return_membrane=True)[1]`` (the fused kernels repeat the
    reference's roundings), detached.
    """
    ndim = current.dim() - 1
    leak = lif._broadcast(lif.leak, ndim).detach()
    thr = lif._broadcast(lif.threshold, ndim).detach()
    current = current.detach()
    with torch.no_grad():
        if lif.state_quantizer is None:
            u = _cpu_membrane(current, leak, thr, lif.reset == "hard")
            if u is not None:
                return u
            if not torch.is_inference_mode_enabled() and not current.is_inference():
                with torch.enable_grad():
                    x = current.clone().requires_grad_(True)
                    fn = select_backend(lif.backend, x)
                    u = saved_membrane(fn(x, leak, thr, lif.reset, lif.surrogate, lif.surrogate_scale))
                if u is not None:
                    return u.detach()
        return lif_multistep(current, leak, thr, lif.reset, lif.surrogate, lif.surrogate_scale,
                             return_membrane=True, state_quantizer=lif.state_quantizer)[1]


def layer_membrane(lif: LIF, current: torch.Tensor, spikes: torch.Tensor) -> torch.Tensor:
    """The pre-reset potentials ``u`` ``[T, B, ...]`` of one forward of ``lif`` (``current`` in, ``spikes`` out), detached.

    Read from the spikes' autograd node where a fused kernel saved it, else recomputed by :func:`membrane`.
    """
    u = saved_membrane(spikes)
    return u.detach() if u is not None else membrane(lif, current)


@contextmanager
def record_membranes(layers: Iterable[tuple[str, LIF]],
                     on_membrane: Callable[[str, LIF, torch.Tensor], None]) -> Iterator[None]:
    """Call ``on_membrane(name, lif, u)`` after every forward of each named LIF while the block runs.

    ``u`` is :func:`layer_membrane`'s ``[T, B, ...]``; the hooks are removed on exit, even on error.
    """
    def hook_for(name: str):
        def hook(module: LIF, args, output):
            on_membrane(name, module, layer_membrane(module, args[0], output))
        return hook

    handles = [lif.register_forward_hook(hook_for(name)) for name, lif in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
