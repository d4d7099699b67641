"""The Diehl & Cook population loop on CPU: the C kernel of ``csrc/population.c`` behind a tensor call.

:func:`run_steps_c` computes what :meth:`~snncompress.models.stdp.DiehlCookNetwork.run_steps_torch`
computes (same spikes, same state, float32) in one call per chunk of steps instead of ~20 tensor
operations per step; :func:`population_library` says when it applies (CPU float32 tensors, no
membrane quantizer, the C library built). Importing this module registers it in
:data:`snncompress.neuron.POPULATION_KERNELS` (``snncompress.kernels`` imports it).
"""

from __future__ import annotations

import ctypes

import torch

from ..neuron import POPULATION_KERNELS
from .library import load_library


def population_library(currents: torch.Tensor, model=None):
    """The loaded C library when the kernel applies to ``currents`` ``[k, B, N]`` (else None)."""
    if currents.device.type != "cpu" or currents.dtype != torch.float32:
        return None
    if model is not None and getattr(model.excitatory, "state_quantizer", None) is not None:
        return None
    return load_library()


def _ptr(x: torch.Tensor | None):
    return ctypes.c_void_p(x.data_ptr()) if x is not None else None


def run_steps_c(lib, model, state: dict, currents: torch.Tensor, noise: torch.Tensor | None,
                theta_plus: float, x_post: torch.Tensor | None, trace_keep: float):
    """``model.run_steps`` through the C kernel; arguments and result as there."""
    k, batch, n = currents.shape
    c = model.constants()
    threshold = model.excitatory.threshold
    stored = threshold if threshold.is_contiguous() and threshold.dtype == torch.float32 else None
    work = stored if stored is not None else threshold.detach().to(torch.float32).contiguous()
    for name in state:
        if not state[name].is_contiguous():
            state[name] = state[name].contiguous()
    spikes = torch.empty_like(currents)
    traces = torch.empty_like(currents) if x_post is not None else None
    params = torch.tensor([float(model.excitatory.leak), model.excitatory.reset,
                           float(model.excitatory.refractory_steps), c["inh"], c["exc"], c["inh_leak"],
                           c["inh_threshold"], c["inh_reset"], c["inh_refractory"], theta_plus, trace_keep],
                          dtype=torch.float64)
    scratch = torch.empty(n)
    lib.dc_population_f32(k, batch, n, _ptr(currents), _ptr(noise.contiguous() if noise is not None else None),
                          _ptr(state["v"]), _ptr(state["countdown"]), _ptr(state["inh_v"]),
                          _ptr(state["inh_countdown"]), _ptr(state["inh_last"]), _ptr(state["exc_last"]),
                          _ptr(work), _ptr(x_post), _ptr(spikes), _ptr(traces), _ptr(state["counts"]),
                          _ptr(state["inh_counts"]), _ptr(scratch), _ptr(params), int(c["layer"]),
                          int(c["one_spike"]))
    if stored is None and theta_plus:
        threshold.copy_(work)
    return spikes, traces


def run_on_cpu(model, state: dict, currents: torch.Tensor, noise, theta_plus: float, x_post, trace_keep: float):
    """The registered ``"cpu"`` population kernel: :func:`run_steps_c` where it applies, else None."""
    lib = population_library(currents, model)
    if lib is None:
        return None
    return run_steps_c(lib, model, state, currents.contiguous(), noise, theta_plus, x_post, trace_keep)


POPULATION_KERNELS["cpu"] = run_on_cpu
