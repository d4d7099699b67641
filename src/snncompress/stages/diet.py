"""DIET-SNN stages (docs/methods/diet.md): ``train_ann``, ``convert`` (threshold calibration), ``train_snn`` (BPTT)."""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Literal

from pydantic import Field

from ..convert import calibrate_thresholds
from ..data import calibration_batch
from ..training import evaluate_accuracy
from .base import (Chain, DistillOptions, StageContext, StageOptions, StageResult, TrainOptions, fit,
                   register_stage, training_metrics)


class TrainANNOptions(TrainOptions):
    produces = "ann"

    kind: Literal["train_ann"] = "train_ann"


@register_stage("train_ann", TrainANNOptions)
def train_ann(ctx: StageContext, opts: TrainANNOptions) -> StageResult:
    """Train the ANN twin (ReLU) of the recipe's model from scratch (or continue the previous one)."""
    model = (ctx.model or ctx.new_model()).set_spiking(False)
    return StageResult(model, training_metrics(fit(ctx, model, opts.train_config(ctx.seed), desc="ann")))


class TrainSNNOptions(DistillOptions):
    produces = "snn"

    #: distill came after runs existed: hashed only when set, so their train_snn folders stay finished
    HASHED_WHEN_CHANGED: ClassVar[frozenset[str]] = TrainOptions.HASHED_WHEN_CHANGED | {"distill",
                                                                                        "distill_temperature"}

    kind: Literal["train_snn"] = "train_snn"
    lr: float = Field(1e-4, gt=0)
    timesteps: int | None = Field(None, ge=1, description="train at this T (default: the model's)")

    def leaves(self, chain: Chain) -> Chain:
        return replace(super().leaves(chain), timesteps=self.timesteps or chain.timesteps)


@register_stage("train_snn", TrainSNNOptions)
def train_snn(ctx: StageContext, opts: TrainSNNOptions) -> StageResult:
    """BPTT training of the SNN: weights, leaks and thresholds (from the previous model, or scratch)."""
    model = (ctx.model or ctx.new_model()).set_spiking(True)
    if opts.timesteps is not None:
        model.timesteps = opts.timesteps
    callbacks = opts.distillation(model.ann_twin)
    return StageResult(model, training_metrics(fit(ctx, model, opts.train_config(ctx.seed), desc="snn",
                                                   callbacks=callbacks)))


class ConvertOptions(StageOptions):
    needs, produces = "ann", "snn"
    HASHED_WHEN_CHANGED: ClassVar[frozenset[str]] = frozenset({"rescale_batchnorm", "thresholds"})

    kind: Literal["convert"] = "convert"
    thresholds: Literal["calibrate", "keep"] = Field("calibrate", description=(
        "calibrate: set each threshold from the ANN's activations (the options below); keep: the ANN's own "
        "trained thresholds, for an ANN trained with model.neuron.ann_levels (its clip-floor activation is the "
        "rate of the converted neuron)"))
    calib_images: int = Field(512, ge=1, description="training images used for calibration")
    calib_timesteps: int = Field(100, ge=1, description="timesteps simulated during calibration")
    percentile: float = Field(99.7, gt=0, le=100)
    scale: float = Field(1.0, gt=0, description="factor on every calibrated threshold")
    chunk: int = Field(64, ge=1, description="images per calibration forward pass (memory)")
    rescale_batchnorm: bool = Field(False, description=(
        "multiply a conv/linear layer that reads spikes and feeds a BatchNorm by the previous threshold "
        "(the BatchNorm then sees the ANN's scale; convert.py)"))

    def check(self, chain: Chain) -> None:
        super().check(chain)
        unused = sorted(self.model_fields_set & {"calib_images", "calib_timesteps", "percentile", "scale", "chunk",
                                                 "rescale_batchnorm"})
        if self.thresholds == "keep" and unused:
            raise ValueError(f"{unused[0]}: not used with thresholds: keep (nothing is calibrated)")


@register_stage("convert", ConvertOptions)
def convert(ctx: StageContext, opts: ConvertOptions) -> StageResult:
    """Copy the ANN's weights into the SNN and calibrate thresholds layer by layer."""
    model = ctx.require_model("convert").set_spiking(True)
    if opts.thresholds == "keep":
        thresholds = {name: lif.threshold.detach().mean().item() for name, lif in model.spiking_layers()}
    else:
        images = calibration_batch(ctx.train_loader, opts.calib_images).to(ctx.device)
        thresholds = calibrate_thresholds(model, images, calib_timesteps=opts.calib_timesteps,
                                          percentile=opts.percentile, scale=opts.scale, chunk=opts.chunk,
                                          rescale_batchnorm=opts.rescale_batchnorm)
    accuracy = evaluate_accuracy(model, ctx.val_loader, ctx.device)
    print(f"[convert] thresholds {', '.join(f'{v:.3g}' for v in thresholds.values())}; "
          f"SNN validation accuracy at T={model.timesteps} before training: {accuracy:.4f}", flush=True)
    return StageResult(model, {"val_accuracy": accuracy, "thresholds": thresholds})
