"""Quantizers that attach to a tensor of the model (weights, threshold, leak) as parametrizations.

A quantizer maps a float tensor ``w`` to the grid ``codes * scale``::

    r      = w / scale                        position on the grid (float)
    codes  = clamp(round_mode(r), -q_max, q_max)    signed integers of ``bits`` bits
    Q(w)   = codes * scale                    what the model computes with

with a straight-through gradient (``dQ/dw = 1``). Two ways to set ``scale``:

* :class:`UniformQuantizer` (STP's post-training sweep): symmetric, per
  tensor, ``scale = max|w| / q_max`` with ``q_max = 2^(bits-1) - 1`` (the code
  -2^(bits-1) is never used). The scale is set by :meth:`~UniformQuantizer.calibrate`
  (attach time) and, in training mode (quantization-aware training), from the
  current ``w`` at every forward pass.
* :class:`FixedPointQuantizer` (tinySNN's Q(i.f)): ``scale = 2^-f``, saturating
  at ``q_max = 2^(i+f) - 1`` (one sign bit, ``i`` integer and ``f`` fraction bits).

Rounding modes (:data:`ROUNDINGS`): ``nearest`` (ties to even), ``half_up``
(``floor(r + 1/2)``), ``truncate`` (``floor(r)``) and ``stochastic``
(``floor(r) + Bernoulli(r - floor(r))``, drawn in training mode only: in eval
mode a stored model must give the same output every time, so it rounds to
nearest). A value within :data:`GRID_TOLERANCE` of a grid point *is* that grid
point whatever the mode: quantization is idempotent (``Q(Q(w)) == Q(w)`` bit
for bit), which is what makes a reloaded checkpoint (``original = codes * scale``)
compute exactly what was saved.

:meth:`Quantizer.export` gives the integer codes and the scale; the checkpoint
stores those (codes bit-packed at ``bits``), nothing else.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .masks import attached, chain, detach, find, original, owner

ROUNDINGS = ("nearest", "half_up", "truncate", "stochastic")
#: Fraction of a grid step within which a value counts as on the grid (float error of ``codes * scale / scale``).
GRID_TOLERANCE = 1e-3
MIN_BITS, MAX_BITS = 2, 32


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized tensor exactly; backward: the gradient unchanged."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return quantized

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def round_codes(r: torch.Tensor, rounding: str, stochastic: bool,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer-valued float tensor from grid positions ``r`` under ``rounding`` (see the module docstring);
    ``generator`` seeds the stochastic draws (default: torch's global generator)."""
    nearest = torch.round(r)
    if rounding == "nearest":
        return nearest
    if rounding == "half_up":
        rounded = torch.floor(r + 0.5)
    elif rounding == "truncate":
        rounded = torch.floor(r)
    elif rounding == "stochastic":
        low = torch.floor(r)
        rounded = low + torch.bernoulli(r - low, generator=generator) if stochastic else nearest
    else:
        raise ValueError(f"unknown rounding {rounding!r}; choose one of {ROUNDINGS}")
    return torch.where((r - nearest).abs() <= GRID_TOLERANCE, nearest, rounded)


class Quantizer(nn.Module):
    """Base: a signed ``bits``-bit code with a ``scale`` buffer (float32, 0-dim; ``[channels]`` per channel,
    channel = dimension 0 of the tensor); see the module docstring."""

    kind = "quantizer"

    def __init__(self, bits: int, rounding: str = "nearest", channels: int | None = None):
        super().__init__()
        if not MIN_BITS <= int(bits) <= MAX_BITS:
            raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        if channels is not None and int(channels) < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.bits, self.rounding = int(bits), rounding
        self.channels = None if channels is None else int(channels)
        self.register_buffer("scale", torch.ones(()) if channels is None else torch.ones(int(channels)))
        self.generator: torch.Generator | None = None  # seeds stochastic rounding when set

    def scale_for(self, w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The scale broadcast against ``w``: per channel ``[C, 1, ...]`` for a tensor ``[C, ...]``, or
        repeated per value for the same tensor flattened row-major (as the checkpoint stores it)."""
        scale = self.scale.to(w.device, dtype or w.dtype)
        if self.channels is None:
            return scale
        if w.dim() >= 1 and w.shape[0] == self.channels:
            return scale.view(-1, *([1] * (w.dim() - 1)))
        if w.dim() == 1 and w.numel() % self.channels == 0:
            return scale.repeat_interleave(w.numel() // self.channels)
        raise ValueError(f"a per-channel scale of {self.channels} channels does not fit a tensor of shape "
                         f"{tuple(w.shape)}")

    @property
    def q_max(self) -> int:
        """Largest code magnitude."""
        return 2 ** (self.bits - 1) - 1

    def update_scale(self, w: torch.Tensor) -> None:
        """Set ``scale`` from ``w`` where the scheme does (training mode and calibration)."""

    @torch.no_grad()
    def codes(self, w: torch.Tensor, stochastic: bool | None = None) -> torch.Tensor:
        """Integer codes of ``w`` as a float tensor of ``w``'s shape, in ``[-q_max, q_max]``.

        ``stochastic`` (default: in training mode) draws stochastic rounding; otherwise it rounds to nearest.
        """
        r = w.detach().to(torch.float64) / self.scale_for(w, torch.float64)
        stochastic = self.training if stochastic is None else stochastic
        return torch.clamp(round_codes(r, self.rounding, stochastic, self.generator), -self.q_max, self.q_max)

    def dequantize(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``codes * scale`` in ``dtype`` (the same operation in the forward pass and on reload)."""
        return codes.to(dtype) * self.scale_for(codes, dtype)

    def quantize(self, w: torch.Tensor, stochastic: bool | None = None) -> torch.Tensor:
        """``Q(w)``: the codes of ``w`` times the scale, in ``w``'s dtype (no gradient)."""
        return self.dequantize(self.codes(w, stochastic), w.dtype)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update_scale(w)
        return _StraightThrough.apply(w, self.quantize(w))

    def export(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, scale)``: int32 codes of ``w``'s shape (as the eval-mode forward computes them) and
        the float32 0-dim scale."""
        codes = self.codes(w, stochastic=False)
        return codes.to(torch.int32).cpu(), self.scale.detach().to(torch.float32).cpu().clone()

    def config(self) -> dict:
        """JSON-able description from which :func:`quantizer_from_config` rebuilds this quantizer."""
        config = {"type": type(self).__name__, "bits": self.bits, "rounding": self.rounding}
        return config if self.channels is None else {**config, "channels": self.channels}

    def extra_repr(self) -> str:
        scale = f"{float(self.scale):.4g}" if self.channels is None else f"[{self.channels} channels]"
        return f"bits={self.bits}, rounding={self.rounding}, scale={scale}"


def _peak(w: torch.Tensor, channels: int | None) -> torch.Tensor:
    """max|w| (0-dim), or per channel ``[C]`` over every dimension but the first."""
    w = w.detach().abs()
    if channels is None:
        return w.max() if w.numel() else torch.zeros((), device=w.device)
    return w.reshape(channels, -1).amax(1)


class UniformQuantizer(Quantizer):
    """Symmetric uniform quantizer, ``scale = max|w| / q_max`` per tensor or per channel (1 where all zero)."""

    @torch.no_grad()
    def update_scale(self, w: torch.Tensor) -> None:
        peak = _peak(w, self.channels).to(self.scale.device, torch.float64)
        self.scale.copy_(torch.where(peak > 0, peak / self.q_max, torch.ones_like(peak)))


class FixedPointQuantizer(Quantizer):
    """Fixed-point Q(i.f): ``scale = 2^-frac_bits``, ``bits = 1 + int_bits + frac_bits``, saturating."""

    def __init__(self, int_bits: int, frac_bits: int, rounding: str = "nearest"):
        super().__init__(1 + int(int_bits) + int(frac_bits), rounding)
        self.int_bits, self.frac_bits = int(int_bits), int(frac_bits)
        self.scale.fill_(2.0 ** -self.frac_bits)

    def config(self) -> dict:
        return {"type": type(self).__name__, "int_bits": self.int_bits, "frac_bits": self.frac_bits,
                "rounding": self.rounding}


class PowerOfTwoQuantizer(Quantizer):
    """Fixed-point Q(i.f) whose split follows the range, per tensor or per channel (tinySNN's fixed point with
    the integer bits a group needs): ``scale = 2^-f``, the finest power of two with ``max|w| <= q_max * scale``
    (``i = bits - 1 - f``, may be negative), saturating; set at calibration and, in training mode, from the
    current ``w`` (like :class:`UniformQuantizer`, whose scale it rounds up to a power of two)."""

    @torch.no_grad()
    def update_scale(self, w: torch.Tensor) -> None:
        peak = _peak(w, self.channels).to(self.scale.device, torch.float64)
        exponent = torch.ceil(torch.log2(torch.where(peak > 0, peak / self.q_max, torch.ones_like(peak))))
        self.scale.copy_(torch.exp2(exponent))

    @property
    def frac_bits(self):
        """``f`` (an int per tensor, a list per channel)."""
        f = (-torch.log2(self.scale)).round().to(torch.int64)
        return int(f) if self.channels is None else f.tolist()


QUANTIZER_TYPES = {cls.__name__: cls for cls in (UniformQuantizer, FixedPointQuantizer, PowerOfTwoQuantizer)}


def quantizer_from_config(config: dict) -> Quantizer:
    """Rebuild a quantizer from :meth:`Quantizer.config` (the scale comes from the checkpoint)."""
    options = dict(config)
    cls = QUANTIZER_TYPES.get(options.pop("type", None))
    if cls is None:
        raise ValueError(f"unknown quantizer {config.get('type')!r}; known: {sorted(QUANTIZER_TYPES)}")
    return cls(**options)


# ----------------------------------------------------------------------------- attaching


def attach_quantizer(model: nn.Module, name: str, quantizer: Quantizer, calibrate: bool = True) -> Quantizer:
    """Attach ``quantizer`` to tensor ``name`` of ``model`` (after any mask); replaces an earlier one.

    With ``calibrate`` the quantizer's scale is set from the tensor as the
    forward pass sees it (masked); returns the attached quantizer.
    """
    remove_quantizer(model, name)
    module, tensor = owner(model, name)
    stored = original(module, tensor)
    quantizer.to(stored.device)
    if calibrate:
        with torch.no_grad():
            quantizer.update_scale(getattr(module, tensor) if chain(module, tensor) else stored)
    parametrize.register_parametrization(module, tensor, quantizer, unsafe=True)
    return quantizer


def get_quantizer(model: nn.Module, name: str) -> Quantizer | None:
    """The quantizer on tensor ``name``, or None."""
    return find(*owner(model, name), Quantizer)


def get_quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """``{name: quantizer}`` of every quantized tensor of ``model``, in module order."""
    return attached(model, Quantizer)


def remove_quantizer(model: nn.Module, name: str, burn_in: bool = False) -> None:
    """Drop the quantizer of ``name`` (if any); with ``burn_in`` the stored tensor becomes ``Q(original)``."""
    module, tensor = owner(model, name)
    quantizer = find(module, tensor, Quantizer)
    if quantizer is None:
        return
    if burn_in:
        with torch.no_grad():
            original(module, tensor).copy_(quantizer.quantize(original(module, tensor)))
    detach(module, tensor, quantizer)


def weight_names(model: nn.Module) -> list[str]:
    """Names of every conv / linear ``weight`` of ``model``, in module order."""
    return [f"{name}.weight" if name else "weight" for name, m in model.named_modules()
            if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)]


@torch.no_grad()
def snap_to_grid_(model: nn.Module, stochastic: bool = True, generator: torch.Generator | None = None) -> None:
    """Replace every quantized tensor's stored values by their quantized values (on the grid).

    With ``stochastic`` a ``stochastic``-rounding quantizer draws its rounding here, once; afterwards
    the forward pass finds the values on the grid and computes them exactly (tinySNN's "quantize
    after every update" calls this after each optimizer step). ``generator`` seeds those draws.
    """
    for name, quantizer in get_quantizers(model).items():
        stored = original(*owner(model, name))
        kept, quantizer.generator = quantizer.generator, generator or quantizer.generator
        try:
            stored.copy_(quantizer.quantize(stored, stochastic))
        finally:
            quantizer.generator = kept


def scale_channels(weight: torch.Tensor, per_channel: bool) -> int | None:
    """How many scales a quantizer of ``weight`` holds: one per output channel (dimension 0) with ``per_channel``
    for a tensor of two or more dimensions, else None (one per tensor)."""
    return weight.shape[0] if per_channel and weight.dim() > 1 else None


def quantize_weights(model: nn.Module, bits: int, rounding: str = "nearest",
                     names: list[str] | None = None, per_channel: bool = False) -> dict[str, Quantizer]:
    """Attach a calibrated :class:`UniformQuantizer` of ``bits`` bits to every conv/linear weight (or ``names``),
    with one scale per tensor or, ``per_channel``, one per output channel (dimension 0 of the weight).

    Stochastic rounding is drawn once here (:func:`snap_to_grid_`), so the quantized model is fixed.
    """
    def quantizer(name: str) -> UniformQuantizer:
        return UniformQuantizer(bits, rounding, scale_channels(original(*owner(model, name)), per_channel))

    quantizers = {name: attach_quantizer(model, name, quantizer(name))
                  for name in (names if names is not None else weight_names(model))}
    if rounding == "stochastic":
        snap_to_grid_(model)
    return quantizers
