"""The ``evaluate`` stage: the complete measurement (docs/measuring.md) of the previous model on the test split."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationError

from ..errors import UserError, format_validation_error
from ..models import SpikingNetwork
from .base import StageContext, StageOptions, StageResult, register_stage


class EvaluateOptions(StageOptions):
    needs = "model"

    kind: Literal["evaluate"] = "evaluate"
    energy_preset: Literal["fp32", "int32", "int8"] = Field("fp32", description="pJ per MAC / AC (Horowitz 45 nm)")
    conv1_per_timestep: bool = Field(False, description="count direct-input conv1 T times instead of once")
    pooled_spikes: Literal["mac", "ac"] = Field(
        "mac", description="average-pooled spikes: MACs (NeuroBench) or ACs on the raw spikes (DIET/STP)")
    noise_sigmas: list[Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3], min_length=1,
        description="Gaussian noise levels on the normalised input")
    robustness_images: int | None = Field(2000, ge=1, description="first N test images for robustness")
    ops_images: int | None = Field(512, ge=1, description="first N test images for synaptic operations")
    latency_batch: int = Field(1, ge=1, description="images per timed forward pass")
    latency_repeats: int = Field(20, ge=1, description="timed forward passes (median reported)")
    latency_form: Literal["plan", "eager"] = Field(
        "plan", description="time the lean inference plan (deployment form, where it applies) or the eager model")
    include_state: bool = Field(False, description="count membrane potentials in footprint_bytes")

    def measure_options(self) -> dict:
        return self.model_dump(exclude={"kind", "name"})

    @classmethod
    def from_measure(cls, raw: dict, where: str, prefix: str = "") -> dict:
        """The measurement options in ``raw`` (a recipe's ``measure:``, ``evaluate --set``): this stage's
        options but ``kind`` and ``name``; a mistake is a UserError naming ``prefix.<option>``."""
        for key in ("kind", "name"):
            if key in raw:
                raise UserError(f"{where}: {'.'.join(filter(None, [prefix, key]))}: unknown option "
                                f"(only the evaluate stage's measurement options go here)")
        try:
            return cls.model_validate({**raw, "kind": "evaluate"}).measure_options()
        except ValidationError as exc:
            raise UserError(format_validation_error(exc, where, prefix)) from None


@register_stage("evaluate", EvaluateOptions)
def evaluate(ctx: StageContext, opts: EvaluateOptions) -> StageResult:
    """Measure the previous model completely (docs/measuring.md); writes no new checkpoint."""
    model = ctx.require_model("evaluate")
    return StageResult(None, measure(ctx, model, opts.measure_options()), full_metrics=True)


def measure(ctx: StageContext, model: SpikingNetwork, options: dict) -> dict:
    """The full measurement (docs/measuring.md) of ``model`` on the test split (the baseline's footprint gives the ratio)."""
    from ..deploy.plan import build_inference_plan  # loads the C kernels: only when a stage measures
    from ..metrics import measure_model

    baseline = next((r["metrics"].get("footprint_bytes") for r in ctx.previous
                     if r.get("baseline") and r["metrics"].get("footprint_bytes")), None)
    return measure_model(model, ctx.test_loader, baseline_footprint=baseline, device=ctx.device,
                         reference_ann=ctx.reference_ann, build_plan=build_inference_plan, **options)
