"""CRIT stages (docs/methods/crit.md): ``prune_criticality`` (unstructured or structured) and ``prune_imp`` (its baseline).

* ``prune_criticality``, ``mode: unstructured``: train ``epochs`` (the pruning phase) while
  pruning every ``dt`` steps along the cubic schedule to ``final_sparsity`` (global
  magnitude, ``regrow_ratio`` of the budget regrown by criticality, restarting at zero),
  then fine-tune ``finetune_epochs`` with the mask fixed. ``regrow_ratio: 0`` is plain
  gradual magnitude pruning under the same schedule. ``regrow_normalize`` (none | mean |
  rank) and ``regrow_budget`` (global | per_layer) choose how the regrowth is shared among
  layers (:func:`~snncompress.compress.pruning.regrowth`); ``spatial`` (max | mean) how a
  conv channel's positions reduce to its score; ``regrow_decay`` (constant | cosine) whether
  the ratio stays ``regrow_ratio`` or anneals to 0 at the last event; ``regrow_by: random``
  regrows the same count at random (the control for criticality; seeded by the stage's seed).
* ``prune_criticality``, ``mode: structured`` (BatchNorm models): train ``epochs`` with
  ``gamma_l1`` on every BatchNorm gamma, score criticality on ``score_images`` training
  images (forward passes only), keep ``1 - prune_fraction`` of the channels globally by
  |gamma| after regrowing ``regrow_fraction`` of them by criticality, cut the network
  narrower, fine-tune.
* ``prune_imp``: iterative magnitude pruning with weight rewinding (lottery tickets):
  each round prunes ``rate`` of the live weights by global magnitude (the last round stops
  at ``final_sparsity``), rewinds the live weights (and BatchNorm, leak, threshold) to the
  stage's input model, the rewind point, and trains ``epochs``; the final ticket is
  fine-tuned ``finetune_epochs``.

Every stage records its cost: ``pruning_iterations`` (optimizer steps until the final
mask or width is fixed), ``pruning_images`` (training images those steps processed, plus
the images of forward-only scoring), ``pruning_seconds`` (the training loop's wall-clock of
those steps, validation passes excluded, plus scoring and selection), ``pruning_cpu_seconds``
(the process's CPU time over the same calls, validation passes included: less sensitive to
other processes on a shared machine), and the same for fine-tuning (``finetune_*``). ``from_stage: NAME`` starts from an earlier stage's model
instead of the previous one, so several methods can branch from one baseline in one recipe.
Choices read the training split (criticality) and report the validation split; the test
split is never read here.
"""

from __future__ import annotations

import time
from typing import ClassVar, Literal

from pydantic import Field

from ..checkpoint import load_checkpoint
from ..compress.criticality import criticality_scores
from ..compress.masks import original, owner
from ..compress.pruning import (PruneRegrow, StepCost, attach_masks, global_magnitude, imp_sparsities, kept_count,
                                live_count, prunable_weights, rewind_)
from ..compress.importance import per_group_mean
from ..compress.slimming import GammaL1, batchnorms, select_channels
from ..compress.structure import channel_groups, narrow_model
from ..data import calibration_batch
from ..errors import UserError
from ..io import write_json
from ..models import SpikingNetwork
from ..training import evaluate_accuracy, kept_row
from .base import Chain, StageContext, StageResult, TrainOptions, fit, register_stage


class _PruneOptions(TrainOptions):
    """Options both pruning stages share; ``epochs``/``lr``/... are the pruning phase's training."""

    needs, produces = "snn", "snn"

    lr: float = Field(1e-4, gt=0)
    from_stage: str | None = Field(None, description="start from this earlier stage's model (its name) instead of "
                                                     "the previous stage's: methods side by side on one baseline")
    finetune_epochs: int = Field(1, ge=0, description="epochs of fine-tuning with the final mask / width fixed")
    finetune_lr: float | None = Field(None, gt=0, description="fine-tuning learning rate (default: lr)")
    finetune_max_batches: int | None = Field(None, ge=1, description="cap on fine-tuning batches per epoch "
                                                                     "(default: max_batches)")

    def check(self, chain: Chain) -> None:
        super().check(chain)
        if self.from_stage is not None and self.from_stage == self.name:
            raise ValueError("from_stage: a stage cannot start from its own model")
        if self.from_stage is not None:
            modes = dict(chain.earlier)
            if self.from_stage not in modes:
                raise ValueError(f"from_stage: no earlier stage named {self.from_stage!r} "
                                 f"(earlier: {', '.join(modes) or 'none'})")
            if modes[self.from_stage] != "snn":
                raise ValueError(f"from_stage: stage {self.from_stage!r} leaves no spiking model")
        given = sorted(self.model_fields_set & {"finetune_lr", "finetune_max_batches"})
        if given and self.finetune_epochs == 0:
            raise ValueError(f"{given[0]}: not used with finetune_epochs: 0")


class PruneCriticalityOptions(_PruneOptions):
    """Criticality-guided pruning with regeneration (CRIT)."""

    UNSTRUCTURED: ClassVar[set[str]] = {"final_sparsity", "dt", "regrow_ratio", "score_steps", "exclude",
                                        "regrow_normalize", "regrow_budget", "regrow_decay", "regrow_by"}
    STRUCTURED: ClassVar[set[str]] = {"prune_fraction", "regrow_fraction", "gamma_l1", "score_images", "chunk",
                                      "min_channels"}
    SCORING: ClassVar[set[str]] = {"score", "alpha", "normalized", "spatial", "score_steps", "regrow_normalize",
                                   "regrow_budget", "regrow_decay", "regrow_by"}
    #: Options that rank by criticality: unused when ``regrow_by: random``.
    CRITICALITY: ClassVar[set[str]] = SCORING - {"regrow_budget", "regrow_decay", "regrow_by"}
    HASHED_WHEN_CHANGED: ClassVar[frozenset[str]] = _PruneOptions.HASHED_WHEN_CHANGED | {"regrow_decay",
                                                                                         "regrow_by"}

    kind: Literal["prune_criticality"] = "prune_criticality"
    mode: Literal["unstructured", "structured"] = "unstructured"
    epochs: int = Field(1, ge=0, description="epochs of the pruning phase (unstructured: >= 1; structured: "
                                             "training with the gamma L1 penalty, 0 = none)")
    # unstructured
    final_sparsity: float = Field(0.9, gt=0, lt=1, description="unstructured: fraction of prunable weights removed")
    dt: int = Field(2000, ge=1, description="unstructured: optimizer steps between pruning events")
    regrow_ratio: float = Field(0.2, ge=0, lt=1, description="unstructured: fraction of each event's kept budget "
                                                              "regrown by criticality (0: magnitude pruning alone)")
    score_steps: int | None = Field(None, ge=1, description="unstructured: training steps before each event whose "
                                                            "forward passes score criticality (default: all dt)")
    exclude: list[str] = Field(default_factory=list, description="unstructured: weights never pruned "
                                                                 "(e.g. features.0.weight)")
    regrow_normalize: Literal["none", "mean", "rank"] = Field(
        "none", description="unstructured: unit criticality made comparable across layers before the global "
                            "regrowth pick: none (as measured), mean (divided by the layer's mean), rank (the "
                            "fraction of the layer's units scoring at most as high)")
    regrow_budget: Literal["global", "per_layer"] = Field(
        "global", description="unstructured: global (the most critical units over all layers) or per_layer (each "
                              "layer regrows in proportion to the live weights magnitude took from it in the event)")
    regrow_decay: Literal["constant", "cosine"] = Field(
        "constant", description="unstructured: the ratio of each event: regrow_ratio at every event (the paper), or "
                                "annealed by a cosine to 0 at the last event (GraNet, RigL), so the final mask "
                                "holds no weights regrown at zero")
    regrow_by: Literal["criticality", "random"] = Field(
        "criticality", description="unstructured: which pruned weights regrow: those feeding the most critical "
                                   "units (the paper), or the same count at random (the control: does criticality "
                                   "matter?)")
    # structured
    prune_fraction: float = Field(0.65, ge=0, lt=1, description="structured: fraction of BatchNorm channels removed")
    regrow_fraction: float = Field(0.05, ge=0, lt=1, description="structured: fraction of the kept channels "
                                                                 "regrown by criticality")
    gamma_l1: float = Field(1e-4, ge=0, description="structured: L1 strength on BatchNorm gamma while training")
    score_images: int = Field(512, ge=1, description="structured: training images the criticality is scored on")
    chunk: int = Field(64, ge=1, description="structured: images per scoring forward pass (memory)")
    min_channels: int = Field(1, ge=1, description="structured: fewest channels a layer keeps")
    # criticality
    score: Literal["derivative", "soft_spike"] = Field(
        "derivative", description="atan surrogate derivative at u - thr (the paper), or the atan soft spike")
    alpha: float = Field(2.0, gt=0, description="atan shape parameter a")
    normalized: bool = Field(False, description="score at u/thr - 1 instead of u - thr")
    spatial: Literal["max", "mean"] = Field("max", description="a conv channel's score per sample: max (the paper) or "
                                                               "mean over its spatial positions")

    @property
    def reduce(self) -> str:
        """The :func:`~snncompress.compress.criticality.reduce_criticality` reduction ``spatial`` names."""
        return "channel" if self.spatial == "max" else "channel_mean"

    def needs_channel_surgery(self) -> bool:
        return self.mode == "structured"

    def check(self, chain: Chain) -> None:
        """An option the chosen mode does not use is an error (it would be silently ignored)."""
        super().check(chain)
        unstructured = self.mode == "unstructured"
        unused = [(self.STRUCTURED if unstructured else self.UNSTRUCTURED, f"mode: {self.mode}")]
        if unstructured and self.regrow_ratio == 0:
            unused.append((self.SCORING, "regrow_ratio: 0 (no regeneration, no criticality)"))
        elif unstructured and self.regrow_by == "random":
            unused.append((self.CRITICALITY, "regrow_by: random (no criticality)"))
        given = sorted((name, why) for options, why in unused for name in self.model_fields_set & options)
        if given:
            raise ValueError(f"{given[0][0]}: not used with {given[0][1]}")
        if self.mode == "unstructured" and self.epochs < 1:
            raise ValueError("epochs: mode unstructured prunes while training: needs >= 1")


class PruneIMPOptions(_PruneOptions):
    """Iterative magnitude pruning with weight rewinding (lottery tickets); ``epochs`` = training per round."""

    kind: Literal["prune_imp"] = "prune_imp"
    epochs: int = Field(1, ge=1, description="training epochs of every round before the last (pruning cost)")
    final_sparsity: float = Field(0.9, gt=0, lt=1, description="fraction of prunable weights removed at the end")
    rate: float = Field(0.2, gt=0, lt=1, description="fraction of the live weights each round removes")
    exclude: list[str] = Field(default_factory=list, description="weights never pruned (e.g. features.0.weight)")


# ----------------------------------------------------------------------------- shared helpers


def input_model(ctx: StageContext, opts: _PruneOptions) -> SpikingNetwork:
    """The model to prune: ``from_stage``'s checkpoint, or the previous stage's model."""
    if opts.from_stage is None:
        return ctx.require_model(opts.kind).set_spiking(True)
    record = next((r for r in reversed(ctx.previous) if r["name"] == opts.from_stage), None)
    if record is None:
        names = ", ".join(r["name"] for r in ctx.previous) or "none"
        raise UserError(f"from_stage: no earlier stage named {opts.from_stage!r} (earlier stages: {names})")
    path = record["metrics"].get("checkpoint")
    if not path:
        raise UserError(f"from_stage: stage {opts.from_stage!r} left no model")
    return load_checkpoint(ctx.run_dir / path, ctx.device).model.set_spiking(True)


def _names(model: SpikingNetwork, exclude: list[str]) -> list[str]:
    try:
        return prunable_weights(model, exclude)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _train(ctx: StageContext, model: SpikingNetwork, config, log: str, desc: str, callbacks=()) -> tuple[list, dict]:
    """``fit`` with a :class:`StepCost`; returns the history and ``{iterations, images, seconds, cpu_seconds}``.

    ``seconds``: the loop's per-epoch wall-clock (resume-safe); ``cpu_seconds``: this process's CPU
    time over the call (all threads; of the resumed part only, after a resume), less sensitive to
    other processes sharing the machine.
    """
    cost = StepCost()
    cpu = time.process_time()
    history = fit(ctx, model, config, log, desc, [cost, *callbacks])
    return history, {**cost.totals(ctx.device), "seconds": sum(h["seconds"] for h in history),
                     "cpu_seconds": time.process_time() - cpu}


def _cost(prefix: str, *parts: dict) -> dict:
    keys = ("iterations", "images", "seconds", "cpu_seconds")
    return {f"{prefix}_{k}": sum(p.get(k, 0) for p in parts) for k in keys}


def _finetune(ctx: StageContext, model: SpikingNetwork, opts: _PruneOptions, desc: str) -> tuple[float | None, dict]:
    """Fine-tune with the mask / width fixed; returns (validation accuracy or None, its cost)."""
    if opts.finetune_epochs == 0:
        return None, _cost("finetune")
    config = opts.train_config(ctx.seed, epochs=opts.finetune_epochs, lr=opts.finetune_lr or opts.lr,
                               max_batches=opts.finetune_max_batches or opts.max_batches)
    history, cost = _train(ctx, model, config, "finetune_log.csv", desc)
    return kept_row(history)["val_accuracy"], _cost("finetune", cost)


def _steps(ctx: StageContext, opts: TrainOptions) -> int:
    per_epoch = len(ctx.train_loader) if opts.max_batches is None else min(opts.max_batches, len(ctx.train_loader))
    return opts.epochs * per_epoch


def _sparsity_metrics(model: SpikingNetwork, names: list[str]) -> dict:
    prunable = sum(original(*owner(model, n)).numel() for n in names)
    live = live_count(model, names)
    return {"prunable_weights": prunable, "live_weights": live, "sparsity": 1.0 - live / prunable}


# ----------------------------------------------------------------------------- prune_criticality


@register_stage("prune_criticality", PruneCriticalityOptions)
def prune_criticality(ctx: StageContext, opts: PruneCriticalityOptions) -> StageResult:
    """CRIT pruning-regeneration, unstructured (weights) or structured (BatchNorm channels)."""
    model = input_model(ctx, opts)
    if opts.mode == "structured":
        return _structured(ctx, model, opts)
    return _unstructured(ctx, model, opts)


def _unstructured(ctx: StageContext, model: SpikingNetwork, opts: PruneCriticalityOptions) -> StageResult:
    names = _names(model, opts.exclude)
    steps = _steps(ctx, opts)
    if steps // opts.dt == 0:
        raise UserError(f"dt: {opts.dt} steps is longer than the pruning phase ({opts.epochs} epochs = {steps} "
                        f"steps): no pruning event would happen")
    attach_masks(model, names)
    pruner = PruneRegrow(names, opts.final_sparsity, opts.dt, opts.regrow_ratio, opts.score, opts.alpha,
                         opts.normalized, opts.score_steps, opts.reduce, opts.regrow_normalize, opts.regrow_budget,
                         opts.regrow_decay, opts.regrow_by, ctx.seed)
    try:
        # the masks change during this phase, so it ends at its last event whatever keep says
        history, cost = _train(ctx, model, opts.train_config(ctx.seed, keep="last"), "prune_log.csv",
                               "crit-prune" if opts.regrow_ratio else "magnitude-prune", [pruner])
    finally:
        pruner.close()
    after_pruning = history[-1]["val_accuracy"]
    reached = _sparsity_metrics(model, names)
    if reached["live_weights"] != kept_count(reached["prunable_weights"], opts.final_sparsity):
        raise UserError(f"the pruning phase ended before its last event (time_budget_s?): sparsity "
                        f"{reached['sparsity']:.4f} instead of {opts.final_sparsity}")
    print(f"[{opts.name}] {len(pruner.events)} pruning events to sparsity {opts.final_sparsity}; "
          f"validation accuracy {after_pruning:.4f}", flush=True)
    finetuned, ft_cost = _finetune(ctx, model, opts, "crit-finetune" if opts.regrow_ratio else "magnitude-finetune")
    write_json(ctx.stage_dir / "events.json", {"events": pruner.events})
    return StageResult(model, {
        "val_accuracy": finetuned if finetuned is not None else after_pruning,
        "val_accuracy_after_pruning": after_pruning, "mode": "unstructured",
        "method": ("magnitude" if opts.regrow_ratio == 0 else
                   "random_regrowth" if opts.regrow_by == "random" else "criticality"),
        "final_sparsity": opts.final_sparsity, "dt": opts.dt, "regrow_ratio": opts.regrow_ratio,
        **({"regrow_budget": opts.regrow_budget, "regrow_decay": opts.regrow_decay, "regrow_by": opts.regrow_by}
           if opts.regrow_ratio > 0 else {}),
        **({"regrow_normalize": opts.regrow_normalize, "spatial": opts.spatial}
           if opts.regrow_ratio > 0 and opts.regrow_by == "criticality" else {}),
        "events": len(pruner.events), "regrown_weights": sum(e["regrown"] for e in pruner.events),
        **_sparsity_metrics(model, names), **_cost("pruning", cost), **ft_cost,
    })


def _structured(ctx: StageContext, model: SpikingNetwork, opts: PruneCriticalityOptions) -> StageResult:
    groups = channel_groups(model)
    bns = [bn for g in groups for bn in batchnorms(model, g)]
    if not bns:
        raise UserError("mode: structured prunes BatchNorm channels, but the model has no BatchNorm "
                        "(model.options.batchnorm: true)")
    parts = []
    if opts.epochs > 0:
        _, cost = _train(ctx, model, opts.train_config(ctx.seed), "sparsity_log.csv", "crit-l1",
                         [GammaL1(bns, opts.gamma_l1)])
        parts.append(cost)
    start, cpu = time.perf_counter(), time.process_time()
    images = calibration_batch(ctx.train_loader, opts.score_images).to(ctx.device)
    scores = criticality_scores(model, images, opts.chunk, opts.score, opts.alpha, opts.normalized, opts.reduce)
    keep, summary = select_channels(model, groups, opts.prune_fraction, opts.regrow_fraction,
                                    per_group_mean(groups, scores), opts.min_channels)
    narrow = narrow_model(model, keep, groups)
    parts.append({"iterations": 0, "images": int(images.shape[0]), "seconds": time.perf_counter() - start,
                  "cpu_seconds": time.process_time() - cpu})
    after_surgery = evaluate_accuracy(narrow, ctx.val_loader, ctx.device)
    print(f"[{opts.name}] kept {summary['kept']}/{summary['prunable_channels']} channels "
          f"({summary['regrown']} regrown by criticality); validation accuracy after surgery {after_surgery:.4f}",
          flush=True)
    finetuned, ft_cost = _finetune(ctx, narrow, opts, "crit-finetune")
    write_json(ctx.stage_dir / "channels.json", {
        **summary, "keep": {name: idx.tolist() for name, idx in keep.items()},
        "criticality": {name: s.tolist() for name, s in scores.items()}})
    return StageResult(narrow, {
        "val_accuracy": finetuned if finetuned is not None else after_surgery,
        "val_accuracy_after_surgery": after_surgery, "mode": "structured", "method": "criticality",
        "prune_fraction": opts.prune_fraction, "regrow_fraction": opts.regrow_fraction,
        "group_widths": {name: int(idx.numel()) for name, idx in keep.items()},
        "group_sizes": {g.name: g.size for g in groups}, "channels_kept": summary["kept"],
        "channels_prunable": summary["prunable_channels"], "channels_regrown": summary["regrown"],
        "params_before": sum(p.numel() for p in model.parameters()),
        **_cost("pruning", *parts), **ft_cost,
    })


# ----------------------------------------------------------------------------- prune_imp


@register_stage("prune_imp", PruneIMPOptions)
def prune_imp(ctx: StageContext, opts: PruneIMPOptions) -> StageResult:
    """Iterative magnitude pruning with weight rewinding to the stage's input model."""
    model = input_model(ctx, opts)
    names = _names(model, opts.exclude)
    attach_masks(model, names)
    rewind_point = {k: v.detach().clone() for k, v in model.state_dict().items()}
    total = live_count(model, names)
    sparsities = imp_sparsities(opts.final_sparsity, opts.rate)
    rounds, costs = [], []
    for j, sparsity in enumerate(sparsities, 1):
        masks = global_magnitude(model, names, kept_count(total, sparsity))
        rewind_(model, rewind_point, masks)
        if j == len(sparsities):
            break  # the final ticket: its training is the fine-tuning below
        history, cost = _train(ctx, model, opts.train_config(ctx.seed), f"round{j:02d}_log.csv", f"imp-{j}")
        costs.append(cost)
        rounds.append({"round": j, "sparsity": sparsity, "live_weights": live_count(model, names),
                       "val_accuracy": kept_row(history)["val_accuracy"], **cost})
    rewound = evaluate_accuracy(model, ctx.val_loader, ctx.device)
    print(f"[{opts.name}] {len(sparsities)} rounds to sparsity {opts.final_sparsity}; validation accuracy of the "
          f"rewound ticket {rewound:.4f}", flush=True)
    finetuned, ft_cost = _finetune(ctx, model, opts, "imp-finetune")
    write_json(ctx.stage_dir / "rounds.json", {"rounds": rounds, "sparsities": sparsities})
    return StageResult(model, {
        "val_accuracy": finetuned if finetuned is not None else rewound,
        "val_accuracy_rewound": rewound, "mode": "unstructured", "method": "imp",
        "final_sparsity": opts.final_sparsity, "rate": opts.rate, "rounds": len(sparsities),
        "round_sparsities": sparsities, **_sparsity_metrics(model, names), **_cost("pruning", *costs), **ft_cost,
    })
