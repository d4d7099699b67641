"""The Diehl & Cook (2015) network: tinySNN's unsupervised STDP network (docs/methods/tiny.md).

Layers (``N`` excitatory neurons, 784 = 28 x 28 inputs)::

    Poisson input [784] --W [N, 784], learned by STDP--> excitatory [N] (adaptive thresholds)
    excitatory --one-to-one, +exc--> inhibitory [N] --all but self, -inh--> excitatory   (inhibition: layer)
    excitatory --all but self, -inh--> excitatory                                         (inhibition: direct)

``inhibition: direct`` is FSpiNN's saving: the inhibitory layer goes, each excitatory spike
inhibits the other excitatory neurons one step later.

Units: potentials in mV *above rest* (rest = 0), time in steps of ``dt_ms``. The defaults are
BindsNET's ``DiehlAndCook2015`` (current-based LIF) as its MNIST example runs it (``inh`` = 120 mV;
the class default 17.5 reached 51% instead of 81% validation accuracy after 6,000 images): excitatory rest -65, reset -60, threshold
-52 mV, so reset = 5 and threshold = 13 above rest; refractory 5 ms; membrane time constant
100 ms; inhibitory rest -60, reset -45, threshold -40 mV (reset 15, threshold 20), 2 ms, 10 ms.

Equations per step ``t`` (tensors ``[B, N]``; ``I[t] = W @ x_in[t]`` in mV)::

    v[t]      = leak * v_hat[t-1] + active[t] * (I[t] - inh * (others' inhibitory spikes at t-1))
    active[t] = refractory countdown reached 0          (inputs are ignored while refractory)
    crossed   = v[t] >= threshold                       (threshold = 13 + theta, per neuron)
    v_hat[t]  = reset where crossed, else v[t];  countdown = refractory where crossed
    spikes    = crossed, or (one_spike) one crossed neuron per sample, drawn at random

``threshold`` holds the adaptive threshold ``13 + theta``; STDP training raises theta by
``theta_plus`` per spike (:mod:`snncompress.training.stdp`), inference keeps it fixed. The
DIET neuron of :mod:`snncompress.neuron` (``u = leak * u_hat + I``, reset to 0) does not fit:
this neuron resets to 5 mV above rest, is refractory and its threshold adapts; so it has its
own step, :meth:`ExcitatoryPopulation.step`.

Output: ``forward(images [B, 1, 28, 28] normalised) -> votes [B, classes]``: each class's mean
spike count over the neurons labelled with it (Diehl & Cook's vote; neurons without a label,
``labels == -1``, do not vote). ``labels`` are assigned after training from each neuron's
strongest mean response per class (:func:`snncompress.training.stdp.assign_labels`).

The ANN twin (``spiking=False``) keeps the weights and labels with ReLU in place of the
spiking layer: ``votes = class means of relu(W @ pixels)``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..neuron import POPULATION_KERNELS
from .base import FamilyOptions, SpikingNetwork

ARCH = "diehl_cook"



class DiehlCookOptions(FamilyOptions):
    """``model.options`` of ``arch: diehl_cook`` (defaults: BindsNET's ``DiehlAndCook2015``)."""

    neurons: int = Field(100, ge=1, le=100_000, description="excitatory neurons")
    inhibition: Literal["layer", "direct"] = Field(
        "layer", description="layer: Diehl & Cook's inhibitory layer; direct: FSpiNN's direct lateral inhibition")
    exc: float = Field(22.5, ge=0, description="excitatory -> inhibitory weight (mV)")
    inh: float = Field(120.0, ge=0, description="inhibitory -> excitatory (or direct lateral) weight (mV); "
                                                "BindsNET's MNIST example value (its class default 17.5 lets "
                                                "several neurons learn the same digit)")
    max_rate_hz: float = Field(128.0, gt=0, le=1000, description="Poisson rate of a white pixel")
    dt_ms: float = Field(1.0, gt=0, le=10, description="simulation step (ms)")
    one_spike: bool = Field(True, description="at most one excitatory spike per sample and step")
    threshold_mv: float = Field(13.0, gt=0, description="excitatory threshold above rest before adaptation")
    reset_mv: float = Field(5.0, description="excitatory reset above rest")
    tau_mem_ms: float = Field(100.0, gt=0)
    refractory_ms: float = Field(5.0, ge=0)
    inh_threshold_mv: float = Field(20.0, gt=0)
    inh_reset_mv: float = Field(15.0)
    inh_tau_mem_ms: float = Field(10.0, gt=0)
    inh_refractory_ms: float = Field(2.0, ge=0)
    init_max_weight: float = Field(0.3, gt=0, le=1, description="initial weights uniform in [0, this]")


def diehl_cook_spec(name: str, **options) -> dict:
    """The family part of the spec of ``arch: diehl_cook`` (validated options)."""
    opts = DiehlCookOptions(**options)
    return {"family": "stdp", **opts.model_dump(), "input_mean": [0.0], "input_std": [1.0]}


class SpikeCount(nn.Module):
    """Marks where a population's spike counts pass, for :class:`~snncompress.metrics.ops.SpikeMeter`.

    ``forward(counts [B, N], steps)`` returns ``counts``: spikes per neuron over ``steps`` timesteps.
    """

    counts_spikes = True

    def forward(self, counts: torch.Tensor, steps: int) -> torch.Tensor:
        return counts


class ExcitatoryPopulation(nn.Module):
    """Leaky neurons with adaptive thresholds and a refractory period (the module docstring's equations).

    ``threshold`` ``[N]`` (mV above rest, 13 + theta) and ``leak`` (per step, ``exp(-dt / tau)``) are
    buffers (learned by the STDP rule, not by gradients); ``state_quantizer`` (None or a fixed-point
    quantizer) rounds ``v_hat`` after every step, as tinySNN quantizes the membrane.
    """

    is_neuron = True

    def __init__(self, neurons: int, threshold: float, reset: float, leak: float, refractory_steps: int):
        super().__init__()
        self.register_buffer("threshold", torch.full((neurons,), float(threshold)))
        self.register_buffer("leak", torch.tensor(float(leak)))
        self.reset, self.refractory_steps = float(reset), int(refractory_steps)
        self.state_quantizer: nn.Module | None = None

    def step(self, v: torch.Tensor, countdown: torch.Tensor, current: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step on ``[B, N]``: returns ``(v_hat, countdown, crossed)`` (``crossed`` bool)."""
        active = countdown <= 0
        v = self.leak * v + torch.where(active, current, torch.zeros_like(current))
        crossed = v >= self.threshold
        v = torch.where(crossed, torch.full_like(v, self.reset), v)
        countdown = torch.where(crossed, torch.full_like(countdown, self.refractory_steps), countdown - 1)
        if self.state_quantizer is not None:
            v = self.state_quantizer(v)
        return v, countdown, crossed


class DiehlCookNetwork(SpikingNetwork):
    """The network of the module docstring; ``spec`` from :func:`diehl_cook_spec` plus data fields."""

    FAMILY = "stdp"
    ARCHS = (ARCH,)

    @classmethod
    def make_spec(cls, name: str, **options) -> dict:
        return diehl_cook_spec(name, **options)

    def __init__(self, spec: dict):
        super().__init__(spec)
        s = self.spec
        n, inputs = int(s["neurons"]), math.prod(int(v) for v in s["in_shape"])
        dt = float(s["dt_ms"])
        self.synapses = nn.Linear(inputs, n, bias=False)
        with torch.no_grad():
            self.synapses.weight.uniform_(0.0, float(s["init_max_weight"]))
        self.synapses.weight.requires_grad_(False)  # learned by STDP, not by gradients
        self.excitatory = ExcitatoryPopulation(n, s["threshold_mv"], s["reset_mv"],
                                               math.exp(-dt / float(s["tau_mem_ms"])),
                                               round(float(s["refractory_ms"]) / dt))
        self.register_buffer("labels", torch.full((n,), -1.0))  # class per neuron, -1 = none (float: stored)
        self.exc_spikes, self.inh_spikes = SpikeCount(), SpikeCount()
        self.generator: torch.Generator | None = None  # seeds Poisson draws and one_spike picks (training)

    # ------------------------------------------------------------------ sizes and input

    @property
    def neurons(self) -> int:
        return int(self.spec["neurons"])

    @property
    def num_classes(self) -> int:
        return int(self.spec["num_classes"])

    def set_input_normalisation(self, mean, std) -> "DiehlCookNetwork":
        """Record the data's normalisation so :meth:`pixels` can undo it; returns self."""
        self.spec["input_mean"], self.spec["input_std"] = [float(m) for m in mean], [float(v) for v in std]
        return self

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images ``[B, C, H, W]`` -> intensities in [0, 1], ``[B, C*H*W]``."""
        mean = torch.tensor(self.spec["input_mean"], device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.spec["input_std"], device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        return (images * std + mean).clamp(0.0, 1.0).flatten(1)

    def spike_probability(self, pixels: torch.Tensor, extra_rate_hz: float = 0.0) -> torch.Tensor:
        """Per-step Poisson spike probability of each input ``[B, 784]`` (rate x dt, at most 1)."""
        rate = pixels * float(self.spec["max_rate_hz"]) + extra_rate_hz * (pixels > 0)
        return (rate * float(self.spec["dt_ms"]) / 1000.0).clamp(max=1.0)

    def input_spikes(self, probability: torch.Tensor, steps: int) -> torch.Tensor:
        """Bernoulli input spikes ``[steps, B, 784]`` (float 0/1)."""
        shape = (steps, *probability.shape)
        rand = torch.rand(shape, device=probability.device, generator=self.generator)
        return (rand < probability).to(probability.dtype)

    # ------------------------------------------------------------------ simulation

    def initial_state(self, batch: int, device) -> dict:
        """Fresh state of both populations for ``batch`` samples: every entry ``[B, N]`` float32 zeros.

        ``v``/``countdown`` (excitatory potential above rest, refractory steps left), ``inh_v``/
        ``inh_countdown`` (inhibitory layer), ``exc_last``/``inh_last`` (last step's spikes), and the
        spike counts so far, ``counts``/``inh_counts``.
        """
        names = ("v", "countdown", "inh_v", "inh_countdown", "inh_last", "exc_last", "counts", "inh_counts")
        return {k: torch.zeros(batch, self.neurons, device=device) for k in names}

    def constants(self) -> dict:
        """The inhibition's constants from the spec (mV, steps) and the two switches."""
        s, dt = self.spec, float(self.spec["dt_ms"])
        return {"inh": float(s["inh"]), "exc": float(s["exc"]), "inh_leak": math.exp(-dt / float(s["inh_tau_mem_ms"])),
                "inh_threshold": float(s["inh_threshold_mv"]), "inh_reset": float(s["inh_reset_mv"]),
                "inh_refractory": float(round(float(s["inh_refractory_ms"]) / dt)),
                "layer": s["inhibition"] == "layer", "one_spike": bool(s["one_spike"])}

    def run_steps(self, state: dict, currents: torch.Tensor, theta_plus: float = 0.0,
                  x_post: torch.Tensor | None = None, trace_keep: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run ``k`` steps from feed-forward ``currents`` ``[k, B, N]`` (mV); updates ``state`` in place.

        Training passes ``theta_plus`` (after each step, every neuron's threshold rises by this much
        per sample in which it crossed) and the post-synaptic trace ``x_post`` ``[B, N]`` (updated in
        place: 1 on a spike, else ``x * trace_keep``). Returns ``(spikes [k, B, N], traces [k, B, N]
        or None)``. On CPU float32 the C kernel runs the loop; elsewhere the tensor loop does.
        """
        noise = (torch.rand(currents.shape, device=currents.device, generator=self.generator)
                 if self.spec["one_spike"] else None)
        kernel = POPULATION_KERNELS.get("cpu")
        result = kernel(self, state, currents, noise, theta_plus, x_post, trace_keep) if kernel else None
        if result is not None:
            return result
        return self.run_steps_torch(state, currents, noise, theta_plus, x_post, trace_keep)

    def run_steps_torch(self, state, currents, noise, theta_plus=0.0, x_post=None, trace_keep=0.0):
        """:meth:`run_steps` with tensor operations (any device); ``noise`` ``[k, B, N]`` picks the one spike."""
        c = self.constants()
        threshold = self.excitatory.threshold
        spikes_out, traces_out = [], []
        for t in range(currents.shape[0]):
            source = state["inh_last"] if c["layer"] else state["exc_last"]
            inhibition = c["inh"] * (source.sum(1, keepdim=True) - source)
            v, countdown, crossed = self.excitatory.step(state["v"], state["countdown"], currents[t] - inhibition)
            spikes = crossed
            if noise is not None:  # one spike per sample: the crossed neuron with the largest noise
                pick = torch.where(crossed, noise[t], torch.full_like(noise[t], -1.0)).argmax(1, keepdim=True)
                spikes = torch.zeros_like(crossed).scatter_(1, pick, True) & crossed
            if c["layer"]:
                self.inhibitory_step(state, c)
            spikes = spikes.to(v.dtype)
            state["v"], state["countdown"], state["exc_last"] = v, countdown, spikes
            state["counts"] += spikes
            if theta_plus:
                threshold.copy_(threshold + crossed.to(v.dtype).sum(0) * theta_plus)
            if x_post is not None:
                x_post.copy_(torch.where(spikes > 0, torch.ones_like(x_post), x_post * trace_keep))
                traces_out.append(x_post.clone())
            spikes_out.append(spikes)
        return torch.stack(spikes_out), (torch.stack(traces_out) if x_post is not None else None)

    @staticmethod
    def inhibitory_step(state: dict, c: dict) -> None:
        """The inhibitory layer's step: driven one-to-one by last step's excitatory spikes."""
        active = state["inh_countdown"] <= 0
        v = c["inh_leak"] * state["inh_v"] + active * (c["exc"] * state["exc_last"])
        crossed = v >= c["inh_threshold"]
        state["inh_v"] = torch.where(crossed, torch.full_like(v, c["inh_reset"]), v)
        state["inh_countdown"] = torch.where(crossed, torch.full_like(v, c["inh_refractory"]),
                                             state["inh_countdown"] - 1)
        state["inh_last"] = crossed.to(v.dtype)
        state["inh_counts"] += state["inh_last"]

    def simulate(self, probability: torch.Tensor, steps: int | None = None, chunk: int = 25) -> torch.Tensor:
        """Run the frozen network on input probabilities ``[B, 784]``; returns spike counts ``[B, N]``.

        Input currents are computed ``chunk`` steps at a time (one matmul per chunk).
        """
        steps = self.timesteps if steps is None else steps
        state = self.initial_state(probability.shape[0], probability.device)
        for start in range(0, steps, chunk):
            k = min(chunk, steps - start)
            self.run_steps(state, self.synapses(self.input_spikes(probability, k)))  # synaptic ops counted here
        self.exc_spikes(state["counts"], steps)
        if self.spec["inhibition"] == "layer":
            self.inh_spikes(state["inh_counts"], steps)
        return state["counts"]

    # ------------------------------------------------------------------ read-out

    def votes(self, activity: torch.Tensor) -> torch.Tensor:
        """Per-neuron activity ``[B, N]`` -> class votes ``[B, classes]``: each class's mean over its neurons."""
        onehot = (self.labels.unsqueeze(1) == torch.arange(self.num_classes, device=activity.device)).to(activity.dtype)
        per_class = onehot.sum(0).clamp(min=1.0)
        return activity @ onehot / per_class

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` (normalised) -> votes ``[B, classes]`` (SNN: spike counts; ANN: ReLU)."""
        pixels = self.pixels(images)
        if not self.spiking:
            return self.votes(torch.relu(self.synapses(pixels)))
        if self.generator is not None:
            return self.votes(self.simulate(self.spike_probability(pixels)))
        # no generator set: the same images draw the same input spikes in every call (evaluations comparable)
        self.generator = torch.Generator(device=images.device).manual_seed(int(self.spec.get("eval_seed", 0)))
        try:
            return self.votes(self.simulate(self.spike_probability(pixels)))
        finally:
            self.generator = None

    def run_layers(self, x, has_time):  # pragma: no cover - forward is overridden
        raise NotImplementedError


DiehlCookNetwork.Options = DiehlCookOptions
