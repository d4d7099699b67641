"""The ``quant_sweep`` stage (STP, docs/methods/stp.md): post-training weight quantization over bit widths.

Uniform symmetric quantizers (:class:`~snncompress.compress.quantizers.UniformQuantizer`), one
scale per layer as in STP or, with ``per_channel``, one per output channel, are attached to every
conv/linear weight of a copy of the model at each bit width of ``bits``; the smallest width whose validation accuracy is within
``tolerance`` of the float model's is applied. The quantizers stay on the
output model, so the checkpoint stores each weight as bit-packed integer codes
plus its float32 scales (one, or one per output channel), which is what the footprint counts.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import ClassVar, Literal

from matplotlib.figure import Figure
from pydantic import Field, field_validator

from ..compress.quantizers import quantize_weights
from ..models import SpikingNetwork
from ..training import evaluate_accuracy
from .base import StageContext, StageOptions, StageResult, register_stage, save_selection_plot

DEFAULT_SWEEP_BITS = list(range(16, 1, -1))


class QuantSweepOptions(StageOptions):
    """Post-training weight quantization sweep (uniform, symmetric, per layer or per channel, round to nearest)."""

    needs = "model"
    #: added after runs were made: hashed only when changed (pipeline.fingerprint)
    HASHED_WHEN_CHANGED: ClassVar[frozenset[str]] = frozenset({"per_channel"})

    kind: Literal["quant_sweep"] = "quant_sweep"
    bits: list[int] = Field(default_factory=lambda: list(DEFAULT_SWEEP_BITS),
                            description="bit widths to try, each in [2, 16]")
    tolerance: float = Field(0.01, ge=0, le=1, description="accepted drop below the float model's validation accuracy (0.01 = 1 point)")
    max_batches: int | None = Field(None, ge=1, description="validation batches per evaluation (default: all)")
    apply: bool = Field(True, description="quantize the output model at the chosen bit width")
    rounding: Literal["nearest", "half_up", "truncate", "stochastic"] = Field(
        "nearest", description="rounding of weights to the grid (nearest: ties to even)")
    per_channel: bool = Field(False, description="one scale per output channel (float32 each, counted in the "
                                                 "footprint) instead of one per layer")

    @field_validator("bits")
    @classmethod
    def bit_range(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("bits must list at least one bit width")
        bad = [b for b in value if not 2 <= b <= 16]
        if bad:
            raise ValueError(f"every bit width must be in [2, 16], got {bad}")
        return sorted(set(value), reverse=True)


def sweep_accuracy(model: SpikingNetwork, bits: list[int], evaluate, rounding: str = "nearest",
                   per_channel: bool = False) -> dict[int, float]:
    """Validation accuracy (0-1) of a quantized copy of ``model`` at each bit width; ``model`` is untouched."""
    results = {}
    for b in bits:
        candidate = copy.deepcopy(model)
        quantize_weights(candidate, b, rounding, per_channel=per_channel)
        results[b] = float(evaluate(candidate))
        print(f"[quant_sweep] {b:2d} bits: accuracy {results[b]:.4f}", flush=True)
    return results


def smallest_within(results: dict[int, float], reference: float, tolerance: float) -> int | None:
    """Smallest bit width whose accuracy is >= ``reference - tolerance`` (None if none is)."""
    ok = [b for b, acc in results.items() if acc >= reference - tolerance]
    return min(ok) if ok else None


def plot_sweep(results: dict[int, float], reference: float, tolerance: float, chosen: int | None,
               path: Path) -> str:
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    bits = sorted(results)
    ax.plot(bits, [results[b] for b in bits], "o-", color="#1f77b4", label="quantized")
    ax.axhline(reference, color="black", lw=1, label="float32")
    ax.axhline(reference - tolerance, color="grey", ls="--", lw=1, label="float - tolerance")
    if chosen is not None:
        ax.plot([chosen], [results[chosen]], "s", color="#d62728", ms=9, label=f"chosen: {chosen} bits")
    return save_selection_plot(fig, ax, path, "weight bits", "post-training weight quantization")


@register_stage("quant_sweep", QuantSweepOptions)
def quant_sweep(ctx: StageContext, opts: QuantSweepOptions) -> StageResult:
    """Sweep weight bit widths on the validation split; apply the smallest within tolerance (stored as packed codes)."""
    model = ctx.require_model("quant_sweep")
    evaluate = lambda m: evaluate_accuracy(m, ctx.val_loader, ctx.device, opts.max_batches)  # noqa: E731
    reference = float(evaluate(model))
    results = sweep_accuracy(model, opts.bits, evaluate, opts.rounding, opts.per_channel)
    chosen = smallest_within(results, reference, opts.tolerance)
    plot = plot_sweep(results, reference, opts.tolerance, chosen, ctx.stage_dir / "quant_sweep.png")
    metrics = {"float_val_accuracy": reference, "sweep": {str(b): a for b, a in results.items()},
               "tolerance": opts.tolerance, "bits": chosen, "plot": ctx.relative(ctx.stage_dir / plot)}
    if chosen is None or not opts.apply:
        print(f"[quant_sweep] no bit width applied (chosen: {chosen})", flush=True)
        return StageResult(None, {**metrics, "val_accuracy": reference})
    final = copy.deepcopy(model)
    quantizers = quantize_weights(final, chosen, opts.rounding, per_channel=opts.per_channel)
    accuracy = results[chosen] if opts.max_batches is None else evaluate_accuracy(final, ctx.val_loader, ctx.device)
    print(f"[quant_sweep] applied {chosen} bits to {len(quantizers)} weight tensors", flush=True)
    return StageResult(final.eval(), {**metrics, "val_accuracy": accuracy})
