"""tinySNN quantization (docs/methods/tiny.md): the ``quantize`` stage and ``snncompress quantize CHECKPOINT``.

Both run :func:`snncompress.compress.exploration.explore` over scheme x bits per group x rounding
on the validation split, keep the smallest model within ``max_memory_kb`` (KiB, 1024 bytes) and
``max_accuracy_drop``, and write the Pareto front of memory against validation accuracy
(``pareto.png``), the tolerance table and every candidate (``exploration.json``, ``exploration.md``).
When nothing fits they raise a one-line :class:`~snncompress.errors.UserError` and write nothing.
The chosen model keeps its quantizers, so its checkpoint stores integer codes bit-packed at their
widths plus scales, and the membrane-state quantizers in the metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from matplotlib.figure import Figure
from pydantic import Field, field_validator, model_validator

from ..compress.exploration import GROUPS, Candidate, Exploration, QuantSpace, explore
from ..errors import UserError
from ..io import save_figure, write_bytes, write_json
from ..metrics.ops import SpikeMeter
from ..training import QuantizeAfterStep, evaluate_accuracy
from .base import StageContext, StageResult, TrainOptions, fit, register_stage

Rounding = Literal["nearest", "half_up", "truncate", "stochastic"]
DEFAULT_BITS = {"weights": [8, 7, 6, 5, 4, 3], "neurons": [8, 6, 4], "state": [16, 12, 10, 8, 6]}


class QuantizeOptions(TrainOptions):
    """tinySNN design-space exploration: scheme x bits per group x rounding, smallest model within the limits."""

    needs = "snn"

    kind: Literal["quantize"] = "quantize"
    bits: dict[Literal["weights", "neurons", "state"], list[int]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_BITS.items()},
        description="groups to quantize and their candidate bit widths (weights; neurons = thresholds and "
                    "leaks; state = membrane potential), each in [2, 16]")
    roundings: list[Rounding] = Field(default_factory=lambda: ["nearest", "truncate", "stochastic"],
                                      description="rounding modes to explore")
    schemes: list[Literal["ptq", "itq"]] = Field(default_factory=lambda: ["ptq"],
                                                 description="ptq (always) and itq (train quantized candidates)")
    itq_mode: Literal["forward", "after_step"] = Field(
        "forward", description="itq: quantized forward with float shadow weights, or also snap the stored "
                               "weights to the grid after every update")
    itq_candidates: int = Field(1, ge=1, le=20, description="itq: how many PTQ failures to train")
    per_channel: bool = Field(False, description="weights: one scale per output channel")
    format: Literal["fixed", "uniform"] = Field("fixed", description="weights: fixed point Q(i.f) (power-of-two "
                                                "scale) or uniform symmetric (max|w| / q_max)")
    state_range: float = Field(2.0, gt=0, description="state saturates at +-(this x the layer's largest "
                                                      "threshold), rounded up to a power of two")
    max_memory_kb: float | None = Field(None, gt=0, description="memory limit in KiB (1024 bytes)")
    max_accuracy_drop: float = Field(0.01, ge=0, le=1, description="accepted drop below the float model's "
                                                                  "validation accuracy (0.01 = 1 point)")
    include_state: bool = Field(False, description="count the membrane state in the memory limit")
    val_batches: int | None = Field(None, ge=1, description="validation batches per evaluation (default: all)")
    max_candidates: int = Field(500, ge=1, description="cap on joint candidates")
    seed: int = Field(0, ge=0, description="seed of the stochastic rounding draws")
    lr: float = Field(1e-4, gt=0)

    def trains_by_gradient(self) -> bool:
        return "itq" in self.schemes

    @field_validator("bits")
    @classmethod
    def bit_range(cls, value: dict) -> dict:
        if not value:
            raise ValueError("bits must name at least one group")
        for group, widths in value.items():
            bad = [b for b in widths if not 2 <= b <= 16]
            if not widths or bad:
                raise ValueError(f"{group}: every bit width must be in [2, 16], got {widths}")
        return value

    @model_validator(mode="after")
    def nonempty(self):
        if not self.roundings or not self.schemes:
            raise ValueError("roundings and schemes must each list at least one")
        return self

    def space(self) -> QuantSpace:
        return QuantSpace({g: self.bits[g] for g in GROUPS if g in self.bits}, list(self.roundings),
                          sorted(set(self.schemes) | {"ptq"}, key=("ptq", "itq").index), self.per_channel,
                          self.format, self.state_range, self.seed, self.itq_candidates, self.max_candidates)

    @property
    def max_memory_bytes(self) -> int | None:
        return None if self.max_memory_kb is None else int(self.max_memory_kb * 1024)


def neurons_per_layer(model, loader, device) -> dict[str, int]:
    """Neurons per image of each LIF layer, from one batch of ``loader``."""
    images, _ = next(iter(loader))
    with torch.inference_mode(), SpikeMeter(model) as meter:
        model.eval()(images[:1].to(device))
    return meter.neurons()


def run_exploration(model, opts: QuantizeOptions, val_loader, device, train_fn=None, log=print) -> Exploration:
    """:func:`explore` with these options on ``val_loader`` (``val_batches`` of it); UserError when nothing fits."""
    model = model.to(device).eval()
    evaluate = lambda m: evaluate_accuracy(m, val_loader, device, opts.val_batches)  # noqa: E731
    result = explore(model, opts.space(), evaluate, max_accuracy_drop=opts.max_accuracy_drop,
                     max_memory_bytes=opts.max_memory_bytes, include_state=opts.include_state,
                     neurons=neurons_per_layer(model, val_loader, device), train=train_fn, log=log)
    if result.chosen is None:
        raise UserError(result.nothing_fits())
    return result


def itq_callbacks(opts: QuantizeOptions) -> list:
    return [QuantizeAfterStep()] if opts.itq_mode == "after_step" else []


# ----------------------------------------------------------------------------- reporting


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}"


def tolerance_markdown(result: Exploration) -> str:
    """Group x rounding rows, bit-width columns: validation accuracy (pass **bold**), '-' = pruned."""
    floor = result.baseline.accuracy - result.max_accuracy_drop
    lines = []
    for group, rows in result.tolerance().items():
        widths = result.space.bits[group]
        lines += [f"| {group} | " + " | ".join(f"{b} bits" for b in widths) + " |",
                  "|---|" + "---|" * len(widths)]
        for rounding, found in rows.items():
            cells = ["-" if found[b] is None else (f"**{found[b] * 100:.2f}**" if found[b] >= floor
                                                   else f"{found[b] * 100:.2f}") for b in widths]
            lines.append(f"| {rounding} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def exploration_markdown(result: Exploration, title: str, extra: str = "") -> str:
    inc = result.include_state
    base = result.baseline
    lines = [f"# {title}", "",
             f"Float model: validation accuracy {base.accuracy * 100:.2f}%, {_kib(base.bytes)} KiB stored "
             f"({_kib(base.bytes_with_state)} KiB with membrane state). Limits: accuracy drop <= "
             f"{result.max_accuracy_drop * 100:g} points (validation), memory <= "
             f"{'none' if result.max_memory_bytes is None else _kib(result.max_memory_bytes) + ' KiB'} "
             f"({'with' if inc else 'without'} state).", ""]
    if result.chosen is not None:
        c = result.chosen
        lines += [f"**Chosen: {c.candidate.label}**: validation {c.accuracy * 100:.2f}% "
                  f"({(c.accuracy - base.accuracy) * 100:+.2f} points), {_kib(c.bytes)} KiB "
                  f"({base.bytes / c.bytes:.2f}x smaller), {_kib(c.bytes_with_state)} KiB with state "
                  f"({base.bytes_with_state / c.bytes_with_state:.2f}x).", ""]
    if extra:
        lines += [extra, ""]
    lines += ["## Tolerance (validation accuracy %, sensitivity phase: one group quantized, the others float; "
              "bold = within the limit; - = not tried: a higher width already failed)", "",
              tolerance_markdown(result),
              "## Pareto front (memory vs validation accuracy)", "",
              "| candidate | val accuracy | KiB | KiB with state |", "|---|---|---|---|"]
    for e in result.front():
        lines.append(f"| {e.candidate.label} | {e.accuracy * 100:.2f}% | {_kib(e.bytes)} | {_kib(e.bytes_with_state)} |")
    lines += ["", f"Evaluated {len(result.evaluated)} candidates; skipped without evaluation: "
              + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in result.pruned.items()) + ".", "",
              "## Every candidate", "", "| phase | candidate | val accuracy | KiB | KiB with state | s |",
              "|---|---|---|---|---|---|"]
    for e in result.evaluated:
        lines.append(f"| {e.phase} | {e.candidate.label} | {e.accuracy * 100:.2f}% | {_kib(e.bytes)} | "
                     f"{_kib(e.bytes_with_state)} | {e.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def plot_pareto(result: Exploration, path: Path) -> str:
    inc = result.include_state
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    colors = {"sensitivity": "#9ecae1", "joint": "#1f77b4", "itq": "#2ca02c"}
    for phase, color in colors.items():
        pts = [e for e in result.evaluated if e.phase == phase]
        if pts:
            ax.scatter([e.memory(inc) / 1024 for e in pts], [e.accuracy * 100 for e in pts], s=14, color=color,
                       label=phase)
    front = result.front()
    ax.plot([e.memory(inc) / 1024 for e in front], [e.accuracy * 100 for e in front], "-", color="black", lw=1,
            label="Pareto front")
    b = result.baseline
    ax.scatter([b.memory(inc) / 1024], [b.accuracy * 100], marker="*", s=90, color="black", label="float32")
    ax.axhline((b.accuracy - result.max_accuracy_drop) * 100, color="grey", ls="--", lw=1, label="accuracy limit")
    if result.max_memory_bytes is not None:
        ax.axvline(result.max_memory_bytes / 1024, color="grey", ls=":", lw=1, label="memory limit")
    if result.chosen is not None:
        c = result.chosen
        ax.scatter([c.memory(inc) / 1024], [c.accuracy * 100], marker="s", s=60, facecolor="none",
                   edgecolor="#d62728", label=f"chosen: {c.candidate.label}")
    ax.set_xscale("log")
    ax.set_ylim(max(0.0, (b.accuracy - 5 * max(result.max_accuracy_drop, 0.01)) * 100), b.accuracy * 100 + 1)
    ax.set(xlabel=f"memory (KiB, {'with' if inc else 'without'} membrane state)", ylabel="validation accuracy (%)",
           title="tinySNN design space")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def exploration_record(result: Exploration) -> dict:
    c = result.chosen
    return {"baseline": result.baseline.as_dict(), "chosen": c.as_dict() if c else None,
            "include_state": result.include_state, "max_accuracy_drop": result.max_accuracy_drop,
            "max_memory_bytes": result.max_memory_bytes, "pruned": result.pruned,
            "front": [e.as_dict() for e in result.front()],
            "tolerance": {g: {r: {str(b): a for b, a in row.items()} for r, row in rows.items()}
                          for g, rows in result.tolerance().items()},
            "candidates": [e.as_dict() for e in result.evaluated]}


def chosen_metrics(result: Exploration) -> dict:
    """Footprint figures of the chosen model against the float model, counted from what is stored."""
    c, b = result.chosen, result.baseline
    return {"val_accuracy": c.accuracy, "float_val_accuracy": b.accuracy, "chosen": c.candidate.as_dict(),
            "footprint_bytes_chosen": c.bytes, "footprint_bytes_with_state": c.bytes_with_state,
            "float_footprint_bytes": b.bytes, "float_footprint_bytes_with_state": b.bytes_with_state,
            "footprint_ratio": b.bytes / c.bytes, "footprint_ratio_with_state": b.bytes_with_state / c.bytes_with_state,
            "evaluated": len(result.evaluated), "pruned": result.pruned}


# ----------------------------------------------------------------------------- the stage


@register_stage("quantize", QuantizeOptions)
def quantize(ctx: StageContext, opts: QuantizeOptions) -> StageResult:
    """tinySNN exploration of scheme x bits per group x rounding on the validation split; keeps the smallest model within the limits."""
    model = ctx.require_model("quantize")

    def train_fn(candidate_model, candidate: Candidate):
        log = f"itq_{'_'.join(f'{g}{b}' for g, b in candidate.bits)}_{candidate.rounding}.csv"
        fit(ctx, candidate_model, opts.train_config(ctx.seed), log_name=log, desc="itq",
            callbacks=itq_callbacks(opts))
        return candidate_model

    result = run_exploration(model, opts, ctx.val_loader, ctx.device, train_fn if "itq" in opts.schemes else None)
    plot = plot_pareto(result, ctx.stage_dir / "pareto.png")
    write_json(ctx.stage_dir / "exploration.json", exploration_record(result))
    write_bytes(ctx.stage_dir / "exploration.md", exploration_markdown(result, "quantize stage").encode())
    metrics = {**chosen_metrics(result), "plot": ctx.relative(ctx.stage_dir / plot),
               "include_state": opts.include_state}
    return StageResult(result.chosen_model.eval(), metrics)
