"""Unstructured pruning: the cubic schedule, global magnitude pruning, criticality-guided regeneration (CRIT,
docs/methods/crit.md), and iterative magnitude pruning with weight rewinding (the lottery-ticket baseline).

Every pruned tensor carries a core mask (:mod:`.masks`); a weight is *live* where its
mask is True. With ``N`` prunable weights (every conv / linear weight unless excluded):

* **cubic schedule**: ``K = steps // dt`` pruning events at steps ``k * dt`` (k = 1..K;
  a step = one optimizer step), target sparsity ``s_k = s_f (1 - (1 - k/K)^3)``, so
  ``s_K = s_f``; after event k exactly ``kept(s_k) = N - round(s_k N)`` weights are live.
* **global magnitude pruning**: the ``kept`` weights of largest ``|w|`` over all prunable
  tensors (ties: the earlier tensor, then the lower flat index).
* **regeneration** (ratio ``r``): magnitude keeps ``kept - round(r kept)``; the other
  ``round(r kept)`` are regrown among the weights magnitude left out, by the criticality
  of the neuron/channel they feed (:func:`.criticality.weight_units`); ties (all weights
  of one unit) go to the larger ``|w|`` before the event, then the lower index; weights
  of the output layer (no neuron) come last. Regrown weights restart at zero, and so do
  their optimizer moments. Two options (:func:`regrowth`): ``normalize`` makes the unit
  scores comparable across layers before the global pick (``mean``: divided by the
  layer's mean; ``rank``: the fraction of the layer's units scoring at most as high),
  and ``budget: per_layer`` splits the regrowth over the layers in proportion to the live
  weights each lost to magnitude in this event (the criticality ranks within a layer).
  ``decay`` (:func:`regrow_ratios`): ``r`` at every event (the paper), or annealed by a cosine to
  0 at the last event, as GraNet and RigL anneal their prune-and-regrow fraction, so the
  final mask holds no weight regrown at zero that fine-tuning has to grow back.
  ``regrow_by: random`` is the control that asks whether criticality matters: the same
  count regrown uniformly at random among the weights magnitude left out (SET's regrowth),
  from a generator seeded per event, so no forward pass is scored.
* **IMP** (:func:`imp_sparsities`): each round prunes a fraction ``rate`` of the live
  weights by global magnitude (the last round stops at ``s_f``), rewinds the live weights
  to the rewind point and retrains.

:class:`PruneRegrow` runs the schedule inside the training loop (``after_step``), scoring
criticality over the last ``score_steps`` training steps before each event from the
forward passes the loop makes anyway; :class:`StepCost` counts optimizer steps and
images. Both are resumable (``state_dict``).
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from .. import distributed
from ..hooks import Callback, TrainState
from .criticality import CriticalityMeter, weight_units
from .masks import get_mask, original, owner, set_mask, set_masks


# ----------------------------------------------------------------------------- schedule and counts


def cubic_sparsity(k: int, events: int, final: float) -> float:
    """Target sparsity after event ``k`` of ``events``: ``final * (1 - (1 - k/events)^3)`` (0 at k = 0)."""
    if events < 1 or not 0 <= k <= events:
        raise ValueError(f"event {k} of {events}: need 1 <= events and 0 <= k <= events")
    return final * (1.0 - (1.0 - k / events) ** 3)


def cubic_schedule(final: float, dt: int, steps: int) -> list[tuple[int, float]]:
    """``[(step, sparsity)]`` of every event: ``K = steps // dt`` events, event k after step ``k * dt``."""
    if dt < 1:
        raise ValueError(f"dt must be >= 1, got {dt}")
    events = steps // dt
    return [(k * dt, cubic_sparsity(k, events, final)) for k in range(1, events + 1)]


DECAYS = ("constant", "cosine")


def regrow_ratios(ratio: float, events: int, decay: str = "constant") -> list[float]:
    """The regeneration ratio of events 1..K: ``ratio`` each (constant), or
    ``ratio * (1 + cos(pi k / K)) / 2`` (cosine: below ``ratio`` from the first event, 0 at the last)."""
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    if decay == "constant":
        return [ratio] * events
    return [ratio * (1.0 + math.cos(math.pi * k / events)) / 2.0 for k in range(1, events + 1)]


REGROW_BY = ("criticality", "random")


def random_weight_scores(model: nn.Module, names: list[str], seed: int) -> dict[str, torch.Tensor]:
    """Regrowth scores of the random control: i.i.d. uniform in [0, 1), float64, each weight's shape,
    from a generator seeded with ``seed`` (the global torch RNG is left alone)."""
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.rand(original(*owner(model, n)).shape, generator=generator, dtype=torch.float64) for n in names}


def kept_count(total: int, sparsity: float) -> int:
    """Live weights at ``sparsity``: ``total - round(sparsity * total)`` (halves round up)."""
    return total - int(sparsity * total + 0.5)


def imp_sparsities(final: float, rate: float) -> list[float]:
    """Sparsity after each IMP round: each round prunes ``rate`` of the live weights, the last stops at ``final``.

    ``1 - (1 - rate)^j`` for j = 1, 2, ... while below ``final``, then ``final``.
    """
    if not 0 < rate < 1 or not 0 < final < 1:
        raise ValueError(f"need 0 < rate < 1 and 0 < final < 1, got rate {rate}, final {final}")
    out, density = [], 1.0
    while True:
        density *= 1.0 - rate
        if 1.0 - density >= final - 1e-12:
            return out + [final]
        out.append(1.0 - density)


# ----------------------------------------------------------------------------- masks on a model


def prunable_weights(model: nn.Module, exclude=()) -> list[str]:
    """Names of every conv / linear weight of ``model`` (module order), minus ``exclude``."""
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    unknown = set(exclude) - set(names)
    if unknown:
        raise ValueError(f"exclude: no conv/linear weight named {sorted(unknown)}; weights: {names}")
    return [n for n in names if n not in set(exclude)]


def attach_masks(model: nn.Module, names: list[str]) -> None:
    """Give every tensor in ``names`` an all-True mask unless it has one (before the optimizer is made)."""
    for name in names:
        if get_mask(model, name) is None:
            set_mask(model, name, torch.ones_like(original(*owner(model, name)), dtype=torch.bool))


def effective_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight as the forward pass sees it before quantization: stored values times mask (detached)."""
    values = original(*owner(model, name)).detach()
    mask = get_mask(model, name)
    return values if mask is None else values * mask.to(values.dtype)


def live_count(model: nn.Module, names: list[str]) -> int:
    """Weights under a True mask (a tensor without a mask counts whole)."""
    total = 0
    for name in names:
        mask = get_mask(model, name)
        total += int(mask.sum()) if mask is not None else original(*owner(model, name)).numel()
    return total


def _split(flat: torch.Tensor, shapes: list[torch.Size], names: list[str]) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, shape in zip(names, shapes):
        n = shape.numel()
        out[name] = flat[start:start + n].reshape(shape)
        start += n
    return out


def global_magnitude(model: nn.Module, names: list[str], keep: int) -> dict[str, torch.Tensor]:
    """Bool masks keeping the ``keep`` weights of largest ``|w|`` over ``names`` (ties: earlier tensor, lower index)."""
    values = [effective_weight(model, n) for n in names]
    flat = torch.cat([v.abs().flatten().cpu() for v in values])
    order = torch.argsort(flat, descending=True, stable=True)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order[:keep]] = True
    return _split(chosen, [v.shape for v in values], names)


def weight_scores(model: nn.Module, names: list[str], unit_scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each weight's regrowth score: the criticality of the unit its output channel feeds, ``-inf`` without one.

    ``unit_scores``: ``{LIF name: [C] channel criticality}`` (:class:`.criticality.CriticalityMeter`).
    """
    units = weight_units(model)
    out = {}
    for name in names:
        w = original(*owner(model, name))
        lif = units.get(name)
        if lif is None or lif not in unit_scores:
            out[name] = torch.full(w.shape, float("-inf"), dtype=torch.float64)
            continue
        per_channel = unit_scores[lif].to(torch.float64).cpu().reshape(-1)
        if per_channel.numel() != w.shape[0]:
            raise ValueError(f"{name}: {w.shape[0]} output channels but {lif} has {per_channel.numel()} scores")
        out[name] = per_channel.reshape(-1, *([1] * (w.dim() - 1))).expand(w.shape)
    return out


NORMALIZATIONS = ("none", "mean", "rank")
BUDGETS = ("global", "per_layer")


def normalize_unit_scores(unit_scores: dict[str, torch.Tensor], how: str = "none") -> dict[str, torch.Tensor]:
    """Unit criticality made comparable across layers before the global regrowth pick.

    ``none``: as measured; ``mean``: each layer's scores divided by that layer's mean (a layer
    whose mean is 0 keeps its zeros); ``rank``: each unit's fraction of its layer's units scoring
    at most as high (the layer's most critical unit: 1; tied units share one value).
    """
    if how not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {how!r}; choose one of {NORMALIZATIONS}")
    if how == "none":
        return dict(unit_scores)
    out = {}
    for name, raw in unit_scores.items():
        s = raw.to(torch.float64)
        if how == "mean":
            mean = s.mean()
            out[name] = s / mean if mean > 0 else s.clone()
        else:
            flat = s.reshape(-1)
            at_most = torch.searchsorted(torch.sort(flat).values, flat, right=True)
            out[name] = (at_most.to(torch.float64) / flat.numel()).reshape(s.shape)
    return out


def _largest_remainder(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights`` (integers summing to ``total``; ties: the earlier entry)."""
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    counts = [int(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:total - sum(counts)]:
        counts[i] += 1
    return counts


def regrowth(model: nn.Module, names: list[str], kept: dict[str, torch.Tensor], count: int,
             scores: dict[str, torch.Tensor], budget: str = "global") -> dict[str, torch.Tensor]:
    """Bool masks of the ``count`` weights to regrow among those ``kept`` leaves out.

    Order: higher ``scores`` (unit criticality) first, then larger ``|w|`` (as stored
    before this event), then the earlier tensor and lower index. ``budget: global`` takes
    the first ``count`` of that order over all tensors; ``per_layer`` first gives each
    tensor with unit scores a share of ``count`` proportional to its *lost* weights (live
    before this event, left out by ``kept``; largest remainders), takes each share in the
    same order within the tensor, and fills any rest globally.
    """
    if budget not in BUDGETS:
        raise ValueError(f"unknown regrowth budget {budget!r}; choose one of {BUDGETS}")
    shapes = [kept[n].shape for n in names]
    pruned = torch.cat([~kept[n].flatten().cpu() for n in names])
    score = torch.cat([scores[n].flatten() for n in names])
    magnitude = torch.cat([effective_weight(model, n).abs().flatten().cpu().to(torch.float64) for n in names])
    candidates = torch.nonzero(pruned).flatten()
    by_magnitude = candidates[torch.argsort(magnitude[candidates], descending=True, stable=True)]
    ranked = by_magnitude[torch.argsort(score[by_magnitude], descending=True, stable=True)]
    chosen = torch.zeros(pruned.numel(), dtype=torch.bool)
    if budget == "per_layer":
        layer = torch.cat([torch.full((kept[n].numel(),), i) for i, n in enumerate(names)])
        scored = [i for i, n in enumerate(names) if torch.isfinite(scores[n]).all()]
        lost = []
        for i in scored:
            mask = get_mask(model, names[i])
            live = mask.flatten().cpu() if mask is not None else torch.ones(kept[names[i]].numel(), dtype=torch.bool)
            lost.append(int((live & ~kept[names[i]].flatten().cpu()).sum()))
        if sum(lost):
            for i, share in zip(scored, _largest_remainder(min(count, sum(lost)), lost)):
                chosen[ranked[layer[ranked] == i][:share]] = True
        rest = count - int(chosen.sum())
        if rest > 0:
            chosen[ranked[~chosen[ranked]][:rest]] = True
        return _split(chosen, shapes, names)
    chosen[ranked[:count]] = True
    return _split(chosen, shapes, names)


@torch.no_grad()
def reset_optimizer_state_(optimizer: torch.optim.Optimizer | None, param: torch.Tensor, where: torch.Tensor) -> None:
    """Zero every per-element optimizer state of ``param`` (Adam moments, SGD momentum) at ``where`` (bool)."""
    if optimizer is None:
        return
    for value in optimizer.state.get(param, {}).values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.masked_fill_(where.to(value.device), 0)


@torch.no_grad()
def prune_and_regrow_(model: nn.Module, names: list[str], sparsity: float, regrow_ratio: float = 0.0,
                      unit_scores: dict[str, torch.Tensor] | None = None,
                      optimizer: torch.optim.Optimizer | None = None, normalize: str = "none",
                      budget: str = "global", random_seed: int | None = None) -> dict:
    """One pruning event: masks with exactly ``kept_count(N, sparsity)`` live weights over ``names``.

    Magnitude keeps ``kept - round(regrow_ratio * kept)``; the rest is regrown by unit
    criticality (:func:`regrowth`; ``normalize``: :func:`normalize_unit_scores`, ``budget``:
    global or per layer), or uniformly at random when ``random_seed`` is given
    (:func:`random_weight_scores`; ``unit_scores`` and ``normalize`` unused), and set to zero,
    with its optimizer state. Returns ``{"sparsity", "live", "regrown", "regrown_by_layer"}``.
    """
    total = sum(original(*owner(model, n)).numel() for n in names)
    keep = kept_count(total, sparsity)
    regrow = int(regrow_ratio * keep + 0.5) if regrow_ratio > 0 else 0
    masks = global_magnitude(model, names, keep - regrow)
    grown = {n: torch.zeros_like(m) for n, m in masks.items()}
    if regrow:
        scores = (random_weight_scores(model, names, random_seed) if random_seed is not None
                  else weight_scores(model, names, normalize_unit_scores(unit_scores or {}, normalize)))
        grown = regrowth(model, names, masks, regrow, scores, budget)
    for name in names:
        module, tensor = owner(model, name)
        stored = original(module, tensor)
        where = grown[name].to(stored.device)
        stored.masked_fill_(where, 0.0)  # regrown weights restart at zero
        reset_optimizer_state_(optimizer, stored, where)
    set_masks(model, {n: masks[n] | grown[n] for n in names})
    return {"sparsity": sparsity, "live": keep, "regrown": regrow,
            "regrown_by_layer": {n: int(g.sum()) for n, g in grown.items() if g.any()}}


def rewind_(model: nn.Module, state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    """Load the rewind point ``state`` (a ``state_dict``) into ``model``, then apply ``masks`` (pruned values zeroed)."""
    model.load_state_dict(state)
    set_masks(model, masks)


# ----------------------------------------------------------------------------- training callbacks


class StepCost(Callback):
    """Counts optimizer steps and training images (summed over the ranks) of one training run."""

    def __init__(self):
        self.steps, self.images = 0, 0

    def loss(self, state, images, labels, logits, loss):
        self.images += int(labels.numel())
        return loss

    def after_step(self, state: TrainState) -> None:
        self.steps += 1

    def totals(self, device="cpu") -> dict:
        images = distributed.all_reduce_sum([float(self.images)], device)[0]
        return {"iterations": self.steps, "images": int(images)}

    def state_dict(self) -> dict:
        return {"steps": self.steps, "images": self.images}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.images = int(state.get("steps", 0)), int(state.get("images", 0))


class PruneRegrow(Callback):
    """Gradual pruning with criticality regeneration inside the training loop (see the module docstring).

    Events at steps ``k * dt`` of this training run (``K = total_steps // dt``); criticality
    is the mean over the last ``score_steps`` training forward passes before each event
    (all ``dt`` when None), and only before events that regrow. ``regrow_ratio = 0`` is
    plain gradual magnitude pruning (no scoring at all); ``decay`` (:func:`regrow_ratios`)
    sets the ratio of each event; ``regrow_by: random`` regrows at random instead of by
    criticality (no scoring; event ``k`` at step ``s`` draws from a generator seeded with
    ``seed * 1_000_003 + s``). Call :meth:`close` after training (removes the hooks).
    ``events`` lists what each event did.
    """

    def __init__(self, names: list[str], final_sparsity: float, dt: int, regrow_ratio: float = 0.2,
                 score: str = "derivative", alpha: float = 2.0, normalized: bool = False,
                 score_steps: int | None = None, reduce: str = "channel", normalize: str = "none",
                 budget: str = "global", decay: str = "constant", regrow_by: str = "criticality", seed: int = 0):
        if not 0 <= regrow_ratio < 1:
            raise ValueError(f"regrow_ratio must be in [0, 1), got {regrow_ratio}")
        if (normalize not in NORMALIZATIONS or budget not in BUDGETS or decay not in DECAYS
                or regrow_by not in REGROW_BY):
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, budget one of {BUDGETS}, decay one of "
                             f"{DECAYS} and regrow_by one of {REGROW_BY}, got {normalize!r}, {budget!r}, {decay!r}, "
                             f"{regrow_by!r}")
        self.names, self.final, self.dt, self.regrow_ratio = list(names), float(final_sparsity), int(dt), regrow_ratio
        self.decay, self.regrow_by, self.seed = decay, regrow_by, int(seed)
        self.score_opts = {"score": score, "alpha": alpha, "normalized": normalized, "reduce": reduce}
        self.normalize, self.budget = normalize, budget
        self.window = min(self.dt, score_steps or self.dt)
        self.events: list[dict] = []
        self.schedule: list[tuple[int, float]] = []
        self.meter: CriticalityMeter | None = None
        self.state: TrainState | None = None

    def on_train_begin(self, state: TrainState) -> None:
        self.state = state
        self.schedule = cubic_schedule(self.final, self.dt, state.total_steps)
        if not self.schedule:
            raise ValueError(f"dt: {self.dt} steps is longer than the pruning phase ({state.total_steps} steps); "
                             f"no pruning event would happen")
        self._plan(state.total_steps)
        if self.regrow_ratio > 0 and self.regrow_by == "criticality" and self.meter is None:
            self.meter = CriticalityMeter(state.model, **self.score_opts, when=self._scoring,
                                          step=lambda: self.state.step).attach()

    def _plan(self, steps: int) -> None:
        """Each event's step, sparsity and regeneration ratio for a pruning phase of ``steps``."""
        self._at = {step: (sparsity, ratio) for (step, sparsity), ratio in
                    zip(self.schedule, regrow_ratios(self.regrow_ratio, len(self.schedule), self.decay))}
        self._planned = steps

    def _scoring(self) -> bool:
        """True while the loop runs a training step in the window before an event that regrows."""
        step = self.state.step
        upcoming = self._at.get((step // self.dt + 1) * self.dt)
        return (self.state.model.training and upcoming is not None and upcoming[1] > 0
                and step % self.dt >= self.dt - self.window)

    def after_step(self, state: TrainState) -> None:
        if state.total_steps != self._planned:  # the loop shortened its schedule (a time budget): so does this
            self.schedule = cubic_schedule(self.final, self.dt, state.total_steps) or self.schedule[:1]
            self._plan(state.total_steps)
        done = state.step + 1
        if done not in self._at:
            return
        start = time.perf_counter()
        sparsity, ratio = self._at[done]
        scores = self.meter.scores() if self.meter is not None else {}
        random_seed = self.seed * 1_000_003 + done if self.regrow_by == "random" else None
        stats = prune_and_regrow_(state.model, self.names, sparsity, ratio, scores, state.optimizer,
                                  self.normalize, self.budget, random_seed)
        if self.meter is not None:
            self.meter.reset()
        self.events.append({"step": done, "regrow_ratio": ratio, **stats, "seconds": time.perf_counter() - start})

    def on_epoch_end(self, state: TrainState, row: dict) -> None:
        row["live_weights"] = live_count(state.model, self.names)

    def close(self) -> None:
        if self.meter is not None:
            self.meter.detach()
            self.meter = None

    def state_dict(self) -> dict:
        state = {"events": self.events}
        if self.meter is not None:
            state.update({f"meter.{k}": v for k, v in self.meter.state_dict().items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.events = list(state.get("events", []))
        if self.meter is not None:
            self.meter.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("meter.")})
