"""Pipeline stages: each reads the previous stage's model and returns a new one with metrics.

A stage is a function ``run(ctx, opts) -> StageResult`` registered under its
``kind`` together with a strict options model. Built in here: ``train_ann``,
``convert``, ``train_snn``, ``evaluate``. Compression methods register their
own stages from their modules (see :data:`STAGE_MODULES`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import Field

from .convert import calibrate_thresholds
from .errors import UserError
from .models import SpikingNetwork, build_model
from .recipe import Recipe, Strict
from .train import TrainConfig, evaluate_accuracy, seed_everything, train


class StageOptions(Strict):
    """Options every stage has."""

    kind: str
    name: str | None = Field(None, description="folder and report name; default: the kind")


@dataclass
class StageContext:
    """What a stage can see: the recipe, the data, the previous model, and its own folder."""

    recipe: Recipe
    run_dir: Path
    stage_dir: Path
    device: torch.device
    train_loader: Any
    val_loader: Any                            # held out of training; every selection reads it
    test_loader: Any                           # read only to report (the pipeline and `evaluate`)
    info: Any                                  # data.DatasetInfo
    model: SpikingNetwork | None               # the previous stage's model (None for the first)
    quant: dict = field(default_factory=dict)  # the previous checkpoint's integer weights
    previous: list[dict] = field(default_factory=list)  # earlier stages' records (name, kind, metrics)

    def new_model(self) -> SpikingNetwork:
        """A fresh network as the recipe's ``model`` section describes it (initialised from the recipe's seed)."""
        cfg = self.recipe.model
        seed_everything(self.recipe.seed)
        return build_model(cfg.arch, self.info.num_classes, self.info.in_shape, cfg.timesteps,
                           encoding=cfg.encoding, neuron=cfg.neuron.model_dump(), **cfg.options)

    def require_model(self, kind: str) -> SpikingNetwork:
        if self.model is None:
            raise UserError(f"stage {kind!r} needs a model from an earlier stage")
        return self.model


@dataclass
class StageResult:
    """A stage's output: the model (None = unchanged, no new checkpoint), its quantized weights, metrics.

    Stages report validation figures (``val_accuracy``); the pipeline adds the
    test accuracy (``accuracy``) of every model a stage returns.
    """

    model: SpikingNetwork | None
    metrics: dict = field(default_factory=dict)
    quant: dict | None = None
    full_metrics: bool = False  # True when metrics already hold the complete SPEC §7 measurement


@dataclass
class StageDef:
    kind: str
    options: type[StageOptions]
    run: Callable[[StageContext, StageOptions], StageResult]


STAGES: dict[str, StageDef] = {}

#: Modules that register further stages when imported (compression methods).
STAGE_MODULES: list[str] = ["snncompress.prune.stp"]


def register_stage(kind: str, options: type[StageOptions]):
    """Decorator: register ``run(ctx, opts)`` as the stage ``kind`` with its options model."""
    def wrap(run):
        STAGES[kind] = StageDef(kind, options, run)
        return run
    return wrap


def stage_kinds() -> dict[str, StageDef]:
    """All registered stages, importing the method modules that add their own."""
    for module in STAGE_MODULES:
        importlib.import_module(module)
    return STAGES


# ----------------------------------------------------------------------------- training


class TrainOptions(StageOptions):
    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="learning rate over the stage: cosine decay from lr to 0, or constant")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    max_batches: int | None = Field(None, ge=1, description="cap on batches per epoch (quick runs)")
    lean_memory: bool = Field(False, description="keep spike tensors for backward as uint8 (exact)")
    checkpoint_layers: bool = Field(False, description="recompute each spiking layer in backward")

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, lr=self.lr, optimizer=self.optimizer,
                           weight_decay=self.weight_decay, momentum=self.momentum,
                           lr_schedule=self.lr_schedule, seed=seed, max_batches=self.max_batches,
                           label_smoothing=self.label_smoothing)


def run_training(ctx: StageContext, opts: TrainOptions, model: SpikingNetwork, desc: str) -> StageResult:
    """Train ``model`` in its current mode with ``opts``; the stage's metrics are the last epoch's."""
    from .kernels import checkpoint_layers, lean_memory

    lean_memory(model, opts.lean_memory)
    checkpoint_layers(model, opts.checkpoint_layers)
    try:
        history = train(model, ctx.train_loader, ctx.val_loader, opts.train_config(ctx.recipe.seed),
                        device=ctx.device, csv_path=ctx.stage_dir / "train_log.csv", desc=desc)
    finally:  # later stages get the plain model back
        lean_memory(model, False)
        checkpoint_layers(model, False)
    last = history[-1]
    return StageResult(model, {"val_accuracy": last["val_accuracy"], "epochs": len(history),
                               "seconds_per_epoch": sum(h["seconds"] for h in history) / len(history)})


class TrainANNOptions(TrainOptions):
    kind: Literal["train_ann"] = "train_ann"


@register_stage("train_ann", TrainANNOptions)
def train_ann(ctx: StageContext, opts: TrainANNOptions) -> StageResult:
    """Train the ANN twin (ReLU) of the recipe's model from scratch (or continue the previous one)."""
    model = (ctx.model or ctx.new_model()).set_spiking(False)
    return run_training(ctx, opts, model, "ann")


class TrainSNNOptions(TrainOptions):
    kind: Literal["train_snn"] = "train_snn"
    lr: float = Field(1e-4, gt=0)
    timesteps: int | None = Field(None, ge=1, description="train at this T (default: the model's)")


@register_stage("train_snn", TrainSNNOptions)
def train_snn(ctx: StageContext, opts: TrainSNNOptions) -> StageResult:
    """BPTT training of the SNN: weights, leaks and thresholds (from the previous model, or scratch)."""
    model = (ctx.model or ctx.new_model()).set_spiking(True)
    if opts.timesteps is not None:
        model.timesteps = opts.timesteps
    return run_training(ctx, opts, model, "snn")


# ----------------------------------------------------------------------------- conversion


class ConvertOptions(StageOptions):
    kind: Literal["convert"] = "convert"
    calib_images: int = Field(512, ge=1, description="training images used for calibration")
    calib_timesteps: int = Field(100, ge=1, description="timesteps simulated during calibration")
    percentile: float = Field(99.7, gt=0, le=100)
    scale: float = Field(1.0, gt=0, description="factor on every calibrated threshold")
    chunk: int = Field(64, ge=1, description="images per calibration forward pass (memory)")


@register_stage("convert", ConvertOptions)
def convert(ctx: StageContext, opts: ConvertOptions) -> StageResult:
    """Copy the ANN's weights into the SNN and calibrate thresholds layer by layer."""
    model = ctx.require_model("convert").set_spiking(True)
    images = calibration_images(ctx.train_loader, opts.calib_images).to(ctx.device)
    thresholds = calibrate_thresholds(model, images, calib_timesteps=opts.calib_timesteps,
                                      percentile=opts.percentile, scale=opts.scale, chunk=opts.chunk)
    accuracy = evaluate_accuracy(model, ctx.val_loader, ctx.device)
    print(f"[convert] thresholds {', '.join(f'{v:.3g}' for v in thresholds.values())}; "
          f"SNN validation accuracy at T={model.timesteps} before training: {accuracy:.4f}", flush=True)
    return StageResult(model, {"val_accuracy": accuracy, "thresholds": thresholds})


def calibration_images(loader, n: int) -> torch.Tensor:
    """The first ``n`` images the training loader yields ``[n, C, H, W]``."""
    batches, count = [], 0
    for images, _ in loader:
        batches.append(images)
        count += images.shape[0]
        if count >= n:
            break
    return torch.cat(batches)[:n]


# ----------------------------------------------------------------------------- measurement


class EvaluateOptions(StageOptions):
    kind: Literal["evaluate"] = "evaluate"
    energy_preset: Literal["fp32", "int32", "int8"] = "fp32"
    conv1_per_timestep: bool = False
    pooled_spikes: Literal["mac", "ac"] = Field(
        "mac", description="average-pooled spikes: MACs (NeuroBench) or ACs on the raw spikes (DIET/STP)")
    noise_sigmas: list[float] = Field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3])
    robustness_images: int | None = Field(2000, ge=1)
    ops_images: int | None = Field(512, ge=1)
    latency_batch: int = Field(1, ge=1)
    latency_repeats: int = Field(20, ge=1)
    latency_form: Literal["plan", "eager"] = Field(
        "plan", description="time the lean inference plan (deployment form, where it applies) or the eager model")
    include_state: bool = False


@register_stage("evaluate", EvaluateOptions)
def evaluate(ctx: StageContext, opts: EvaluateOptions) -> StageResult:
    """Measure the previous model completely (SPEC §6); writes no new checkpoint."""
    model = ctx.require_model("evaluate")
    metrics = measure(ctx, model, opts.model_dump(exclude={"kind", "name"}))
    return StageResult(None, metrics, full_metrics=True)


def measure(ctx: StageContext, model: SpikingNetwork, options: dict, quant: dict | None = None) -> dict:
    """The full SPEC §6 measurement of ``model`` on the test split."""
    from .metrics import measure_model

    baseline = next((r["metrics"].get("footprint_bytes") for r in ctx.previous
                     if r.get("baseline") and r["metrics"].get("footprint_bytes")), None)
    return measure_model(model, ctx.test_loader, quant=ctx.quant if quant is None else quant,
                         baseline_footprint=baseline, device=ctx.device, **options)
