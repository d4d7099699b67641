"""ANN -> SNN conversion: layer-by-layer threshold calibration (DIET-SNN, docs/methods/diet.md step 3).

For each spiking layer l, in forward order: run the SNN with leak 1 for
``calib_T`` timesteps on a batch of training images, with the layers before
l already spiking at their calibrated thresholds; record layer l's input
current ``I[t]``; set

    thr_l = scale * max over t of percentile_p(I[t])          (p = 99.7 by default)

The percentile is exact (nearest rank over all B x neurons values of one
timestep), computed in image chunks so that long calibrations (paper: 512
images, T = 100) fit in memory: only the top ``(1 - p/100)`` fraction of each
timestep's values is kept between chunks.

Spikes are 0/1 while the ANN's activations are ~``thr_l`` times a firing rate, so a layer's
input current is the ANN's divided by the previous threshold. Without biases that scale is
absorbed by the next threshold; a BatchNorm's shift is not scaled with it (its running mean
and beta belong to the ANN's scale). With ``rescale_batchnorm`` (off by default), when a
convolution / linear layer that reads layer l's spikes is followed by a BatchNorm (VGG family:
modules run in the order they are registered), its weights are multiplied by ``thr_l`` once
``thr_l`` is set: the BatchNorm then sees the ANN's scale. On the Fashion-MNIST BatchNorm
convnet it raised the accuracy right after calibration (T = 4: 54% -> 82% validation) but
the SNN trained from it reached less after one BPTT epoch (89.9% against 92.8%;
docs/methods/diet.md), so the recipes leave it off.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from .models import SpikingNetwork
from .neuron import LIF


class _StopForward(Exception):
    """Raised by the recording hook once the calibrated layer's input is captured."""


def _top_values_per_step(current: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest values of each timestep of ``current [T, B, ...]`` -> ``[T, k']``, k' <= k."""
    flat = current.reshape(current.shape[0], -1)
    return torch.topk(flat, min(k, flat.shape[1]), dim=1).values


@torch.no_grad()
def layer_input_percentile(model: SpikingNetwork, lif: LIF, images: torch.Tensor,
                           percentile: float, chunk: int) -> float:
    """max over t of the ``percentile`` of ``lif``'s input current, over ``images [N, C, H, W]``."""
    captured: list[torch.Tensor] = []

    def record(_module, inputs):
        captured.append(inputs[0])
        raise _StopForward

    handle = lif.register_forward_pre_hook(record)
    kept, total = None, 0
    try:
        for start in range(0, images.shape[0], chunk):
            captured.clear()
            try:
                model(images[start:start + chunk])
            except _StopForward:
                pass
            current = captured[0]
            per_step = current[0].numel()
            total += per_step
            k = max(1, math.ceil((1.0 - percentile / 100.0) * images.shape[0] * per_step / current.shape[1]))
            top = _top_values_per_step(current, k)
            kept = top if kept is None else _top_values_per_step(torch.cat([kept, top], 1), k)
    finally:
        handle.remove()
    rank = max(1, math.ceil((1.0 - percentile / 100.0) * total))
    return kept[:, min(rank, kept.shape[1]) - 1].max().item()


def spike_scale_targets(model: SpikingNetwork) -> dict[str, nn.Module]:
    """``{LIF name: the conv/linear reading its spikes}`` where that layer is followed by a BatchNorm.

    Only for the VGG family, whose modules run in registration order (the ResNet's shortcuts do not);
    other families get ``{}``.
    """
    if model.spec.get("family") != "vgg":
        return {}
    targets, last_lif, pending = {}, None, None
    for name, module in model.named_modules():
        if len(list(module.children())):
            continue
        if isinstance(module, LIF):
            last_lif, pending = name, None
        elif isinstance(module, nn.Conv2d | nn.Linear):
            pending = module
        elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d) and pending is not None:
            if last_lif is not None:
                targets[last_lif] = pending
            pending = None
    return targets


def _scale_weight(module: nn.Module, factor: float) -> None:
    """Multiply ``module``'s stored weight by ``factor`` (under a mask parametrization: its original)."""
    if parametrize.is_parametrized(module, "weight"):
        module.parametrizations.weight.original.mul_(factor)
    else:
        module.weight.mul_(factor)


@torch.no_grad()
def calibrate_thresholds(model: SpikingNetwork, images: torch.Tensor, *, calib_timesteps: int = 100,
                         percentile: float = 99.7, scale: float = 1.0, chunk: int = 64,
                         rescale_batchnorm: bool = False) -> dict[str, float]:
    """Set every LIF threshold layer by layer, in forward order; returns ``{layer name: threshold}``.

    Args:
        model: the SNN (its weights copied from the trained ANN twin).
        images: calibration images ``[N, C, H, W]`` (paper: 512 training images).
        calib_timesteps: timesteps simulated during calibration (paper: 100).
        percentile: percentile of the input current (paper: 99.7).
        scale: factor applied to each threshold (paper: 0.2 for T = 5 on VGG16).
        chunk: images per forward pass (memory knob; the result does not depend on it).
        rescale_batchnorm: multiply a conv/linear layer that reads a calibrated layer's spikes and
            feeds a BatchNorm by that threshold (module docstring).

    Leaks are set to 1 (integrate-and-fire), the DIET starting point. The
    model's timesteps and train/eval mode are restored afterwards.
    """
    was_training, timesteps = model.training, model.timesteps
    model.set_spiking(True).eval()
    model.timesteps = calib_timesteps
    thresholds = {}
    rescale = spike_scale_targets(model) if rescale_batchnorm else {}
    try:
        for name, lif in model.spiking_layers():
            lif.leak.fill_(1.0)
            thr = layer_input_percentile(model, lif, images, percentile, chunk)
            if thr <= 0:  # the layer never gets positive input: keep its threshold
                thr = float(lif.threshold.mean()) / scale
            lif.threshold.fill_(thr * scale)
            thresholds[name] = thr * scale
            if name in rescale:
                _scale_weight(rescale[name], thr * scale)
    finally:
        model.timesteps = timesteps
        model.train(was_training)
    return thresholds
