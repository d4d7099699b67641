"""Unsupervised STDP training of the Diehl & Cook network (:mod:`snncompress.models.stdp`), docs/methods/tiny.md.

The rule (pair-based with traces, BindsNET's ``PostPre``), per synapse ``w[j, i]`` from input ``i``
to excitatory neuron ``j``::

    x_pre[i]  <- x_pre[i] * exp(-dt / tau_trace), set to 1 when input i spikes
    x_post[j] <- x_post[j] * exp(-dt / tau_trace), set to 1 when neuron j spikes
    dw[j, i]  = nu_post * x_pre[i] * s_post[j]      (potentiation, at a post spike)
              - nu_pre  * s_pre[i] * x_post[j]      (depression, at a pre spike)
    w         <- clamp(w + dw, 0, w_max)            (every ``update_every`` steps; 0 = once per sample)
    w[j, :]   <- w[j, :] * norm / sum_i w[j, i]     (after every sample: each neuron's inputs sum to norm)
    theta[j]  <- theta[j] + theta_plus per threshold crossing, decaying with tau_theta

Samples in flight: ``samples_in_flight`` images are presented at once with the same weights; their
weight changes add up (each sample's own changes are those of the rule) and theta rises by all
their crossings. One in flight is Diehl & Cook's sequential protocol.

Weight updates are applied every ``update_every`` steps: 1 is the per-step rule; a longer interval
(FSpiNN's fewer weight updates; 0 = once per sample) sums the same terms computed with the weights
of the interval's start, one matmul each for potentiation and depression instead of one per step.

Options of FSpiNN (as we implement them): ``adaptive_potentiation`` scales a sample's potentiation
by ``min(k_max, max(1, target_spikes / its excitatory spikes))``, so weakly driven samples still
teach (potentiation is then applied once, at the sample's end); the inhibition variant lives on the network (``inhibition: direct``).

Quantized learning (tinySNN / Q-SpiNN): with ``weight_bits`` the weights live on the grid of a
:class:`~snncompress.compress.quantizers.PowerOfTwoQuantizer` (scale from ``w_max``) and every
update (and normalisation) is rounded back onto it with ``rounding``: ``nearest``, ``truncate``
(``floor``: updates smaller than a step never land, depression always does) or ``stochastic``
(an update of a fraction of a step lands with that probability, so on average it is kept).

Labels: :func:`assign_labels` runs the frozen network on labelled training images and gives each
neuron the class of its highest mean spike count (silent neurons: -1, no vote).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from ..compress.quantizers import PowerOfTwoQuantizer, attach_quantizer
from ..models.stdp import DiehlCookNetwork


@dataclass
class STDPConfig:
    """The learning options (defaults: BindsNET's ``DiehlAndCook2015``, one sample at a time)."""

    samples: int = 60_000             # training images presented (the loader is cycled)
    samples_in_flight: int = 1
    nu_pre: float = 1e-4              # depression per pre spike x post trace
    nu_post: float = 1e-2             # potentiation per post spike x pre trace
    w_max: float = 1.0
    norm: float = 78.4                # each neuron's input weights sum to this after every sample
    theta_plus: float = 0.05          # mV per threshold crossing
    tau_theta_ms: float = 1e7
    tau_trace_ms: float = 20.0
    update_every: int = 1             # steps between weight updates; 0 = once per sample
    adaptive_potentiation: bool = False
    target_spikes: float = 5.0        # adaptive potentiation: samples with fewer spikes learn up to k_max x
    k_max: float = 4.0
    min_spikes: int = 0               # Diehl & Cook: re-present a sample that drew fewer spikes ...
    rate_step_hz: float = 32.0        # ... with this much more input rate per repeat
    max_presentations: int = 5
    weight_bits: int | None = None    # quantized learning: weights on a fixed-point grid of this many bits
    rounding: str = "stochastic"      # nearest | truncate | stochastic
    seed: int = 0

    def __post_init__(self):
        if self.rounding not in ("nearest", "truncate", "stochastic", "half_up"):
            raise ValueError(f"rounding must be nearest, half_up, truncate or stochastic, got {self.rounding!r}")
        if self.samples < 1 or self.samples_in_flight < 1 or self.update_every < 0:
            raise ValueError("samples and samples_in_flight must be >= 1, update_every >= 0")


def decay(tau_ms: float, dt_ms: float, steps: int = 1) -> float:
    """``exp(-steps * dt / tau)``: what a trace or potential keeps after ``steps`` steps."""
    return math.exp(-steps * dt_ms / tau_ms)


def pre_traces(spikes: torch.Tensor, carry: torch.Tensor, keep: float) -> torch.Tensor:
    """Traces ``[k, B, I]`` of spikes ``[k, B, I]`` (0/1), starting from ``carry`` ``[B, I]`` before step 0.

    ``x[t] = keep * x[t-1]``, set to 1 where ``spikes[t]``; computed without a loop over t:
    ``x[t] = keep^(t - last spike)`` after a spike, ``carry * keep^(t + 1)`` before any.
    """
    k = spikes.shape[0]
    if k == 1:  # the per-step rule: the definition itself is cheaper than the closed form
        return torch.where(spikes > 0, torch.ones_like(spikes), carry.unsqueeze(0) * keep)
    steps = torch.arange(k, device=spikes.device, dtype=spikes.dtype).view(k, *([1] * (spikes.dim() - 1)))
    last = torch.where(spikes > 0, steps, torch.full_like(spikes, -1.0)).cummax(0).values
    powers = keep ** (steps - last)
    return torch.where(last >= 0, powers, carry.unsqueeze(0) * keep ** (steps + 1))


def add_stdp_(weight: torch.Tensor, s_pre: torch.Tensor, x_pre: torch.Tensor, s_post: torch.Tensor,
              x_post: torch.Tensor, nu_pre: float, nu_post: float) -> torch.Tensor:
    """Add the rule's change, summed over ``k`` steps and ``B`` samples, to ``weight`` ``[N, I]`` in place.

    ``s_pre``/``x_pre`` ``[k, B, I]`` input spikes and traces, ``s_post``/``x_post`` ``[k, B, N]``
    excitatory spikes and traces (after each step's spikes):
    ``+ nu_post * sum_t s_post[t]^T x_pre[t] - nu_pre * sum_t x_post[t]^T s_pre[t]`` (one matmul each,
    accumulated into ``weight`` without a temporary).
    """
    k, batch = s_pre.shape[:2]
    flat = lambda x: x.reshape(k * batch, -1)  # noqa: E731
    weight.addmm_(flat(x_post).t(), flat(s_pre), alpha=-nu_pre)
    if nu_post:
        weight.addmm_(flat(s_post).t(), flat(x_pre), alpha=nu_post)
    return weight


def stdp_change(s_pre, x_pre, s_post, x_post, nu_pre: float, nu_post: float) -> torch.Tensor:
    """The change :func:`add_stdp_` adds, as a new ``[N, I]`` tensor."""
    change = torch.zeros(s_post.shape[-1], s_pre.shape[-1], dtype=s_pre.dtype, device=s_pre.device)
    return add_stdp_(change, s_pre, x_pre, s_post, x_post, nu_pre, nu_post)


def normalise_(weight: torch.Tensor, norm: float) -> None:
    """Scale each row of ``weight`` ``[N, I]`` (a neuron's inputs) to sum to ``norm`` (all-zero rows stay)."""
    sums = weight.sum(1, keepdim=True)
    weight.mul_(torch.where(sums > 0, norm / sums, torch.ones_like(sums)))


class WeightGrid:
    """Quantized learning: keeps weights on a fixed-point grid (``bits``, scale fitting ``w_max``)."""

    def __init__(self, bits: int, rounding: str, w_max: float, generator: torch.Generator):
        self.quantizer = PowerOfTwoQuantizer(bits, rounding)
        self.quantizer.update_scale(torch.tensor([w_max]))
        self.quantizer.generator = generator

    def snap_(self, weight: torch.Tensor) -> None:
        weight.copy_(self.quantizer.quantize(weight, stochastic=True))

    def attach(self, model: DiehlCookNetwork) -> None:
        """Attach the grid's quantizer to the model's weights, so the footprint counts ``bits`` per weight."""
        q = PowerOfTwoQuantizer(self.quantizer.bits, self.quantizer.rounding)
        q.scale.copy_(self.quantizer.scale)
        attach_quantizer(model, "synapses.weight", q, calibrate=False)


@dataclass
class LearnStats:
    samples: int = 0
    presentations: int = 0
    excitatory_spikes: float = 0.0
    weight_updates: int = 0           # times the weight matrix was written
    seconds: float = 0.0


class STDPLearner:
    """Presents batches of images to a :class:`DiehlCookNetwork` and applies the rule of the module docstring."""

    def __init__(self, model: DiehlCookNetwork, config: STDPConfig):
        self.model, self.cfg = model, config
        dt = float(model.spec["dt_ms"])
        self.trace_keep = decay(config.tau_trace_ms, dt)
        self.theta_keep = decay(config.tau_theta_ms, dt)
        self.rest_threshold = float(model.spec["threshold_mv"])
        self.generator = torch.Generator(device=model.synapses.weight.device).manual_seed(config.seed)
        model.generator = self.generator
        self.grid = (WeightGrid(config.weight_bits, config.rounding, config.w_max, self.generator)
                     if config.weight_bits else None)
        self.stats = LearnStats()
        with torch.no_grad():
            weight = model.synapses.weight
            normalise_(weight, config.norm)
            if self.grid:
                self.grid.snap_(weight)

    @torch.no_grad()
    def present(self, pixels: torch.Tensor, extra_rate_hz: float = 0.0) -> torch.Tensor:
        """One presentation of ``pixels`` ``[B, 784]`` with learning; returns spike counts ``[B, N]``."""
        model, cfg = self.model, self.cfg
        weight, threshold = model.synapses.weight, model.excitatory.threshold
        steps, batch = model.timesteps, pixels.shape[0]
        interval = cfg.update_every or steps
        probability = model.spike_probability(pixels, extra_rate_hz)
        state = model.initial_state(batch, pixels.device)
        x_pre = torch.zeros_like(probability)
        x_post = torch.zeros(batch, model.neurons, device=pixels.device)
        per_sample_gain = (torch.zeros(batch, *weight.shape, device=weight.device)
                           if cfg.adaptive_potentiation else None)
        for start in range(0, steps, interval):
            k = min(interval, steps - start)
            s_pre = model.input_spikes(probability, k)              # [k, B, I]
            traces = pre_traces(s_pre, x_pre, self.trace_keep)      # [k, B, I]
            x_pre = traces[-1]
            currents = s_pre @ weight.t()                            # [k, B, N]
            s_post, post_traces = model.run_steps(state, currents, cfg.theta_plus, x_post, self.trace_keep)
            nu_post = cfg.nu_post
            if per_sample_gain is not None:  # scaled per sample at the end (needs the sample's spike count)
                per_sample_gain += torch.einsum("kbn,kbi->bni", s_post, traces)
                nu_post = 0.0
            add_stdp_(weight, s_pre, traces, s_post, post_traces, cfg.nu_pre, nu_post)
            self._bound(weight)
            threshold.sub_(self.rest_threshold).mul_(self.theta_keep ** k).add_(self.rest_threshold)
        if per_sample_gain is not None:
            factor = (cfg.target_spikes / state["counts"].sum(1).clamp(min=1.0)).clamp(1.0, cfg.k_max)
            weight.add_(torch.einsum("b,bni->ni", factor, per_sample_gain), alpha=cfg.nu_post)
            self._bound(weight)
        counts = state["counts"]
        normalise_(weight, cfg.norm)
        if self.grid:
            self.grid.snap_(weight)
        self.stats.presentations += batch
        self.stats.excitatory_spikes += float(counts.sum())
        return counts

    def _bound(self, weight: torch.Tensor) -> None:
        """After an update: clamp to [0, w_max], back onto the grid when learning quantized."""
        weight.clamp_(0.0, self.cfg.w_max)
        if self.grid:
            self.grid.snap_(weight)
        self.stats.weight_updates += 1

    def learn(self, pixels: torch.Tensor) -> torch.Tensor:
        """Present ``pixels`` ``[B, 784]``; re-present samples with fewer than ``min_spikes`` spikes at a higher
        rate (Diehl & Cook), up to ``max_presentations``; returns the last counts ``[B, N]``."""
        counts = self.present(pixels)
        cfg = self.cfg
        weak = counts.sum(1) < cfg.min_spikes
        repeat = 1
        while bool(weak.any()) and repeat < cfg.max_presentations:
            counts[weak] = self.present(pixels[weak], extra_rate_hz=cfg.rate_step_hz * repeat)
            weak = counts.sum(1) < cfg.min_spikes
            repeat += 1
        self.stats.samples += pixels.shape[0]
        return counts

    def finish(self) -> None:
        """After learning: inference draws from its own seeded streams again; quantized learning leaves its
        quantizer on the weights."""
        self.model.generator = None
        if self.grid:
            self.grid.attach(self.model)


def image_batches(loader: Iterable, count: int, batch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` of ``batch`` images at a time, ``count`` in all, cycling ``loader``'s epochs."""
    seen, epoch = 0, 0
    while seen < count:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for images, labels in loader:
            for start in range(0, images.shape[0], batch):
                take = min(batch, count - seen, images.shape[0] - start)
                yield images[start:start + take], labels[start:start + take]
                seen += take
                if seen >= count:
                    return
        epoch += 1


def train_stdp(model: DiehlCookNetwork, loader: Iterable, config: STDPConfig, device="cpu",
               log: Callable[[str], None] = print, log_every: int = 5000, clock=time.perf_counter,
               check_every: int | None = None, check: Callable[[int], None] | None = None) -> LearnStats:
    """Learn ``model``'s weights and thresholds from ``config.samples`` images of ``loader`` (labels unused).

    With ``check_every`` and ``check``, ``check(samples so far)`` runs after every ``check_every`` samples
    (and at the end) with learning paused and inference's own random streams; its time is not counted
    in ``seconds``.
    """
    model.to(device).eval()
    learner = STDPLearner(model, config)
    start, next_log, paused = clock(), log_every, 0.0
    next_check = check_every if check and check_every else None
    for images, _ in image_batches(loader, config.samples, config.samples_in_flight):
        learner.learn(model.pixels(images.to(device)))
        if learner.stats.samples >= next_log:
            rate = learner.stats.samples / max(clock() - start - paused, 1e-9)
            log(f"[stdp] {learner.stats.samples}/{config.samples} samples, {rate:.1f} samples/s, "
                f"{learner.stats.excitatory_spikes / learner.stats.presentations:.1f} spikes/presentation")
            next_log += log_every
        if next_check is not None and learner.stats.samples >= next_check < config.samples:
            paused += _paused(model, check, learner.stats.samples, clock)
            next_check += check_every
    learner.finish()
    learner.stats.seconds = clock() - start - paused
    if check is not None and check_every:
        check(learner.stats.samples)
    return learner.stats


def _paused(model: DiehlCookNetwork, check: Callable[[int], None], samples: int, clock) -> float:
    """Run ``check`` with the model's training generator set aside; returns the seconds it took."""
    kept, model.generator = model.generator, None
    start = clock()
    try:
        check(samples)
    finally:
        model.generator = kept
    return clock() - start


@torch.no_grad()
def class_responses(model: DiehlCookNetwork, loader: Iterable, count: int, device="cpu", batch: int = 500
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen spike counts: ``(mean count per class and neuron [classes, N], images per class [classes])``."""
    model.to(device).eval()
    sums = torch.zeros(model.num_classes, model.neurons, device=device)
    seen = torch.zeros(model.num_classes, device=device)
    for images, labels in image_batches(loader, count, batch):
        counts = model.simulate(model.spike_probability(model.pixels(images.to(device))))
        onehot = torch.nn.functional.one_hot(labels.to(device), model.num_classes).to(counts.dtype)
        sums += onehot.t() @ counts
        seen += onehot.sum(0)
    return sums / seen.clamp(min=1).unsqueeze(1), seen


def labels_from_responses(responses: torch.Tensor) -> torch.Tensor:
    """``[classes, N]`` mean responses -> label per neuron ``[N]`` (float; -1 where the neuron never spiked)."""
    best = responses.argmax(0).to(torch.float32)
    return torch.where(responses.sum(0) > 0, best, torch.full_like(best, -1.0))


def assign_labels(model: DiehlCookNetwork, loader: Iterable, count: int, device="cpu") -> dict:
    """Label every neuron by its strongest class response on ``count`` images of ``loader``; returns figures."""
    responses, seen = class_responses(model, loader, count, device)
    model.labels.copy_(labels_from_responses(responses))
    labelled = model.labels >= 0
    per_class = [int(((model.labels == c) & labelled).sum()) for c in range(model.num_classes)]
    return {"label_images": int(seen.sum()), "labelled_neurons": int(labelled.sum()), "neurons_per_class": per_class}
