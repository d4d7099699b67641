"""The leaky integrate-and-fire (LIF) neuron of DIET-SNN (SPEC §1).

Equations, per spiking layer and timestep t (all tensors ``[B, ...]``)::

    u[t]     = leak * u_hat[t-1] + I[t]             membrane potential before reset
    z[t]     = u[t] / thr - 1                       normalised distance to threshold
    o[t]     = H(z[t])                              spike: Heaviside in the forward pass
    do/dz    = surrogate'(z)                        gradient used in the backward pass
    u_hat[t] = u[t] - thr * o[t]                    soft reset ("subtract")
    u_hat[t] = u[t] * (1 - o[t])                    hard reset ("zero")

The spike ``o`` is detached inside the reset term (as in DIET-SNN), so the
membrane trace itself is a smooth function of ``leak``, ``thr`` and ``I``
between spikes; gradients reach ``leak`` and ``thr`` through autograd.

Surrogate derivatives, as functions of ``z``:

* ``linear``        ``gamma * max(0, 1 - |z|)``                 (DIET, gamma = 0.3)
* ``atan``          ``(alpha/2) / (1 + (pi/2 * alpha * z)^2)``  (CRIT, alpha = 2)
* ``fast_sigmoid``  ``1 / (1 + slope * |z|)^2``                 (SuperSpike, slope = 25)

:func:`lif_multistep` is the one pure function that holds these equations;
:class:`LIF` is the module that owns ``leak`` and ``thr``. Faster backends live
in :mod:`snncompress.kernels` and must reproduce this function exactly.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

RESETS = ("soft", "hard")
SURROGATES = ("linear", "atan", "fast_sigmoid")

#: Default shape parameter of each surrogate (gamma, alpha, slope).
SURROGATE_DEFAULT_SCALE = {"linear": 0.3, "atan": 2.0, "fast_sigmoid": 25.0}


def surrogate_grad(z: torch.Tensor, kind: str, scale: float | None = None) -> torch.Tensor:
    """Surrogate derivative ``d spike / d z`` evaluated at ``z = u/thr - 1`` (same shape as ``z``)."""
    s = SURROGATE_DEFAULT_SCALE[kind] if scale is None else scale
    if kind == "linear":
        return s * torch.clamp(1.0 - z.abs(), min=0.0)
    if kind == "atan":
        return (s / 2.0) / (1.0 + (math.pi / 2.0 * s * z) ** 2)
    if kind == "fast_sigmoid":
        return 1.0 / (1.0 + s * z.abs()) ** 2
    raise ValueError(f"unknown surrogate {kind!r}; choose one of {SURROGATES}")


class _SpikeFunction(torch.autograd.Function):
    """Heaviside forward, surrogate derivative backward; input and output ``z``-shaped."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, kind: str, scale: float | None) -> torch.Tensor:
        ctx.save_for_backward(z)
        ctx.kind, ctx.scale = kind, scale
        return (z >= 0).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (z,) = ctx.saved_tensors
        return grad_out * surrogate_grad(z, ctx.kind, ctx.scale), None, None


def spike_fn(z: torch.Tensor, kind: str = "linear", scale: float | None = None) -> torch.Tensor:
    """Spike ``H(z)`` with the chosen surrogate gradient; ``z`` any shape, output same shape, {0, 1}."""
    return _SpikeFunction.apply(z, kind, scale)


def lif_multistep(
    current: torch.Tensor,
    leak: torch.Tensor,
    threshold: torch.Tensor,
    reset: str = "soft",
    surrogate: str = "linear",
    scale: float | None = None,
    return_membrane: bool = False,
):
    """Run a LIF layer over all timesteps (reference implementation of SPEC §1).

    Args:
        current: input currents ``I``, shape ``[T, B, ...]`` (arbitrary units).
        leak: membrane leak factor in [0, 1]; a scalar tensor or one value per
            channel, already shaped to broadcast against ``[B, ...]``.
        threshold: firing threshold, same broadcasting rules as ``leak``.
        reset: ``"soft"`` (subtract threshold) or ``"hard"`` (reset to zero).
        surrogate: ``"linear"``, ``"atan"`` or ``"fast_sigmoid"``.
        scale: surrogate shape parameter; ``None`` uses the default.
        return_membrane: also return the pre-reset membrane potentials.

    Returns:
        spikes ``[T, B, ...]`` in {0, 1} (same dtype as ``current``), and with
        ``return_membrane`` the pre-reset potentials ``u`` ``[T, B, ...]``.
    """
    if reset not in RESETS:
        raise ValueError(f"unknown reset {reset!r}; choose one of {RESETS}")
    u_hat = torch.zeros_like(current[0])
    spikes, membranes = [], []
    for t in range(current.shape[0]):
        u = leak * u_hat + current[t]
        o = spike_fn(u / threshold - 1.0, surrogate, scale)
        if reset == "soft":
            u_hat = u - threshold * o.detach()
        else:
            u_hat = u * (1.0 - o.detach())
        spikes.append(o)
        if return_membrane:
            membranes.append(u)
    spikes = torch.stack(spikes)
    if return_membrane:
        return spikes, torch.stack(membranes)
    return spikes


#: Backends of :func:`lif_multistep` by name; :mod:`snncompress.kernels` adds faster ones.
LIF_BACKENDS: dict[str, Callable] = {"reference": lif_multistep}


def select_backend(name: str, current: torch.Tensor, return_membrane: bool) -> Callable:
    """Pick the implementation of :func:`lif_multistep` for this call.

    ``"auto"`` takes the fastest registered backend that supports the device
    (kernels register themselves under ``"cpu"`` and ``"triton"``), falling
    back to ``"reference"``. Membrane output always uses the reference path.
    """
    if return_membrane:
        return lif_multistep
    if name == "auto":
        name = "triton" if current.is_cuda else "cpu"
        return LIF_BACKENDS.get(name, lif_multistep)
    if name not in LIF_BACKENDS:
        raise ValueError(f"unknown LIF backend {name!r}; available: {sorted(LIF_BACKENDS)}")
    return LIF_BACKENDS[name]


class LIF(nn.Module):
    """Multi-step LIF layer with trainable leak and threshold (DIET-SNN).

    Input currents ``[T, B, C, ...]`` in, spikes ``[T, B, C, ...]`` out.

    Args:
        leak: initial leak (1.0 = integrate-and-fire).
        threshold: initial firing threshold (units of the input current).
        reset: ``"soft"`` or ``"hard"``.
        surrogate: ``"linear"``, ``"atan"`` or ``"fast_sigmoid"``.
        learn_leak / learn_threshold: make them trainable ``nn.Parameter`` s
            (otherwise buffers, still saved in checkpoints).
        per_channel: one leak and threshold per channel (dimension 2 of the
            input); needs ``num_channels``.
        backend: ``"auto"``, ``"reference"`` or a registered kernel name.

    After each optimizer step call :meth:`clamp_` (the training loop does):
    leak is kept in [0, 1] and the threshold above a small positive floor.
    Set ``record_membrane = True`` to keep the last pre-reset potentials in
    ``last_membrane`` (used by PCA pruning and criticality scores).
    """

    THRESHOLD_FLOOR = 1e-3

    def __init__(
        self,
        leak: float = 1.0,
        threshold: float = 1.0,
        reset: str = "soft",
        surrogate: str = "linear",
        learn_leak: bool = True,
        learn_threshold: bool = True,
        per_channel: bool = False,
        num_channels: int | None = None,
        surrogate_scale: float | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        if reset not in RESETS:
            raise ValueError(f"reset must be one of {RESETS}, got {reset!r}")
        if surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
        if per_channel and not num_channels:
            raise ValueError("per_channel=True needs num_channels")
        shape = (num_channels,) if per_channel else ()
        self.reset, self.surrogate, self.surrogate_scale = reset, surrogate, surrogate_scale
        self.per_channel, self.backend = per_channel, backend
        self._register("leak", torch.full(shape, float(leak)), learn_leak)
        self._register("threshold", torch.full(shape, float(threshold)), learn_threshold)
        self.record_membrane = False
        self.last_membrane: torch.Tensor | None = None

    def _register(self, name: str, value: torch.Tensor, trainable: bool) -> None:
        if trainable:
            self.register_parameter(name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    def _broadcast(self, p: torch.Tensor, ndim: int) -> torch.Tensor:
        """Shape a per-channel parameter ``[C]`` to broadcast over ``[B, C, ...]`` of ``ndim`` dims."""
        if p.dim() == 0:
            return p
        return p.view(-1, *([1] * (ndim - 2)))

    def forward(self, current: torch.Tensor) -> torch.Tensor:
        """Input currents ``[T, B, C, ...]`` -> spikes ``[T, B, C, ...]``."""
        leak = self._broadcast(self.leak, current.dim() - 1)
        thr = self._broadcast(self.threshold, current.dim() - 1)
        fn = select_backend(self.backend, current, self.record_membrane)
        out = fn(current, leak, thr, self.reset, self.surrogate, self.surrogate_scale,
                 return_membrane=self.record_membrane)
        if self.record_membrane:
            out, self.last_membrane = out[0], out[1].detach()
        return out

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep leak in [0, 1] and threshold >= THRESHOLD_FLOOR (call after each optimizer step)."""
        self.leak.clamp_(0.0, 1.0)
        self.threshold.clamp_(min=self.THRESHOLD_FLOOR)

    def extra_repr(self) -> str:
        return (f"reset={self.reset}, surrogate={self.surrogate}, per_channel={self.per_channel}, "
                f"learn_leak={isinstance(self.leak, nn.Parameter)}, "
                f"learn_threshold={isinstance(self.threshold, nn.Parameter)}")


# Fast backends (snncompress.kernels: "cpu", "triton", "torch") register themselves in
# LIF_BACKENDS. Nothing is compiled here; a broken kernels module never breaks this import.
try:
    from . import kernels  # noqa: E402,F401  registers fast LIF backends
except Exception as _exc:  # noqa: BLE001
    import warnings

    warnings.warn(f"snncompress.kernels unavailable, LIF uses the reference backend: {_exc!r}",
                  RuntimeWarning, stacklevel=1)
