"""STP stages (docs/methods/stp.md): ``prune_pca`` and ``temporal`` (``quant_sweep`` is in :mod:`.quant`).

* ``prune_pca``: PCA significance of every spiking layer -> a physically
  narrower network with ``k_l`` channels per layer (coupled ResNet channels
  share one width, the max over the group), trained either from scratch
  through the hybrid pipeline (``mode: scratch``, the paper: ANN, threshold
  calibration, SNN) or by inheriting the most significant channels' weights
  and fine-tuning the SNN (``mode: finetune``, optionally distilling from the
  unpruned model).
* ``temporal``: lower T along a decreasing schedule, fine-tuning at each step,
  until accuracy falls more than ``tolerance`` below the stage's start.

Both choose on the validation split; each writes a PNG plot and a JSON file of its curves into its folder.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import ClassVar, Literal

from matplotlib.figure import Figure
from pydantic import Field, field_validator, model_validator
from torch import nn

from ..compress.pca import LayerPCA, pca_significance
from ..compress.structure import (channel_groups, group_widths, narrow_fresh, narrow_model, projection_conflicts,
                                  select_channels)
from ..compress.temporal import check_schedule, default_schedule, prune_timesteps, trials_table
from ..convert import calibrate_thresholds
from ..data import calibration_batch
from ..errors import UserError
from ..io import save_figure, write_json
from ..models import ChannelGroup, SpikingNetwork
from ..training import evaluate_accuracy, kept_row
from .base import (Chain, DistillOptions, StageContext, StageResult, TrainOptions, fit, register_stage,
                   save_selection_plot)


# ----------------------------------------------------------------------------- prune_pca


class PrunePCAOptions(DistillOptions):
    """PCA channel pruning; ``epochs``/``lr``/... train the narrow SNN (finetune: fine-tuning, scratch: BPTT).

    ``distill`` (finetune only): the narrow model learns from the unpruned one as well as from the labels.
    """

    needs, produces = "snn", "snn"
    #: distill came after runs existed: hashed only when set, so their prune_pca folders stay finished
    HASHED_WHEN_CHANGED: ClassVar[frozenset[str]] = DistillOptions.HASHED_WHEN_CHANGED | {"distill",
                                                                                          "distill_temperature"}
    #: options each mode leaves unused (calibration: also finetune without recalibrate)
    SCRATCH_ONLY: ClassVar[set[str]] = {"ann_epochs", "ann_lr", "ann_weight_decay"}
    CALIBRATION: ClassVar[set[str]] = {"calib_images", "calib_timesteps", "calib_percentile", "calib_scale"}

    kind: Literal["prune_pca"] = "prune_pca"
    theta: float = Field(0.99, gt=0, le=1, description="cumulative explained variance kept per layer")
    accumulate: Literal["mean", "sum"] = Field("mean", description="membrane potential over t: mean or sum")
    pca_images: int = Field(256, ge=1, description="training images the PCA is computed on")
    chunk: int = Field(64, ge=1, description="images per forward pass while recording (memory)")
    min_channels: int = Field(1, ge=1, description="lower bound on every layer's width")
    prune_classifier: bool = Field(True, description="also narrow the hidden linear layers")
    mode: Literal["scratch", "finetune"] = "scratch"
    epochs: int = Field(1, ge=0, description="SNN epochs of the narrow model (0: none)")
    lr: float = Field(1e-4, gt=0)
    ann_epochs: int = Field(1, ge=1, description="scratch: ANN epochs of the narrow model")
    ann_lr: float = Field(1e-3, gt=0, description="scratch: ANN learning rate")
    ann_weight_decay: float = Field(5e-4, ge=0, description="scratch: ANN weight decay")
    calib_images: int = Field(512, ge=1, description="scratch: threshold calibration images")
    calib_timesteps: int = Field(100, ge=1, description="scratch: timesteps simulated in calibration")
    calib_percentile: float = Field(99.7, gt=0, le=100)
    calib_scale: float = Field(1.0, gt=0, description="scratch: factor on every calibrated threshold")
    recalibrate: bool = Field(False, description="finetune: recalibrate every threshold of the narrow model "
                                                 "(calib_* options) before fine-tuning")

    def needs_channel_surgery(self) -> bool:
        return True

    def check(self, chain: Chain) -> None:
        """An option the chosen mode does not use is an error (it would be silently ignored)."""
        super().check(chain)
        if self.mode == "scratch":
            unused = {"recalibrate", "distill", "distill_temperature"}
        else:
            unused = self.SCRATCH_ONLY | (set() if self.recalibrate else self.CALIBRATION)
        given = sorted(self.model_fields_set & unused)
        if given:
            hint = " without recalibrate: true" if given[0] in self.CALIBRATION else ""
            raise ValueError(f"{given[0]}: not used with mode: {self.mode}{hint}")


def layer_targets(model: SpikingNetwork, pca: dict[str, LayerPCA], opts: PrunePCAOptions,
                  groups: list[ChannelGroup]) -> dict[str, int]:
    """``k_l`` per LIF layer; the LIFs after linear layers (the classifier's) keep full width unless
    ``prune_classifier``."""
    modules = dict(model.named_modules())
    after_linear = {lif for g in groups if isinstance(modules[g.outputs[0]], nn.Linear) for lif in g.lifs}
    return {name: (p.k if opts.prune_classifier or name not in after_linear else p.channels)
            for name, p in pca.items()}


def recalibrate(ctx: StageContext, narrow: SpikingNetwork, opts: PrunePCAOptions) -> None:
    """Calibrate every threshold of the narrow SNN on ``calib_images`` training images (calib_* options)."""
    images = calibration_batch(ctx.train_loader, opts.calib_images).to(ctx.device)
    calibrate_thresholds(narrow, images, calib_timesteps=opts.calib_timesteps,
                         percentile=opts.calib_percentile, scale=opts.calib_scale, chunk=opts.chunk)


def train_from_scratch(ctx: StageContext, narrow: SpikingNetwork, opts: PrunePCAOptions) -> float:
    """The hybrid pipeline on the narrow network: ANN, threshold calibration, SNN; returns SNN val accuracy."""
    seed = ctx.seed
    ann_config = opts.train_config(seed, epochs=opts.ann_epochs, lr=opts.ann_lr,
                                   weight_decay=opts.ann_weight_decay)
    fit(ctx, narrow.set_spiking(False), ann_config, "ann_log.csv", "pca-ann")
    narrow.set_spiking(True)
    recalibrate(ctx, narrow, opts)
    if opts.epochs == 0:
        return evaluate_accuracy(narrow, ctx.val_loader, ctx.device)
    return kept_row(fit(ctx, narrow, opts.train_config(seed), "train_log.csv", "pca-snn"))["val_accuracy"]


def finetune_inherited(ctx: StageContext, narrow: SpikingNetwork, opts: PrunePCAOptions,
                       wide: SpikingNetwork) -> float:
    """Fine-tune the narrow SNN that inherited the kept channels' weights (distilling from ``wide``, the
    unpruned model, when ``distill`` > 0); returns its val accuracy."""
    if opts.epochs == 0:
        return evaluate_accuracy(narrow, ctx.val_loader, ctx.device)
    callbacks = opts.distillation(lambda: copy.deepcopy(wide))
    return kept_row(fit(ctx, narrow, opts.train_config(ctx.seed), "train_log.csv", "pca-finetune",
                        callbacks))["val_accuracy"]


def plot_variance(pca: dict[str, LayerPCA], theta: float, path: Path) -> str:
    """Cumulative explained variance vs components per layer (left) and k_l vs width (right)."""
    fig = Figure(figsize=(11, 4.2))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, p in pca.items():
        cumulative = p.cumulative().tolist()
        line, = left.plot(range(1, len(cumulative) + 1), cumulative, label=name, lw=1.2)
        left.plot([p.k], [cumulative[p.k - 1]], "o", color=line.get_color(), ms=4)
    left.axhline(theta, color="grey", ls="--", lw=1, label=f"theta = {theta:g}")
    left.set_xscale("log")
    left.set(xlabel="principal components k", ylabel="cumulative explained variance",
             title="PCA of time-accumulated membrane potential")
    left.legend(fontsize=6, ncol=2)
    names = list(pca)
    right.bar(range(len(names)), [p.channels for p in pca.values()], color="#cccccc", label="channels")
    right.bar(range(len(names)), [p.k for p in pca.values()], color="#1f77b4", label="k_l (significant)")
    for i, p in enumerate(pca.values()):
        right.annotate(f"{p.k}/{p.channels}", (i, p.k), ha="center", va="bottom", fontsize=7)
    right.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    right.set(ylabel="channels", title="significant dimension per layer")
    right.set_yscale("log")
    right.legend(fontsize=8)
    return save_figure(fig, path)


@register_stage("prune_pca", PrunePCAOptions)
def prune_pca(ctx: StageContext, opts: PrunePCAOptions) -> StageResult:
    """PCA significance per spiking layer -> narrower dense SNN, trained from scratch or fine-tuned."""
    model = ctx.require_model("prune_pca").set_spiking(True)
    images = calibration_batch(ctx.train_loader, opts.pca_images).to(ctx.device)
    pca = pca_significance(model, images, opts.theta, opts.accumulate, opts.chunk)
    groups = channel_groups(model)
    widths = group_widths(groups, layer_targets(model, pca, opts, groups), opts.min_channels,
                          projection_conflicts(model, groups))
    if opts.mode == "finetune":
        keep = select_channels(groups, widths, {name: p.significance for name, p in pca.items()})
        narrow = narrow_model(model, keep, groups)
        if opts.recalibrate:  # thresholds tuned for the wide net can silence the narrow one
            recalibrate(ctx, narrow, opts)
        accuracy_after_surgery = evaluate_accuracy(narrow, ctx.val_loader, ctx.device)
        accuracy = finetune_inherited(ctx, narrow, opts, model)
    else:
        narrow = narrow_fresh(model, widths, groups).to(ctx.device)
        accuracy_after_surgery, accuracy = None, train_from_scratch(ctx, narrow, opts)
    plot = plot_variance(pca, opts.theta, ctx.stage_dir / "pca_variance.png")
    write_json(ctx.stage_dir / "pca.json", {
        "theta": opts.theta, "accumulate": opts.accumulate, "images": int(images.shape[0]),
        "layers": {name: {"channels": p.channels, "k": p.k, "explained_variance_ratio": p.ratios.tolist(),
                          "significance": p.significance.tolist()} for name, p in pca.items()}})
    print("[prune_pca] k per layer: " + ", ".join(f"{n} {p.k}/{p.channels}" for n, p in pca.items())
          + f"; widths: {widths}", flush=True)
    return StageResult(narrow, {
        "val_accuracy": accuracy, "mode": opts.mode, "theta": opts.theta,
        "val_accuracy_after_surgery": accuracy_after_surgery,
        "layer_k": {name: p.k for name, p in pca.items()},
        "layer_channels": {name: p.channels for name, p in pca.items()},
        "group_widths": widths, "group_sizes": {g.name: g.size for g in groups},
        "params_before": sum(p.numel() for p in model.parameters()),
        "variance_plot": ctx.relative(ctx.stage_dir / plot),
    })


# ----------------------------------------------------------------------------- temporal


class TemporalOptions(DistillOptions):
    """Temporal pruning; ``epochs``/``lr``/... are the fine-tuning at each step of the schedule."""

    needs, produces = "snn", "snn"

    kind: Literal["temporal"] = "temporal"
    schedule: list[int] | None = Field(None, description="decreasing timesteps; default from the model's T")
    tolerance: float = Field(0.01, ge=0, le=1, description="accepted validation-accuracy drop below the start (0.01 = 1 point)")
    lr: float = Field(1e-4, gt=0)
    step_epochs: list[int] | None = Field(None, description="fine-tuning epochs of each schedule entry "
                                                            "(default: `epochs` for every step)")

    @field_validator("schedule")
    @classmethod
    def decreasing(cls, value):
        if value is not None:
            if not value:
                raise ValueError("schedule must list at least one timestep")
            check_schedule(value, max(value) + 1)
        return value

    @field_validator("step_epochs")
    @classmethod
    def positive(cls, value):
        if value is not None and any(e < 1 for e in value):
            raise ValueError(f"every entry must be >= 1, got {value}")
        return value

    @model_validator(mode="after")
    def one_count_per_step(self):
        if self.step_epochs is not None and self.schedule is not None and len(self.step_epochs) != len(self.schedule):
            raise ValueError(f"step_epochs needs one entry per schedule entry ({len(self.schedule)}), "
                             f"got {len(self.step_epochs)}")
        return self

    def check(self, chain: Chain) -> None:
        """Options that would be ignored, and the schedule against the T the stage will start from."""
        super().check(chain)
        if "epochs" in self.model_fields_set and self.step_epochs is not None:
            raise ValueError("epochs: not used when step_epochs is given")
        start = chain.timesteps
        if start is None:  # an earlier stage chooses T at run time
            if self.schedule is None and self.step_epochs is not None:
                raise ValueError(f"step_epochs: give a schedule too (the T that stage {chain.source!r} "
                                 f"leaves is chosen at run time)")
            return
        schedule = self.schedule if self.schedule is not None else default_schedule(start)
        if not check_schedule(schedule, start):
            raise ValueError(f"schedule: no timestep below the model's T={start}, so nothing would be "
                             f"pruned (schedule {schedule})")
        if self.step_epochs is not None and len(self.step_epochs) != len(schedule):
            raise ValueError(f"step_epochs: has {len(self.step_epochs)} entries but the default schedule "
                             f"from T={start}, {schedule}, has {len(schedule)}")

    def leaves(self, chain: Chain) -> Chain:
        return replace(super().leaves(chain), timesteps=None)

    def epochs_by_timesteps(self, schedule: list[int]) -> dict[int, int]:
        """Fine-tuning epochs for each T of ``schedule``."""
        if self.step_epochs is None:
            return {int(t): self.epochs for t in schedule}
        if len(self.step_epochs) != len(schedule):
            raise UserError(f"temporal: step_epochs has {len(self.step_epochs)} entries but the schedule "
                            f"{schedule} has {len(schedule)}")
        return {int(t): int(e) for t, e in zip(schedule, self.step_epochs)}


def plot_trials(start_timesteps: int, start_accuracy: float, rows: list[dict], tolerance: float,
                path: Path) -> str:
    """Accuracy vs T of the temporal schedule, with the tolerance line."""
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    ts = [start_timesteps] + [r["timesteps"] for r in rows]
    accs = [start_accuracy] + [r["val_accuracy"] for r in rows]
    ax.plot(ts, accs, "o-", color="#1f77b4")
    for r in rows:
        if not r["accepted"]:
            ax.plot([r["timesteps"]], [r["val_accuracy"]], "x", color="#d62728", ms=10, label="rejected")
    ax.axhline(start_accuracy - tolerance, color="grey", ls="--", lw=1, label="start - tolerance")
    ax.set_xticks(sorted(set(ts)))
    return save_selection_plot(fig, ax, path, "timesteps T", "temporal pruning")


@register_stage("temporal", TemporalOptions)
def temporal(ctx: StageContext, opts: TemporalOptions) -> StageResult:
    """Lower T along the schedule with fine-tuning; keep the last model within tolerance."""
    model = ctx.require_model("temporal").set_spiking(True)
    start_timesteps = model.timesteps
    schedule = opts.schedule if opts.schedule is not None else default_schedule(start_timesteps)
    epochs = opts.epochs_by_timesteps(schedule)
    start_accuracy = evaluate_accuracy(model, ctx.val_loader, ctx.device)
    print(f"[temporal] start: T={start_timesteps} validation accuracy {start_accuracy:.4f}; schedule {schedule}", flush=True)

    callbacks = opts.distillation(lambda: copy.deepcopy(model))

    def finetune(candidate: SpikingNetwork) -> float:
        t = candidate.timesteps
        config = opts.train_config(ctx.seed, epochs=epochs[t])
        return kept_row(fit(ctx, candidate, config, f"train_log_T{t}.csv", f"T={t}", callbacks))["val_accuracy"]

    final, trials = prune_timesteps(model, schedule, finetune, start_accuracy, opts.tolerance)
    rows = trials_table(trials)
    plot = plot_trials(start_timesteps, start_accuracy, rows, opts.tolerance, ctx.stage_dir / "temporal.png")
    accepted = [r for r in rows if r["accepted"]]
    return StageResult(final, {
        "val_accuracy": accepted[-1]["val_accuracy"] if accepted else start_accuracy,
        "start_timesteps": start_timesteps, "start_val_accuracy": start_accuracy,
        "final_timesteps": final.timesteps, "tolerance": opts.tolerance,
        "schedule": check_schedule(schedule, start_timesteps), "trials": rows,
        "plot": ctx.relative(ctx.stage_dir / plot),
    })
