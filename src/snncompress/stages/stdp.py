"""tinySNN's own network (docs/methods/tiny.md): the Diehl & Cook STDP network's stages.

``train_stdp``  a fresh ``arch: diehl_cook`` network (the recipe's ``model``; ``neurons`` may
                override its size) learns by STDP from ``samples`` training images
                (:mod:`snncompress.training.stdp`), optionally quantized while it learns
                (``weight_bits`` + ``rounding``); then each neuron is labelled from ``label_samples``
                training images and the validation split is read for ``val_accuracy``.
``select_stdp`` model selection: one network per size in ``sizes`` trained as ``train_stdp`` does,
                each explored by tinySNN's quantization search (:func:`~snncompress.compress.
                exploration.explore`, PTQ, validation split); the memory / validation-accuracy
                Pareto front over every size and candidate, and the pick: the most accurate
                candidate within ``max_memory_kb``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Literal

import torch
from matplotlib.figure import Figure
from pydantic import Field

from ..compress.exploration import Candidate, Evaluated, QuantSpace, explore, pareto_front, quantize_model
from ..compress.masks import original
from ..errors import UserError
from ..io import save_figure, write_bytes, write_json
from ..models import build_model
from ..models.stdp import ARCH
from ..training import evaluate_accuracy, seed_everything
from ..training.stdp import STDPConfig, assign_labels, train_stdp
from .base import Chain, StageContext, StageOptions, StageResult, register_stage

Rounding = Literal["nearest", "half_up", "truncate", "stochastic"]


class STDPOptions(StageOptions):
    """Unsupervised STDP learning of a Diehl & Cook network (defaults: BindsNET's, one sample at a time)."""

    produces = "snn"

    kind: Literal["train_stdp"] = "train_stdp"
    neurons: int | None = Field(None, ge=1, le=100_000, description="excitatory neurons (default: model.options)")
    inhibition: Literal["layer", "direct"] | None = Field(
        None, description="layer (Diehl & Cook) or direct (FSpiNN); default: model.options")
    samples: int = Field(60_000, ge=1, description="training images presented (the split is cycled)")
    samples_in_flight: int = Field(1, ge=1, le=4096, description="images presented at once with shared weights")
    update_every: int = Field(0, ge=0, description="steps between weight updates; 0 = once per sample")
    nu_pre: float = Field(1e-4, ge=0, description="depression rate (pre spike x post trace)")
    nu_post: float = Field(1e-2, ge=0, description="potentiation rate (post spike x pre trace)")
    norm: float = Field(78.4, gt=0, description="each neuron's input weights sum to this after every sample")
    theta_plus: float = Field(0.05, ge=0, description="threshold rise per spike (mV)")
    tau_theta_ms: float = Field(1e7, gt=0)
    tau_trace_ms: float = Field(20.0, gt=0)
    adaptive_potentiation: bool = Field(False, description="FSpiNN-style: weakly driven samples potentiate more")
    target_spikes: float = Field(5.0, gt=0)
    k_max: float = Field(4.0, ge=1)
    min_spikes: int = Field(0, ge=0, description="Diehl & Cook: re-present samples with fewer spikes at a higher rate")
    rate_step_hz: float = Field(32.0, ge=0)
    weight_bits: int | None = Field(None, ge=2, le=16, description="quantized learning: weights on a fixed-point "
                                                                     "grid of this many bits")
    rounding: Rounding = Field("stochastic", description="quantized learning: rounding of every update")
    label_samples: int = Field(10_000, ge=10, description="training images that label the neurons")
    validate_every: int | None = Field(
        None, ge=1, description="every this many samples: label, read the validation split, and keep the network "
                                "(weights, thresholds, labels) with the best validation accuracy")
    val_batches: int | None = Field(None, ge=1, description="validation batches per check (default: all)")

    def check(self, chain: Chain) -> None:
        if chain.arch is not None and chain.arch != ARCH:
            raise ValueError(f"kind: train_stdp trains the {ARCH} network; set model.arch: {ARCH}")
        if "rounding" in self.model_fields_set and self.weight_bits is None:
            raise ValueError("rounding: only used with weight_bits (quantized learning)")

    def config(self, seed: int) -> STDPConfig:
        names = set(STDPConfig.__dataclass_fields__) & set(type(self).model_fields)
        return STDPConfig(**{n: getattr(self, n) for n in names}, seed=seed)


def new_network(ctx: StageContext, neurons: int | None, inhibition: str | None = None):
    """A fresh Diehl & Cook network from the recipe's model section (``neurons``, ``inhibition`` override it)."""
    cfg = ctx.recipe.model
    if cfg.arch != ARCH:
        raise UserError(f"train_stdp needs model.arch: {ARCH}, got {cfg.arch!r}")
    seed_everything(ctx.seed)
    options = {**cfg.options, **({"neurons": neurons} if neurons else {}),
               **({"inhibition": inhibition} if inhibition else {})}
    model = build_model(ARCH, ctx.info.num_classes, ctx.info.in_shape, cfg.timesteps, **options)
    return model.set_input_normalisation(ctx.info.mean, ctx.info.std).to(ctx.device)


def learn(ctx: StageContext, opts: STDPOptions, neurons: int | None = None, log=print):
    """Train and label one network; returns ``(model, metrics)`` with validation accuracy."""
    model = new_network(ctx, neurons or opts.neurons, opts.inhibition)
    config = opts.config(ctx.seed)
    checks = ValidationChecks(ctx, opts, model, log)
    stats = train_stdp(model, ctx.train_loader, config, device=ctx.device, log=log,
                       check_every=opts.validate_every, check=checks if opts.validate_every else None)
    if opts.validate_every:
        labels = checks.restore_best()
    else:
        labels = assign_labels(model, ctx.train_loader, opts.label_samples, device=ctx.device)
    val = evaluate_accuracy(model, ctx.val_loader, ctx.device)
    metrics = {"val_accuracy": val, "neurons": model.neurons, "samples": stats.samples,
               "validation_checks": checks.history, "kept_after_samples": checks.best_samples,
               "presentations": stats.presentations, "train_seconds": stats.seconds,
               "samples_per_second": stats.samples / max(stats.seconds, 1e-9),
               "spikes_per_presentation": stats.excitatory_spikes / max(stats.presentations, 1),
               "weight_updates": stats.weight_updates, "threads": torch.get_num_threads(),
               "device": str(ctx.device), **labels, "stdp": asdict(config),
               "inhibition": model.spec["inhibition"]}
    log(f"[train_stdp] {model.neurons} neurons, {stats.samples} samples in {stats.seconds:.0f} s "
        f"({metrics['samples_per_second']:.1f}/s); validation accuracy {val:.4f}")
    return model, metrics


class ValidationChecks:
    """Called during learning: label the neurons, read the validation split, keep the best network so far."""

    def __init__(self, ctx: StageContext, opts: STDPOptions, model, log):
        self.ctx, self.opts, self.model, self.log = ctx, opts, model, log
        self.history: list[dict] = []
        self.best: tuple[float, dict, dict] | None = None
        self.best_samples: int | None = None

    def __call__(self, samples: int) -> None:
        ctx, model = self.ctx, self.model
        labels = assign_labels(model, ctx.train_loader, self.opts.label_samples, device=ctx.device)
        val = evaluate_accuracy(model, ctx.val_loader, ctx.device, self.opts.val_batches)
        self.history.append({"samples": samples, "val_accuracy": val})
        self.log(f"[train_stdp] after {samples} samples: validation accuracy {val:.4f}")
        if self.best is None or val > self.best[0]:
            kept = {k: v.detach().clone() for k, v in self._stored().items()}
            self.best, self.best_samples = (val, kept, labels), samples

    def _stored(self) -> dict[str, torch.Tensor]:
        """What the checks keep: the tensors the network stores (quantizer or not: the stored original)."""
        m = self.model
        return {"weight": original(m.synapses, "weight"), "threshold": original(m.excitatory, "threshold"),
                "leak": original(m.excitatory, "leak"), "labels": m.labels}

    def restore_best(self) -> dict:
        """Load the best network found into the model; returns its labelling figures."""
        _, kept, labels = self.best
        with torch.no_grad():
            for name, tensor in self._stored().items():
                tensor.copy_(kept[name])
        return labels


@register_stage("train_stdp", STDPOptions)
def train_stdp_stage(ctx: StageContext, opts: STDPOptions) -> StageResult:
    """Unsupervised STDP learning of a Diehl & Cook network, neurons labelled by their strongest class."""
    model, metrics = learn(ctx, opts)
    return StageResult(model.eval(), metrics)


# ----------------------------------------------------------------------------- model selection


class SelectSTDPOptions(STDPOptions):
    """Sizes x quantization: the Pareto front of memory against validation accuracy, the pick under a memory limit."""

    kind: Literal["select_stdp"] = "select_stdp"
    sizes: list[int] = Field(default_factory=lambda: [100, 400, 900], min_length=1,
                             description="excitatory neurons of each candidate network")
    bits: dict[Literal["weights", "neurons", "state"], list[int]] = Field(
        default_factory=lambda: {"weights": [8, 6, 5, 4, 3, 2], "neurons": [8, 6, 4]},
        description="tinySNN's groups and bit widths searched for every size (weights; neurons = thresholds)")
    roundings: list[Rounding] = Field(default_factory=lambda: ["nearest", "truncate", "stochastic"], min_length=1)
    max_accuracy_drop: float = Field(0.01, ge=0, le=1, description="per size: accepted drop below its float "
                                                                    "validation accuracy")
    max_memory_kb: float | None = Field(None, gt=0, description="memory limit of the pick (KiB)")
    val_batches: int | None = Field(None, ge=1, description="validation batches per candidate (default: all)")

    def check(self, chain: Chain) -> None:
        super().check(chain)
        if self.neurons is not None:
            raise ValueError("neurons: select_stdp trains every size in sizes; drop neurons")


def _point(size: int, e: Evaluated) -> dict:
    return {**e.as_dict(), "neurons": size, "label": f"{size} neurons, {e.candidate.label}"}


def plot_selection(points: list[dict], front: list[dict], chosen: dict | None, limit: int | None, path) -> str:
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    for size in sorted({p["neurons"] for p in points}):
        mine = [p for p in points if p["neurons"] == size]
        ax.scatter([p["bytes"] / 1024 for p in mine], [p["val_accuracy"] * 100 for p in mine], s=14,
                   label=f"{size} neurons")
    ax.plot([p["bytes"] / 1024 for p in front], [p["val_accuracy"] * 100 for p in front], "-", color="black", lw=1,
            label="Pareto front")
    if limit is not None:
        ax.axvline(limit / 1024, color="grey", ls=":", lw=1, label="memory limit")
    if chosen is not None:
        ax.scatter([chosen["bytes"] / 1024], [chosen["val_accuracy"] * 100], marker="s", s=60, facecolor="none",
                   edgecolor="#d62728", label=f"pick: {chosen['label']}")
    ax.set_xscale("log")
    accuracies = [p["val_accuracy"] * 100 for p in points]
    ax.set_ylim(max(0.0, min(accuracies) - 2), max(accuracies) + 1)
    ax.set(xlabel="memory (KiB, stored)", ylabel="validation accuracy (%)", title="Diehl & Cook: size x quantization")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def selection_markdown(points: list[dict], front: list[dict], chosen: dict | None, opts: SelectSTDPOptions,
                       trained: dict) -> str:
    lines = ["# select_stdp: network size x quantization", "",
             f"Memory limit: {opts.max_memory_kb if opts.max_memory_kb is not None else 'none'} KiB; per size, "
             f"candidates within {opts.max_accuracy_drop * 100:g} points of its float validation accuracy.", "",
             "| neurons | float val accuracy | train s | samples/s |", "|---|---|---|---|"]
    for size, m in trained.items():
        lines.append(f"| {size} | {m['val_accuracy'] * 100:.2f}% | {m['train_seconds']:.0f} | "
                     f"{m['samples_per_second']:.1f} |")
    lines += ["", "## Pareto front (memory vs validation accuracy)", "", "| candidate | val accuracy | KiB |",
              "|---|---|---|"]
    lines += [f"| {p['label']} | {p['val_accuracy'] * 100:.2f}% | {p['bytes'] / 1024:.1f} |" for p in front]
    if chosen is not None:
        lines += ["", f"**Pick: {chosen['label']}**: validation {chosen['val_accuracy'] * 100:.2f}%, "
                      f"{chosen['bytes'] / 1024:.1f} KiB."]
    return "\n".join(lines) + "\n"


@register_stage("select_stdp", SelectSTDPOptions)
def select_stdp(ctx: StageContext, opts: SelectSTDPOptions) -> StageResult:
    """Train every size, explore its quantization (PTQ), keep the most accurate model under the memory limit."""
    limit = None if opts.max_memory_kb is None else int(opts.max_memory_kb * 1024)
    points, trained, models = [], {}, {}
    space = QuantSpace(dict(opts.bits), list(opts.roundings), ["ptq"], seed=ctx.seed)
    for size in opts.sizes:
        model, metrics = learn(ctx, opts, neurons=size)
        trained[size] = metrics
        evaluate = lambda m: evaluate_accuracy(m, ctx.val_loader, ctx.device, opts.val_batches)  # noqa: E731
        result = explore(model, space, evaluate, max_accuracy_drop=opts.max_accuracy_drop,
                         max_memory_bytes=None)
        points += [_point(size, e) for e in [result.baseline, *result.evaluated]]
        models[size] = model
    front = pareto_front(points, lambda p: p["bytes"], lambda p: p["val_accuracy"])
    fitting = [p for p in points if (limit is None or p["bytes"] <= limit) and (p["passed"] or p["phase"] == "baseline")]
    if not fitting:
        smallest = min(points, key=lambda p: p["bytes"])
        raise UserError(f"select_stdp: nothing fits {opts.max_memory_kb} KiB; the smallest candidate "
                        f"({smallest['label']}) needs {smallest['bytes'] / 1024:.1f} KiB")
    chosen = max(fitting, key=lambda p: (p["val_accuracy"], -p["bytes"]))
    model = chosen_model(models, chosen, space)
    plot = plot_selection(points, front, chosen, limit, ctx.stage_dir / "pareto.png")
    record = {"points": points, "front": front, "chosen": chosen, "trained": trained,
              "max_memory_bytes": limit}
    write_json(ctx.stage_dir / "selection.json", record)
    write_bytes(ctx.stage_dir / "selection.md", selection_markdown(points, front, chosen, opts, trained).encode())
    metrics = {"val_accuracy": chosen["val_accuracy"], "chosen": chosen, "front": front,
               "trained": {str(k): {kk: v[kk] for kk in ("val_accuracy", "train_seconds", "samples_per_second",
                                                         "samples")} for k, v in trained.items()},
               "footprint_bytes_chosen": chosen["bytes"], "plot": ctx.relative(ctx.stage_dir / plot)}
    return StageResult(model.eval(), metrics)


def chosen_model(models: dict, chosen: dict, space: QuantSpace):
    """The float network of the chosen size with the chosen candidate's quantizers attached."""
    model = models[chosen["neurons"]]
    candidate = Candidate.of(chosen["bits"], chosen["rounding"])
    return model if not candidate.bits else quantize_model(model, candidate, space)
