"""Wall-clock latency per image (docs/measuring.md): state the batch size, threads and device with it.

Protocol: ``model.eval()`` under ``torch.inference_mode``; ``warmup`` untimed
forward passes, then ``repeats`` timed passes of one batch of
``latency_batch`` images; ``latency_ms`` = median pass time / batch size, in
milliseconds per image. On CUDA every pass is synchronised before the clock
is read.

Form (``latency_form``): ``"plan"`` (default) times the model's deployment form,
the lean :class:`~snncompress.deploy.plan.InferencePlan` (same
outputs, no training-time layer plumbing) where it applies (spiking VGG/convnet
on CPU) and the eager model elsewhere; ``"eager"`` always times the model's own
forward. The form that was timed is reported with the figure.

Both forms time a deployment copy: masks and quantizers burned in and
subnormal values flushed to zero (trained weights decay into the subnormal
range, which x86 CPUs handle slowly); the plan runs at the fastest thread
count up to the process's (``latency_threads`` of ``latency_threads_available``).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn

from ..compress.state import flush_subnormals_, frozen


def median_ms(call, repeats: int, warmup: int, sync=None) -> float:
    """Median wall-clock milliseconds of ``call()`` over ``repeats`` runs after ``warmup`` untimed ones;
    ``sync()`` (e.g. a CUDA synchronize) runs before each clock read."""
    times = []
    for i in range(warmup + max(int(repeats), 1)):
        if sync is not None:
            sync()
        start = time.perf_counter()
        call()
        if sync is not None:
            sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def latency_images(loader, batch: int) -> torch.Tensor:
    """The first ``batch`` images ``[batch, C, H, W]`` of ``loader`` (cycled when it holds fewer)."""
    chunks, have = [], 0
    while have < batch:
        before = have
        for item in loader:
            images = item[0] if isinstance(item, (tuple, list)) else item
            chunks.append(images[: batch - have])
            have += chunks[-1].shape[0]
            if have >= batch:
                break
        if have == before:
            raise ValueError("the test loader yielded no images to time")
    return torch.cat(chunks)[:batch]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: What ``measure_latency`` can time (module docstring).
LATENCY_FORMS = ("plan", "eager")


def inference_form(model: nn.Module, form: str = "plan",
                   build_plan: Callable[[nn.Module], nn.Module | None] | None = None) -> tuple[nn.Module, str]:
    """``(module to time, its name)``: the inference plan when ``form == "plan"`` and it applies, else the model.

    ``build_plan`` (e.g. :func:`snncompress.deploy.build_inference_plan`, handed in by the layer above
    that owns it) returns the plan of a model, or None where no plan applies; form ``"plan"`` needs it.
    """
    if form not in LATENCY_FORMS:
        raise ValueError(f"latency form must be 'plan' or 'eager', got {form!r}")
    if form == "plan":
        if build_plan is None:
            raise ValueError("latency form 'plan' needs build_plan (snncompress.deploy.build_inference_plan)")
        plan = build_plan(model)
        if plan is not None:
            return plan, "plan"
    return model, "eager"


def measure_latency(model: nn.Module, images: torch.Tensor, *, repeats: int = 20, warmup: int = 3,
                    device="cpu", form: str = "plan",
                    build_plan: Callable[[nn.Module], nn.Module | None] | None = None) -> dict:
    """Median wall-clock milliseconds per image of ``model(images)``.

    Args:
        images: one batch ``[B, C, H, W]``; B is the reported ``latency_batch``.
        repeats: timed forward passes (>= 1); warmup: untimed passes before them.
        form: ``"plan"`` or ``"eager"`` (module docstring); the model must already be on ``device``.
        build_plan: the inference-plan builder form ``"plan"`` times (see :func:`inference_form`).

    What is timed is the deployed form: a copy of the model with masks and quantizers burned
    in and subnormal values set to zero (:func:`~snncompress.compress.state.flush_subnormals_`);
    the plan runs at its fastest thread count up to the process's (:meth:`InferencePlan.tune_threads`).

    Returns:
        ``{"latency_ms", "latency_batch", "latency_threads" (threads the timed form used),
        "latency_threads_available" (the process's intra-op threads), "latency_device",
        "latency_repeats", "latency_form", "latency_subnormals_flushed"}``.
    """
    device = torch.device(device)
    model = frozen(model)
    flushed = flush_subnormals_(model)
    timed, form_used = inference_form(model, form, build_plan) if device.type == "cpu" else (model, "eager")
    images = images.to(device)
    available = int(torch.get_num_threads())
    repeats = max(int(repeats), 1)
    with torch.inference_mode():
        if form_used == "plan":
            timed.tune_threads(images)
        batch_ms = median_ms(lambda: timed(images), repeats, warmup, sync=lambda: _sync(device))
    return {
        "latency_ms": batch_ms / images.shape[0],
        "latency_batch": int(images.shape[0]),
        "latency_threads": int(getattr(timed, "threads", None) or available),
        "latency_threads_available": available,
        "latency_device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "latency_repeats": repeats,
        "latency_form": form_used,
        "latency_subnormals_flushed": flushed,
    }
