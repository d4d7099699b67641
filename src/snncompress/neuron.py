"""The leaky integrate-and-fire (LIF) neuron of DIET-SNN (docs/methods/diet.md).

Equations, per spiking layer and timestep t (all tensors ``[B, ...]``)::

    u[t]     = leak * u_hat[t-1] + I[t]             membrane potential before reset
    z[t]     = u[t] / thr - 1                       normalised distance to threshold
    o[t]     = H(z[t])                              spike: Heaviside in the forward pass
    do/dz    = surrogate'(z)                        gradient used in the backward pass
    u_hat[t] = u[t] - thr * o[t]                    soft reset ("subtract")
    u_hat[t] = u[t] * (1 - o[t])                    hard reset ("zero")
    u_hat[t] = q(u_hat[t])                          optional membrane-state quantizer

with ``u_hat[-1] = 0``. ``I``, ``u``, ``u_hat`` and ``thr`` share one unit (that
of the input current); ``leak`` and ``z`` are dimensionless.

The spike ``o`` is detached inside the reset term (as in DIET-SNN), so the
membrane trace itself is a smooth function of ``leak``, ``thr`` and ``I``
between spikes; gradients reach ``leak`` and ``thr`` through autograd.

Surrogate derivatives, as functions of ``z`` (:data:`SURROGATE_TABLE`):

* ``linear``        ``gamma * max(0, 1 - |z|)``                 (DIET, gamma = 0.3)
* ``atan``          ``(alpha/2) / (1 + (pi/2 * alpha * z)^2)``  (CRIT, alpha = 2)
* ``fast_sigmoid``  ``1 / (1 + slope * |z|)^2``                 (SuperSpike, slope = 25)

:func:`lif_step` is the one function that holds these equations, for one
timestep; :func:`lif_multistep` loops it over ``T``; :class:`LIF` is the module
that owns ``leak`` and ``thr``. Faster multi-step backends live in
:mod:`snncompress.kernels` (registered in :data:`LIF_BACKENDS` when
``snncompress`` is imported) and must reproduce :func:`lif_step` exactly.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

RESETS = ("soft", "hard")


def _linear(z: torch.Tensor, gamma: float) -> torch.Tensor:
    return gamma * torch.clamp(1.0 - z.abs(), min=0.0)


def _atan(z: torch.Tensor, alpha: float) -> torch.Tensor:
    return (alpha / 2.0) / (1.0 + (math.pi / 2.0 * alpha * z) ** 2)


def _fast_sigmoid(z: torch.Tensor, slope: float) -> torch.Tensor:
    return 1.0 / (1.0 + slope * z.abs()) ** 2


class Surrogate(NamedTuple):
    """One surrogate gradient: ``derivative(z, scale)`` (``z`` any shape, result same shape)
    and the default of its dimensionless shape parameter ``scale``."""

    derivative: Callable[[torch.Tensor, float], torch.Tensor]
    default_scale: float


#: The surrogate gradients by name; the only list of them in the package. The fused
#: kernels implement the first entries in this order (their ``KIND`` is the position).
SURROGATE_TABLE: dict[str, Surrogate] = {
    "linear": Surrogate(_linear, 0.3),
    "atan": Surrogate(_atan, 2.0),
    "fast_sigmoid": Surrogate(_fast_sigmoid, 25.0),
}

SURROGATES = tuple(SURROGATE_TABLE)

#: Default shape parameter of each surrogate (gamma, alpha, slope).
SURROGATE_DEFAULT_SCALE = {name: s.default_scale for name, s in SURROGATE_TABLE.items()}


def _surrogate(kind: str) -> Surrogate:
    try:
        return SURROGATE_TABLE[kind]
    except KeyError:
        raise ValueError(f"unknown surrogate {kind!r}; choose one of {SURROGATES}") from None


def surrogate_scale(kind: str, scale: float | None = None) -> float:
    """The shape parameter to use: ``scale`` itself, or the surrogate's default when None."""
    return _surrogate(kind).default_scale if scale is None else float(scale)


def surrogate_grad(z: torch.Tensor, kind: str, scale: float | None = None) -> torch.Tensor:
    """Surrogate derivative ``d spike / d z`` evaluated at ``z = u/thr - 1`` (same shape as ``z``)."""
    sur = _surrogate(kind)
    return sur.derivative(z, sur.default_scale if scale is None else scale)


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


class LIFState(NamedTuple):
    """State of a LIF layer after a timestep; both fields ``[B, ...]``, units of the input current.

    ``u_hat`` is the membrane after reset (and after the state quantizer, if any): the
    only field the next :func:`lif_step` reads. ``u`` is the pre-reset potential of the
    step that produced this state, kept for callers that analyse it (PCA pruning,
    criticality scores); it is zero in the initial state.
    """

    u_hat: torch.Tensor
    u: torch.Tensor

    @classmethod
    def initial(cls, like: torch.Tensor) -> "LIFState":
        """The resting state ``u_hat = u = 0`` for one timestep's input ``like`` ``[B, ...]``."""
        return cls(torch.zeros_like(like), torch.zeros_like(like))


def lif_step(
    current: torch.Tensor,
    state: LIFState,
    leak: torch.Tensor,
    threshold: torch.Tensor,
    reset: str = "soft",
    surrogate: str = "linear",
    scale: float | None = None,
    state_quantizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, LIFState]:
    """One timestep of the LIF equations of this module (see its docstring).

    Args:
        current: input current ``I[t]``, shape ``[B, ...]``.
        state: the layer's state after the previous step (:meth:`LIFState.initial` before
            the first one).
        leak: membrane leak factor in [0, 1]; a scalar tensor or one value per channel,
            already shaped to broadcast against ``[B, ...]``.
        threshold: firing threshold (units of the current), same broadcasting as ``leak``.
        reset: ``"soft"`` (subtract threshold) or ``"hard"`` (reset to zero).
        surrogate: a name in :data:`SURROGATES`.
        scale: surrogate shape parameter; ``None`` uses the default.
        state_quantizer: maps ``u_hat`` to a same-shaped tensor (e.g. a fake quantizer
            with a straight-through gradient); ``None`` keeps it exact.

    Returns:
        ``(spikes, new_state)``: spikes ``[B, ...]`` in {0, 1} (dtype of ``current``) and
        :class:`LIFState` with the new ``u_hat`` and this step's pre-reset ``u``.
    """
    u = leak * state.u_hat + current
    o = spike_fn(u / threshold - 1.0, surrogate, scale)
    if reset == "soft":
        u_hat = u - threshold * o.detach()
    elif reset == "hard":
        u_hat = u * (1.0 - o.detach())
    else:
        raise ValueError(f"unknown reset {reset!r}; choose one of {RESETS}")
    if state_quantizer is not None:
        u_hat = state_quantizer(u_hat)
    return o, LIFState(u_hat, u)


def lif_multistep(
    current: torch.Tensor,
    leak: torch.Tensor,
    threshold: torch.Tensor,
    reset: str = "soft",
    surrogate: str = "linear",
    scale: float | None = None,
    return_membrane: bool = False,
    state_quantizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
):
    """Run a LIF layer over all timesteps from rest: :func:`lif_step` for t = 0 .. T-1.

    This is the reference implementation of docs/methods/diet.md (``"reference"`` backend).

    Args:
        current: input currents ``I``, shape ``[T, B, ...]`` (arbitrary units).
        leak, threshold, reset, surrogate, scale, state_quantizer: as in :func:`lif_step`.
        return_membrane: also return the pre-reset membrane potentials.

    Returns:
        spikes ``[T, B, ...]`` in {0, 1} (same dtype as ``current``), and with
        ``return_membrane`` the pre-reset potentials ``u`` ``[T, B, ...]``.
    """
    state = LIFState.initial(current[0])
    spikes, membranes = [], []
    for t in range(current.shape[0]):
        o, state = lif_step(current[t], state, leak, threshold, reset, surrogate, scale,
                            state_quantizer)
        spikes.append(o)
        if return_membrane:
            membranes.append(state.u)
    spikes = torch.stack(spikes)
    if return_membrane:
        return spikes, torch.stack(membranes)
    return spikes


#: Backends of :func:`lif_multistep` by name; :mod:`snncompress.kernels` adds faster ones.
LIF_BACKENDS: dict[str, Callable] = {"reference": lif_multistep}

class NeuronOptions(BaseModel):
    """Every option of a network's :class:`LIF` layers, with its default: the one place they are stated.

    A recipe's ``model.neuron`` section is this model; a spec's ``neuron`` dict holds its values
    (``surrogate_scale`` only when set); :func:`snncompress.models.base.make_lif` builds each LIF from it.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    leak: float = Field(1.0, ge=0.0, le=1.0, description="initial leak (1: integrate-and-fire)")
    threshold: float = Field(1.0, gt=0.0, description="initial firing threshold")
    reset: Literal[RESETS] = Field("soft", description="soft: subtract the threshold; hard: to zero")
    surrogate: Literal[SURROGATES] = Field("linear", description="surrogate gradient of the spike")
    surrogate_scale: float | None = Field(
        None, gt=0, description="the surrogate's shape parameter (gamma, alpha, slope); default: the "
                                "surrogate's own (SURROGATE_DEFAULT_SCALE)")
    learn_leak: bool = Field(True, description="leak is a trained parameter (else a fixed buffer)")
    learn_threshold: bool = Field(True, description="threshold is a trained parameter (else a fixed buffer)")
    per_channel: bool = Field(False, description="one leak and threshold per channel (else per layer)")
    backend: str = Field("auto", description="LIF kernel: auto or a registered backend")
    ann_levels: int | None = Field(
        None, ge=1, description="the ANN twin's activation: ReLU (unset), or the firing rate an integrate-and-fire "
                                "neuron reaches in this many steps, clamp(floor(levels * x / threshold) / levels, 0, "
                                "1), with the threshold trained (quantization-aware ANN; convert with thresholds: "
                                "keep at T = levels)")

    @field_validator("backend")
    @classmethod
    def known_backend(cls, value: str) -> str:
        if value != "auto" and value not in LIF_BACKENDS:
            raise ValueError(f"unknown LIF backend; choose one of {', '.join(['auto', *sorted(LIF_BACKENDS)])}")
        return value

    def spec(self) -> dict:
        """The values a model spec stores (``surrogate_scale`` only when set, so older specs stay equal)."""
        return self.model_dump(exclude_none=True)


#: Faster loops of the Diehl & Cook population step (:meth:`snncompress.models.stdp.DiehlCookNetwork.run_steps`)
#: by name; :mod:`snncompress.kernels` registers its C kernel as ``"cpu"``. A kernel returns None where it
#: does not apply (then the tensor loop runs). Filled from above, like :data:`LIF_BACKENDS`.
POPULATION_KERNELS: dict[str, Callable] = {}


def select_backend(name: str, current: torch.Tensor) -> Callable:
    """Pick the implementation of :func:`lif_multistep` for this call.

    ``"auto"`` takes the fastest registered backend that supports the device
    (kernels register themselves under ``"cpu"`` and ``"triton"``), falling
    back to ``"reference"``.
    """
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
        surrogate: a name in :data:`SURROGATES`.
        surrogate_scale: its shape parameter; ``None`` uses the default.
        learn_leak / learn_threshold: make them trainable ``nn.Parameter`` s
            (otherwise buffers, still saved in checkpoints).
        per_channel: one leak and threshold per channel (dimension 2 of the
            input); needs ``num_channels``.
        backend: ``"auto"``, ``"reference"`` or a registered kernel name.
        state_quantizer: initial value of the :attr:`state_quantizer` slot.

    ``state_quantizer`` is a submodule slot (``None`` by default): an ``nn.Module``
    mapping the membrane after reset ``u_hat`` ``[B, C, ...]`` to a tensor of the same
    shape and unit, applied at every timestep (e.g. a fake quantizer with a
    straight-through gradient). Assign it like any submodule (``lif.state_quantizer =
    q``): ``.to()`` moves it and its buffers are in ``state_dict``. While it is set the
    layer runs the reference loop :func:`lif_multistep`, whatever its ``backend``.

    After each optimizer step call :meth:`clamp_` (the training loop does):
    leak is kept in [0, 1] and the threshold above a small positive floor.
    Its pre-reset potentials are read by :func:`snncompress.kernels.membrane.record_membranes`
    (PCA pruning and criticality scores).
    """

    THRESHOLD_FLOOR = 1e-3
    state_quantizer: nn.Module | None

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
        state_quantizer: nn.Module | None = None,
        ann_levels: int | None = None,
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
        self.ann_levels = ann_levels
        self._register("leak", torch.full(shape, float(leak)), learn_leak)
        self._register("threshold", torch.full(shape, float(threshold)), learn_threshold)
        self.register_module("state_quantizer", state_quantizer)

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
        """Input currents ``[T, B, C, ...]`` -> spikes ``[T, B, C, ...]``.

        A half-precision current (bf16 autocast) is integrated in float32: membrane,
        threshold and leak never lose precision, and the 0/1 spikes are exact in any type.
        """
        if current.dtype in (torch.bfloat16, torch.float16):
            current = current.float()
        leak = self._broadcast(self.leak, current.dim() - 1)
        thr = self._broadcast(self.threshold, current.dim() - 1)
        if self.state_quantizer is None:
            fn = select_backend(self.backend, current)
        else:
            fn = functools.partial(lif_multistep, state_quantizer=self.state_quantizer)
        return fn(current, leak, thr, self.reset, self.surrogate, self.surrogate_scale)

    def ann_rate(self, x: torch.Tensor) -> torch.Tensor:
        """The ANN twin's clip-floor activation (``ann_levels`` = L): input ``[B, C, ...]`` (units of the
        membrane) -> ``clamp(floor(L x / threshold) / L, 0, 1)`` ``[B, C, ...]``, the spike count per step that an
        integrate-and-fire neuron with soft reset reaches from rest on a constant input in L steps. The floor
        passes its gradient straight through, so ``x`` and the threshold both learn."""
        scaled = x * self.ann_levels / self._broadcast(self.threshold, x.dim())
        floored = scaled + (torch.floor(scaled) - scaled).detach()
        return (floored / self.ann_levels).clamp(0.0, 1.0)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep leak in [0, 1] and threshold >= THRESHOLD_FLOOR (call after each optimizer step)."""
        stored = getattr(self, "parametrizations", {})  # a quantizer on leak/threshold: clamp what is stored
        (stored["leak"].original if "leak" in stored else self.leak).clamp_(0.0, 1.0)
        (stored["threshold"].original if "threshold" in stored else self.threshold).clamp_(min=self.THRESHOLD_FLOOR)

    def extra_repr(self) -> str:
        return (f"reset={self.reset}, surrogate={self.surrogate}, per_channel={self.per_channel}, "
                f"learn_leak={isinstance(self.leak, nn.Parameter)}, "
                f"learn_threshold={isinstance(self.threshold, nn.Parameter)}")

