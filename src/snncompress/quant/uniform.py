"""Uniform symmetric per-tensor weight quantization (STP's post-training sweep, SPEC §2).

For a tensor ``w`` and a bit width ``b`` (2..32)::

    q_max = 2^(b-1) - 1                      largest integer magnitude (the code is symmetric:
                                             -q_max..q_max, the value -2^(b-1) is never used)
    scale = max|w| / q_max                   one float32 per tensor ("per layer")
    ints  = clamp(round(w / scale), -q_max, q_max)
    w_q   = ints * scale                     what the quantized model computes with

``round`` is round-to-nearest (ties to even, so the rounding is symmetric
around 0). An all-zero tensor gets ``scale = 1`` and all-zero integers.
:func:`dequantize` is the exact operation :func:`snncompress.checkpoint.load_checkpoint`
applies (``ints.to(float32) * scale``), so a model whose weights were set with
it reloads bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoint import int_dtype_for

MIN_BITS, MAX_BITS = 2, 32


def max_int(bits: int) -> int:
    """Largest integer magnitude of the symmetric ``bits``-bit code: ``2^(bits-1) - 1``."""
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    return 2 ** (int(bits) - 1) - 1


@torch.no_grad()
def quantize_symmetric(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` (any shape, float) to ``bits``-bit symmetric integers with one scale.

    Returns:
        ``(ints, scale)``: ``ints`` has ``w``'s shape and the smallest signed
        integer dtype holding ``bits`` bits (int8 / int16 / int32), values in
        ``[-(2^(bits-1)-1), 2^(bits-1)-1]``; ``scale`` is a float32 0-dim tensor
        in the units of ``w`` per integer step.
    """
    q_max = max_int(bits)
    w64 = w.detach().to(torch.float64)  # float64 holds every integer of a 32-bit code exactly
    peak = float(w64.abs().max()) if w64.numel() else 0.0
    scale = torch.tensor(peak / q_max if peak > 0 else 1.0, dtype=torch.float32)
    ints = torch.clamp(torch.round(w64 / scale.to(w64.device, torch.float64)), -q_max, q_max)
    return ints.to(int_dtype_for(bits)), scale


def dequantize(ints: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 weights ``ints * scale`` (same op as checkpoint loading, so results match bit for bit)."""
    return ints.to(torch.float32) * scale.to(ints.device)


def quantizable_weights(model: nn.Module) -> list[str]:
    """Names of every conv / linear ``weight`` parameter of ``model``, in module order."""
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
            names.append(f"{module_name}.weight" if module_name else "weight")
    return names


@torch.no_grad()
def quantize_weights_(model: nn.Module, bits: int, names: list[str] | None = None) -> dict[str, dict]:
    """Quantize ``model``'s conv/linear weights in place (``w <- ints * scale``).

    Args:
        bits: bit width of every quantized tensor.
        names: parameter names to quantize; default :func:`quantizable_weights`.

    Returns:
        the checkpoint's quant spec ``{param_name: {"bits", "int", "scale"}}``
        (integers on CPU), so that ``save_checkpoint(..., quant=...)`` stores
        integers plus one scale per layer.
    """
    params = dict(model.named_parameters())
    quant = {}
    for name in names if names is not None else quantizable_weights(model):
        weight = params[name]
        ints, scale = quantize_symmetric(weight, bits)
        weight.copy_(dequantize(ints, scale).to(weight.device, weight.dtype))
        quant[name] = {"bits": int(bits), "int": ints.cpu(), "scale": scale}
    return quant
