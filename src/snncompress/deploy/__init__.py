"""Deployment forms of a trained model: :func:`~.plan.build_inference_plan` (the lean CPU forward the
reports time) and :func:`~.prepare.prepare_for_inference` (eval, fused LIF, channels_last convs)."""

from .plan import InferencePlan, build_inference_plan
from .prepare import prepare_for_inference, tune_cpu_allocator

__all__ = ["InferencePlan", "build_inference_plan", "prepare_for_inference", "tune_cpu_allocator"]
