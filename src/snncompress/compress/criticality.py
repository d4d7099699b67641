"""Criticality of spiking neurons and channels (CRIT, docs/methods/crit.md), from forward passes only.

A neuron is *critical* when its membrane potential sits close to threshold. With
``u`` the pre-reset potential ``[T, B, C, ...]`` of a LIF layer, ``thr`` its
threshold and ``x = u - thr``::

    derivative  (default)  s(x) = (a/2) / (1 + (pi/2 * a * x)^2)          atan surrogate derivative, a = 2
    soft_spike             s(x) = arctan(pi/2 * a * x) / pi + 1/2         the atan soft spike (the authors'
                                                                         unstructured code)

    channel score  c[ch] = mean over t and batch of ( max over spatial positions of s(x)[t, b, ch, ...] )
    channel_mean   c[ch] = mean over t, batch and spatial positions of s(x)[t, b, ch, ...]  (an option)
    neuron score   c[ch, h, w] = mean over t and batch of s(x)[t, b, ch, h, w]

Fully connected layers have no spatial positions: their channel score is the
neuron score. ``normalized=True`` uses ``x = u / thr - 1`` (the LIF's own
surrogate argument) instead of ``u - thr``; the two agree at ``thr = 1``.

:class:`CriticalityMeter` accumulates these scores over forward passes with a
hook on every LIF. It reads ``u`` where the fused kernels keep it
(:mod:`snncompress.kernels.membrane`): from the spikes' autograd node in a
training step (nothing recomputed), or one more fused forward pass in
inference; never the reference loop unless the layer itself runs it.
:func:`weight_units` names, for every conv/linear weight, the LIF layer whose
neurons its output channels feed (the unit whose criticality a weight inherits).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .. import distributed
from ..kernels.membrane import layer_membrane
from ..models import SpikingNetwork
from ..neuron import LIF
from .structure import channel_groups

SCORES = ("derivative", "soft_spike")
REDUCTIONS = ("channel", "channel_mean", "neuron")


def criticality_values(u: torch.Tensor, threshold: torch.Tensor | float, score: str = "derivative",
                       alpha: float = 2.0, normalized: bool = False) -> torch.Tensor:
    """Elementwise criticality ``s(x)`` of potentials ``u`` (any shape; ``threshold`` broadcasts against it)."""
    if score not in SCORES:
        raise ValueError(f"unknown criticality score {score!r}; choose one of {SCORES}")
    x = u / threshold - 1.0 if normalized else u - threshold
    y = (math.pi / 2.0 * alpha) * x
    if score == "derivative":
        return (alpha / 2.0) / (1.0 + y * y)
    return torch.atan(y) / math.pi + 0.5


def reduce_criticality(values: torch.Tensor, reduce: str = "channel") -> torch.Tensor:
    """``[T, B, C, ...]`` elementwise scores -> summed over t and batch: ``[C]`` (``channel``: max over space
    first; ``channel_mean``: mean over space first) or ``[C, ...]`` (``neuron``).

    Returns the *sum* over the ``T * B`` samples (divide by their count for the mean).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduce!r}; choose one of {REDUCTIONS}")
    if reduce == "channel" and values.dim() > 3:
        values = values.flatten(3).amax(dim=3)
    elif reduce == "channel_mean" and values.dim() > 3:
        values = values.flatten(3).mean(dim=3, dtype=torch.float64)
    return values.sum(dim=(0, 1), dtype=torch.float64)


def _threshold_like(lif: LIF, u: torch.Tensor) -> torch.Tensor:
    return lif._broadcast(lif.threshold.detach(), u.dim() - 1)


def layer_criticality(lif: LIF, u: torch.Tensor, score: str = "derivative", alpha: float = 2.0,
                      normalized: bool = False, reduce: str = "channel") -> torch.Tensor:
    """Mean criticality of one layer's potentials ``u`` ``[T, B, C, ...]``: ``[C]`` (channel) or ``[C, ...]`` (neuron)."""
    values = criticality_values(u, _threshold_like(lif, u), score, alpha, normalized)
    return reduce_criticality(values, reduce) / (u.shape[0] * u.shape[1])


class CriticalityMeter:
    """Accumulates every LIF layer's criticality over forward passes of ``model``.

    ``attach()`` registers a forward hook on every LIF; the hook counts a call when
    ``when()`` is true (default: always) and the model is spiking. ``step()`` (optional)
    gives the current training step: a layer is counted at most once per step, so a
    layer recomputed in backward (``checkpoint_layers``) is not counted twice.
    ``scores()`` gives ``{lif name: mean score}`` (summed over the ranks under torchrun);
    ``state_dict()`` / ``load_state_dict()`` carry the running sums (resumable training).
    """

    def __init__(self, model: SpikingNetwork, score: str = "derivative", alpha: float = 2.0,
                 normalized: bool = False, reduce: str = "channel",
                 when: Callable[[], bool] | None = None, step: Callable[[], int] | None = None):
        if score not in SCORES:
            raise ValueError(f"unknown criticality score {score!r}; choose one of {SCORES}")
        if reduce not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduce!r}; choose one of {REDUCTIONS}")
        self.model, self.score, self.alpha, self.normalized, self.reduce = model, score, float(alpha), normalized, reduce
        self.when, self.step = when, step
        self.layers = dict(model.spiking_layers())
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._seen: dict[str, int] = {}
        self._handles: list = []

    # -------------------------------------------------------------- hooks
    def attach(self) -> "CriticalityMeter":
        if not self._handles:
            self._handles = [lif.register_forward_hook(self._hook(name)) for name, lif in self.layers.items()]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "CriticalityMeter":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _hook(self, name: str):
        def hook(module: LIF, args, output):
            if not getattr(self.model, "spiking", True) or (self.when is not None and not self.when()):
                return
            if self.step is not None:
                step = self.step()
                if self._seen.get(name) == step:
                    return
                self._seen[name] = step
            self.add(name, layer_membrane(module, args[0], output))
        return hook

    # -------------------------------------------------------------- accumulation
    @torch.no_grad()
    def add(self, name: str, u: torch.Tensor) -> None:
        """Count layer ``name``'s potentials ``u`` ``[T, B, C, ...]``."""
        lif = self.layers[name]
        values = criticality_values(u.detach(), _threshold_like(lif, u), self.score, self.alpha, self.normalized)
        total = reduce_criticality(values, self.reduce).cpu()
        self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.counts[name] = self.counts.get(name, 0) + int(u.shape[0] * u.shape[1])

    def reset(self) -> None:
        self.sums, self.counts, self._seen = {}, {}, {}

    def scores(self) -> dict[str, torch.Tensor]:
        """``{lif name: mean criticality}`` (float64 ``[C]`` or ``[C, ...]``) of every layer counted so far."""
        names = [n for n in self.layers if n in self.sums]
        if distributed.active():
            flat = torch.cat([self.sums[n].reshape(-1) for n in names] + [torch.tensor(
                [float(self.counts[n]) for n in names], dtype=torch.float64)])
            flat = torch.tensor(distributed.all_reduce_sum(flat.tolist(), "cpu"), dtype=torch.float64)
            out, i = {}, 0
            for n in names:
                k = self.sums[n].numel()
                out[n] = flat[i:i + k].reshape(self.sums[n].shape)
                i += k
            return {n: out[n] / max(flat[i + j].item(), 1.0) for j, n in enumerate(names)}
        return {n: self.sums[n] / max(self.counts[n], 1) for n in names}

    def state_dict(self) -> dict:
        state = {f"sum.{n}": s for n, s in self.sums.items()}
        state.update({f"count.{n}": c for n, c in self.counts.items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.reset()
        for key, value in state.items():
            kind, _, name = key.partition(".")
            if kind == "sum":
                self.sums[name] = torch.as_tensor(value, dtype=torch.float64).clone()
            elif kind == "count":
                self.counts[name] = int(value)


@torch.no_grad()
def criticality_scores(model: SpikingNetwork, images: torch.Tensor, chunk: int = 64, score: str = "derivative",
                       alpha: float = 2.0, normalized: bool = False, reduce: str = "channel") -> dict[str, torch.Tensor]:
    """``{lif name: mean criticality}`` of ``model`` (SNN mode, eval) over ``images`` ``[N, C, H, W]``.

    Forward passes only, ``chunk`` images at a time; the model's mode is restored.
    """
    was_training = model.training
    model.eval()
    meter = CriticalityMeter(model, score, alpha, normalized, reduce)
    try:
        with meter:
            for part in images.split(chunk):
                model(part)
    finally:
        model.train(was_training)
    return meter.scores()


def weight_units(model: SpikingNetwork) -> dict[str, str]:
    """``{conv/linear weight name: LIF name}``: the spiking layer whose neurons the weight's output channels feed.

    Read from the channel groups (:func:`~.structure.channel_groups`): a conv or linear
    layer producing a group's channels feeds the first LIF listed after it among the
    group's modules (a ResNet block's ``conv2`` and its projection shortcut feed its
    ``lif2``). The output layer feeds no neuron and has no entry.
    """
    units = {}
    modules = dict(model.named_modules())
    for group in channel_groups(model):
        for i, name in enumerate(group.outputs):
            if isinstance(modules[name], nn.Conv2d | nn.Linear):
                lif = next((n for n in group.outputs[i + 1:] if isinstance(modules[n], LIF)), None)
                if lif is not None:
                    units[f"{name}.weight"] = lif
    return units
