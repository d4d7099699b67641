"""Sparse learning at a fixed density (AGC, docs/methods/agc.md step 3; sparse momentum, Dettmers & Zettlemoyer 2019).

Masks are the core's masks (:mod:`.masks`). Two variants:

* **irregular** (weight level) over the tensors ``names``: the initial mask keeps
  ``round(d * n_l)`` weights of every layer l (random, or the largest ``|w|``), so the
  total is within one weight per layer of ``d * N``. At every event, with prune rate p:

  1. prune: in each layer the ``round(p * live_l)`` live weights of smallest ``|w|``
     (ties: lower index) die; ``K`` = all pruned;
  2. redistribute: layer l gets the share ``M_l / sum M`` of ``K``, ``M_l`` the mean
     momentum magnitude over its live weights (largest remainders make the shares
     whole numbers summing to ``K``; a layer gets no more than it has dead weights,
     the excess goes to the others by the same shares);
  3. regrow: in each layer its share of dead weights with the largest momentum
     magnitude (ties: lower index) come alive at zero, with zeroed optimizer state.

  The live count is exactly unchanged by an event.
* **channel** (structured): the units are the channels of the core's channel groups
  (:func:`.structure.channel_groups`); a channel's mask covers its rows in every
  producing conv / linear weight and its BatchNorm weight and bias, so a dead
  channel outputs exact zeros and :func:`.structure.narrow_model` removes it without
  changing the logits. Pruning scores a channel by the L2 norm of its producing
  weights; a group's share by the mean momentum magnitude over its live channels'
  weights. A dead channel outputs exact zeros, so behind a ReLU its weights get no
  gradient at all: regrowth ranks dead channels by the momentum of the gradient
  reaching the channel's *activation* (read at the input of the layers consuming it,
  ``sum |dL/dA_c|`` per image) and a regrown channel restarts from the network's
  initialisation (conv ``N(0, sqrt(2 / (k k C_out)))``, linear ``N(0, 0.01)``; BN weight
  1, bias 0; at zero it would stay dead). The kept *channel* count is held.

The momentum is the SGD-style ``m = mu * m + g`` of the *dense* gradient ``g`` of the
effective weight (read by a hook on the mask's output: the gradient reaching the
stored weight is zero at dead positions). The prune rate decays with a cosine over
the training run: after epoch ``e`` of ``E``, ``p = p0 * (1 + cos(pi * e / E)) / 2``
(so no event after the last epoch). :class:`SparseMomentum` runs the events at the end
of each epoch and is resumable (momentum buffers and events in ``state_dict``); under
``torchrun`` the momentum is averaged over the ranks before each event, so every rank
makes the same masks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import distributed
from ..hooks import Callback, TrainState
from .importance import channel_energy
from .masks import WeightMask, find, get_mask, original, owner, set_mask, set_masks
from .pruning import global_magnitude, reset_optimizer_state_
from .structure import ChannelGroup, channel_groups


# ----------------------------------------------------------------------------- shared arithmetic


def cosine_prune_rate(epoch: int, epochs: int, initial: float = 0.5) -> float:
    """``initial * (1 + cos(pi * epoch / epochs)) / 2``: the prune rate after ``epoch`` (1-based) of ``epochs``."""
    return 0.5 * initial * (1.0 + math.cos(math.pi * min(epoch, epochs) / max(epochs, 1)))


def share_out(total: int, weights: list[float], capacity: list[int]) -> list[int]:
    """Split ``total`` into whole numbers proportional to ``weights`` (largest remainders), each <= ``capacity``.

    The excess over a capacity goes to the others by the same weights; all zero weights
    share equally. Sums to ``min(total, sum(capacity))``.
    """
    n = len(weights)
    out = [0] * n
    left = min(int(total), sum(capacity))
    open_ = [i for i in range(n) if capacity[i] > 0]
    while left > 0 and open_:
        w = [max(float(weights[i]), 0.0) for i in open_]
        if sum(w) <= 0:
            w = [1.0] * len(open_)
        exact = [left * x / sum(w) for x in w]
        part = [int(math.floor(e)) for e in exact]
        order = sorted(range(len(open_)), key=lambda j: (-(exact[j] - part[j]), j))
        for j in order[: left - sum(part)]:
            part[j] += 1
        for j, i in enumerate(open_):
            give = min(part[j], capacity[i] - out[i])
            out[i] += give
            left -= give
        open_ = [i for i in open_ if out[i] < capacity[i]]
    return out


def _top(scores: torch.Tensor, candidates: torch.Tensor, count: int, largest: bool) -> torch.Tensor:
    """Bool mask of ``count`` entries of flat ``candidates`` (bool) with the largest / smallest ``scores``; ties: lower index."""
    idx = torch.nonzero(candidates.flatten()).flatten()
    chosen = torch.zeros(candidates.numel(), dtype=torch.bool)
    if count > 0 and idx.numel():
        s = scores.flatten()[idx].to(torch.float64)
        order = torch.argsort(s, descending=largest, stable=True)
        chosen[idx[order[:count]]] = True
    return chosen.reshape(candidates.shape)


# ----------------------------------------------------------------------------- irregular


def init_weight_masks(model: nn.Module, names: list[str], density: float, how: str = "random",
                      seed: int = 0) -> None:
    """Mask the tensors in ``names`` at ``density`` (``how``: random, magnitude or global_magnitude).

    random / magnitude keep ``round(density * numel)`` weights of every tensor (at least one):
    random ones, or the largest ``|w|``. global_magnitude ranks ``|w|`` over all the tensors
    together and keeps the ``round(density * N)`` largest (ties: earlier tensor, lower index),
    so the total is exact and each layer keeps what its magnitudes earn (possibly none).
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if how not in ("random", "magnitude", "global_magnitude"):
        raise ValueError(f"how must be random, magnitude or global_magnitude, got {how!r}")
    if how == "global_magnitude":
        total = sum(original(*owner(model, name)).numel() for name in names)
        set_masks(model, global_magnitude(model, names, int(density * total + 0.5)))
        return
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        w = original(*owner(model, name)).detach().cpu()
        keep = max(1, int(density * w.numel() + 0.5))
        score = w.abs() if how == "magnitude" else torch.rand(w.shape, generator=gen)
        set_mask(model, name, _top(score, torch.ones(w.shape, dtype=torch.bool), keep, largest=True))


@torch.no_grad()
def prune_redistribute_regrow_(model: nn.Module, names: list[str], rate: float, momentum: dict[str, torch.Tensor],
                               optimizer: torch.optim.Optimizer | None = None) -> dict:
    """One irregular event (module docstring); returns ``{"rate", "pruned", "live_before", "live_after", "share"}``."""
    masks = {n: get_mask(model, n).cpu().clone() for n in names}
    weights = {n: original(*owner(model, n)).detach().cpu() for n in names}
    live_before = {n: int(m.sum()) for n, m in masks.items()}
    mean_mom = []
    for n in names:
        m = momentum[n].detach().cpu().abs()
        mean_mom.append(float(m[masks[n]].mean()) if live_before[n] else 0.0)
    pruned, after_prune = {}, {}
    for n in names:
        k = int(rate * live_before[n] + 0.5)
        dying = _top(weights[n].abs(), masks[n], k, largest=False)
        after_prune[n] = masks[n] & ~dying
        pruned[n] = int(dying.sum())
    total = sum(pruned.values())
    capacity = [int((~after_prune[n]).sum()) for n in names]
    share = share_out(total, mean_mom, capacity)
    for n, g in zip(names, share):
        grown = _top(momentum[n].detach().cpu().abs(), ~after_prune[n], g, largest=True)
        module, tensor = owner(model, n)
        stored = original(module, tensor)
        where = grown.to(stored.device)
        stored.masked_fill_(where, 0.0)
        reset_optimizer_state_(optimizer, stored, where)
        set_mask(model, n, after_prune[n] | grown)
    return {"rate": rate, "pruned": pruned, "live_before": live_before,
            "live_after": {n: int(get_mask(model, n).sum()) for n in names},
            "share": dict(zip(names, share)), "mean_momentum": dict(zip(names, mean_mom))}


# ----------------------------------------------------------------------------- channels


def group_tensors(model: nn.Module, group: ChannelGroup) -> tuple[list[str], list[str]]:
    """``(producing conv/linear weights, BatchNorm weights and biases)`` of ``group``: what its channel mask covers."""
    weights, norms = [], []
    for name in group.outputs:
        module = model.get_submodule(name)
        if isinstance(module, nn.Conv2d | nn.Linear):
            weights.append(f"{name}.weight")
        elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d) and module.affine:
            norms += [f"{name}.weight", f"{name}.bias"]
    return weights, norms


def channel_alive(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Bool ``[C]``: the group's live channels (its first producing weight's mask; all True without one)."""
    mask = get_mask(model, group_tensors(model, group)[0][0])
    return torch.ones(group.size, dtype=torch.bool) if mask is None else mask.flatten(1).any(1).cpu()


def set_channel_mask(model: nn.Module, group: ChannelGroup, alive: torch.Tensor) -> None:
    """Mask every tensor the group's channels own (rows of its weights, its BN weight and bias) to ``alive``."""
    weights, norms = group_tensors(model, group)
    for name in weights + norms:
        shape = original(*owner(model, name)).shape
        set_mask(model, name, alive.reshape(-1, *([1] * (len(shape) - 1))).expand(shape).clone())


def init_channel_masks(model: nn.Module, groups: list[ChannelGroup], density: float, how: str = "random",
                       seed: int = 0, min_channels: int = 1) -> None:
    """Keep ``max(min_channels, round(density * C))`` channels of every group (random, or largest weight norm)."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    gen = torch.Generator().manual_seed(seed)
    for g in groups:
        weights, _ = group_tensors(model, g)
        keep = min(g.size, max(min_channels, int(density * g.size + 0.5)))
        score = (channel_energy([original(*owner(model, n)) for n in weights]) if how == "magnitude"
                 else torch.rand(g.size, generator=gen))
        set_channel_mask(model, g, _top(score, torch.ones(g.size, dtype=torch.bool), keep, largest=True))


@torch.no_grad()
def _fresh_rows_(stored: torch.Tensor, module: nn.Module, where: torch.Tensor) -> None:
    """Draw the rows ``where`` (bool [C]) of a conv / linear weight from the network's initialisation."""
    if isinstance(module, nn.Conv2d):
        std = (2.0 / (module.kernel_size[0] * module.kernel_size[1] * module.out_channels)) ** 0.5
    else:
        std = 0.01
    rows = torch.nonzero(where.to(stored.device)).flatten()
    stored[rows] = torch.randn(stored[rows].shape, dtype=torch.float32).to(stored.device, stored.dtype) * std


@torch.no_grad()
def prune_regrow_channels_(model: nn.Module, groups: list[ChannelGroup], rate: float,
                           momentum: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None,
                           min_channels: int = 1, dead_scores: dict[str, torch.Tensor] | None = None) -> dict:
    """One channel event (module docstring); ``momentum`` keyed by producing weight name. Returns counts per group.

    ``dead_scores`` (``{group: [C]}``, the activation-gradient momentum) ranks the dead channels
    for regrowth; without it, the momentum norm of their producing weights does.
    """
    alive = {g.name: channel_alive(model, g) for g in groups}
    live_before = {k: int(v.sum()) for k, v in alive.items()}
    after, pruned, mean_mom, mom_norm = {}, {}, [], {}
    for g in groups:
        weights, _ = group_tensors(model, g)
        norm = channel_energy([original(*owner(model, n)) for n in weights]).sqrt()
        mom = [momentum[n].detach().cpu().to(torch.float64) for n in weights]
        mom_norm[g.name] = (dead_scores[g.name].detach().cpu().to(torch.float64)
                            if dead_scores is not None and g.name in dead_scores else channel_energy(mom).sqrt())
        per_weight = sum(m.abs().flatten(1).sum(1) for m in mom)
        count = sum(m[0].numel() for m in mom)
        live = alive[g.name]
        mean_mom.append(float(per_weight[live].sum() / (live.sum() * count)) if live.any() else 0.0)
        k = min(int(rate * live_before[g.name] + 0.5), max(live_before[g.name] - min_channels, 0))
        dying = _top(norm, live, k, largest=False)
        after[g.name], pruned[g.name] = live & ~dying, int(dying.sum())
    capacity = [int((~after[g.name]).sum()) for g in groups]
    share = share_out(sum(pruned.values()), mean_mom, capacity)
    for g, count in zip(groups, share):
        grown = _top(mom_norm[g.name], ~after[g.name], count, largest=True)
        weights, norms = group_tensors(model, g)
        for name in weights + norms:
            module, tensor = owner(model, name)
            stored = original(module, tensor)
            where = grown.to(stored.device).reshape(-1, *([1] * (stored.dim() - 1))).expand(stored.shape)
            if name in weights:
                _fresh_rows_(stored, module, grown)
            else:
                stored.masked_fill_(where, 1.0 if name.endswith(".weight") else 0.0)
            reset_optimizer_state_(optimizer, stored, where)
        set_channel_mask(model, g, after[g.name] | grown)
    return {"rate": rate, "pruned": pruned, "live_before": live_before,
            "live_after": {g.name: int(channel_alive(model, g).sum()) for g in groups},
            "share": {g.name: s for g, s in zip(groups, share)}, "mean_momentum": dict(zip([g.name for g in groups],
                                                                                       mean_mom))}


def live_channels(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    """``{group: ascending int64 indices of its live channels}`` (the ``keep`` of :func:`.structure.narrow_model`)."""
    return {g.name: torch.nonzero(channel_alive(model, g)).flatten() for g in groups}


# ----------------------------------------------------------------------------- the training callback


class SparseMomentum(Callback):
    """Sparse momentum at fixed density inside the training loop (module docstring).

    ``mode``: ``"irregular"`` over the masked tensors ``names`` or ``"channel"`` over
    ``groups`` (default: all of the model's channel groups). The masks must already be
    on the model (:func:`init_weight_masks` / :func:`init_channel_masks`) before the
    optimizer is made. Events run at the end of every epoch with the cosine prune rate
    from ``prune_rate``. Call :meth:`close` after training (removes the gradient hooks).
    """

    def __init__(self, mode: str = "irregular", names: list[str] | None = None,
                 groups: list[ChannelGroup] | None = None, prune_rate: float = 0.5, momentum: float = 0.9,
                 min_channels: int = 1):
        if mode not in ("irregular", "channel"):
            raise ValueError(f"mode must be irregular or channel, got {mode!r}")
        if not 0 <= prune_rate < 1 or not 0 <= momentum < 1:
            raise ValueError(f"need 0 <= prune_rate < 1 and 0 <= momentum < 1, got {prune_rate}, {momentum}")
        self.mode, self.names, self.groups = mode, list(names or []), groups
        self.prune_rate, self.mu, self.min_channels = float(prune_rate), float(momentum), int(min_channels)
        self.momentum: dict[str, torch.Tensor] = {}       # weight name -> [weight shape]; channel: also "act.<group>" -> [C]
        self.grads: dict[str, torch.Tensor] = {}
        self.events: list[dict] = []
        self.handles: list = []

    def tracked(self, model: nn.Module) -> list[str]:
        """The weights whose momentum is kept: ``names`` or every group's producing weights."""
        if self.mode == "irregular":
            return self.names
        if self.groups is None:
            self.groups = channel_groups(model)
        return [n for g in self.groups for n in group_tensors(model, g)[0]]

    def on_train_begin(self, state: TrainState) -> None:
        names, hooked = self.tracked(state.model), bool(self.handles)
        for name in names:
            module, tensor = owner(state.model, name)
            part = find(module, tensor, WeightMask)
            if part is None:
                raise ValueError(f"{name} has no mask: attach the masks before training")
            self.momentum.setdefault(name, torch.zeros_like(original(module, tensor).detach()))
            if not hooked:
                self.handles.append(part.register_forward_hook(self._hook(name)))
        if self.mode == "channel":
            for g in self.groups:
                self.momentum.setdefault(f"act.{g.name}", torch.zeros(g.size, device=state.device))
                for consumer, positions in g.inputs if not hooked else []:
                    hook = self._activation_hook(f"act.{g.name}", g.size)
                    self.handles.append(state.model.get_submodule(consumer).register_forward_pre_hook(hook))

    def _hook(self, name: str):
        def capture(module, inputs, output):
            if output.requires_grad:
                output.register_hook(lambda g: self._add(name, g))
        return capture

    def _activation_hook(self, key: str, channels: int):
        def capture(module, inputs):
            x = inputs[0]
            if x.requires_grad:
                x.register_hook(lambda g: self._add(key, g.detach().float().abs().reshape(
                    g.shape[0], channels, -1).sum((0, 2)) / g.shape[0]))
        return capture

    def _add(self, name: str, grad: torch.Tensor) -> None:
        g = grad.detach().float()
        self.grads[name] = g if name not in self.grads else self.grads[name] + g

    def after_backward(self, state: TrainState) -> None:
        for name, g in self.grads.items():
            m = self.momentum[name]
            m.mul_(self.mu).add_(g.to(m.device, m.dtype))
        self.grads = {}

    def on_epoch_end(self, state: TrainState, row: dict) -> None:
        epochs = max(int(state.config.epochs), 1)
        rate = cosine_prune_rate(state.epoch + 1, epochs, self.prune_rate)
        if rate > 0 and state.epoch + 1 < epochs:
            self._average_over_ranks()
            if self.mode == "irregular":
                stats = prune_redistribute_regrow_(state.model, self.names, rate, self.momentum, state.optimizer)
            else:
                dead = {g.name: self.momentum[f"act.{g.name}"] for g in self.groups}
                stats = prune_regrow_channels_(state.model, self.groups, rate, self.momentum, state.optimizer,
                                               self.min_channels, dead)
            self.events.append({"epoch": state.epoch + 1, **stats})
            row["regrown"] = sum(stats["share"].values())
        row["prune_rate"] = rate

    def _average_over_ranks(self) -> None:
        """Under torchrun each rank's hook saw its own shard's gradient: average (momentum is linear in it)."""
        if distributed.active():
            for m in self.momentum.values():
                torch.distributed.all_reduce(m)
                m.div_(distributed.world_size())

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def state_dict(self) -> dict:
        return {"events": self.events, **{f"momentum.{k}": v for k, v in self.momentum.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.events = list(state.get("events", []))
        for key, value in state.items():
            if key.startswith("momentum.") and key[9:] in self.momentum:
                self.momentum[key[9:]].copy_(value)
