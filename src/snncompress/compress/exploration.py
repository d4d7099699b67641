"""tinySNN's design-space exploration (docs/methods/tiny.md): which parameter group tolerates which precision under
which rounding, and the smallest model within a memory limit and an accuracy-drop limit.

Groups (each with its own bit widths):

=============  ======================================================================================
``weights``    every conv / linear weight: :class:`~.quantizers.PowerOfTwoQuantizer` (fixed point
               Q(i.f), ``i`` from the tensor's range; ``format="fixed"``) or
               :class:`~.quantizers.UniformQuantizer` (``format="uniform"``, STP's quant_sweep), per
               tensor or per output channel
``neurons``    every LIF's ``threshold`` and ``leak`` (:class:`~.quantizers.PowerOfTwoQuantizer`, per
               tensor)
``state``      every LIF's membrane potential after reset, at every timestep of the simulation
               (``LIF.state_quantizer``: :class:`~.quantizers.FixedPointQuantizer` Q(i.f) with ``i`` the
               integer bits of ``state_range`` x the layer's largest threshold; saturating)
=============  ======================================================================================

A :class:`Candidate` is one scheme (``ptq``: quantize the float model; ``itq``: quantize, then train
with the quantized forward pass) x one rounding x one bit width per group. :func:`explore` runs:

1. **Sensitivity** (PTQ): each group alone, each rounding, bit widths from high to low. A group
   that fails at ``b`` bits with a rounding is not tried below ``b`` with it (dominated branch
   pruned). This is the tolerance table (group x bits x rounding).
2. **Joint** (PTQ): every combination of each group's passing widths (per rounding), within the
   memory limit, in order of memory; the first within the accuracy limit is the smallest model
   and ends the search (everything after it is larger).
3. **ITQ** (optional): the ``itq_candidates`` smallest joint candidates that failed under PTQ and
   are smaller than the PTQ choice are trained with ``train(model, candidate)`` and re-evaluated.

Memory is what the checkpoint stores (:func:`~snncompress.compress.footprint.footprint`): codes at
their width plus one float32 scale per tensor (per channel), with or without one membrane
potential per neuron at the state width (32 bits when the state is not quantized). Stochastic
rounding is drawn once with a generator seeded by ``space.seed`` (the same model every time);
in eval mode a state quantizer rounds to nearest (a stored model computes the same output every
time), so stochastic state rounding only exists in ITQ training and is left out of PTQ.

The library never reads files or stages: ``evaluate(model) -> accuracy`` and ``train`` are given.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .footprint import footprint
from .quantizers import (ROUNDINGS, FixedPointQuantizer, PowerOfTwoQuantizer, UniformQuantizer, attach_quantizer,
                         scale_channels, snap_to_grid_, weight_names)

GROUPS = ("weights", "neurons", "state")
SCHEMES = ("ptq", "itq")
FORMATS = ("fixed", "uniform")


@dataclass(frozen=True)
class Candidate:
    """One point of the design space: ``bits`` is ``((group, bits), ...)`` in :data:`GROUPS` order."""

    bits: tuple[tuple[str, int], ...]
    rounding: str = "nearest"
    scheme: str = "ptq"

    @classmethod
    def of(cls, bits: dict[str, int], rounding: str = "nearest", scheme: str = "ptq") -> "Candidate":
        unknown = set(bits) - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown groups {sorted(unknown)}; choose from {GROUPS}")
        return cls(tuple((g, int(bits[g])) for g in GROUPS if g in bits), rounding, scheme)

    def get(self, group: str) -> int | None:
        return dict(self.bits).get(group)

    @property
    def label(self) -> str:
        widths = " ".join(f"{g[0]}{b}" for g, b in self.bits) or "float"
        return f"{self.scheme} {self.rounding} {widths}"

    def as_dict(self) -> dict:
        return {"scheme": self.scheme, "rounding": self.rounding, "bits": dict(self.bits), "label": self.label}


@dataclass
class QuantSpace:
    """The design space: bit widths per group (high to low), roundings, schemes and how groups are quantized."""

    bits: dict[str, list[int]]
    roundings: list[str] = field(default_factory=lambda: ["nearest", "truncate", "stochastic"])
    schemes: list[str] = field(default_factory=lambda: ["ptq"])
    per_channel: bool = False        # weights: one scale per output channel
    format: str = "fixed"            # weights: "fixed" (power-of-two scale) or "uniform" (max|w| / q_max)
    state_range: float = 2.0         # state saturates at +-(this x the layer's largest threshold), rounded up to 2^i
    seed: int = 0                    # stochastic rounding draws
    itq_candidates: int = 1
    max_candidates: int = 500        # cap on joint evaluations

    def __post_init__(self):
        bad = set(self.bits) - set(GROUPS)
        if bad or not self.bits:
            raise ValueError(f"groups must be among {GROUPS}, got {sorted(self.bits)}")
        if any(r not in ROUNDINGS for r in self.roundings) or not self.roundings:
            raise ValueError(f"roundings must be among {ROUNDINGS}, got {self.roundings}")
        if any(s not in SCHEMES for s in self.schemes) or "ptq" not in self.schemes:
            raise ValueError(f"schemes must include ptq and be among {SCHEMES}, got {self.schemes}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        self.bits = {g: sorted(set(int(b) for b in self.bits[g]), reverse=True) for g in GROUPS if g in self.bits}

    def roundings_for(self, group: str, scheme: str = "ptq") -> list[str]:
        """Roundings that differ for ``group``: an eval-mode state quantizer never draws (see the module docstring)."""
        if group == "state" and scheme == "ptq":
            return [r for r in self.roundings if r != "stochastic"]
        return list(self.roundings)


# ----------------------------------------------------------------------------- building candidates


def state_quantizer(lif: nn.Module, bits: int, rounding: str, state_range: float) -> FixedPointQuantizer:
    """Q(i.f) of ``bits`` bits for ``lif``'s membrane: ``2^i >= state_range * max threshold``, ``f = bits - 1 - i``."""
    peak = float(lif.threshold.detach().abs().max()) * state_range
    int_bits = math.ceil(math.log2(peak)) if peak > 0 else 0
    return FixedPointQuantizer(int_bits, bits - 1 - int_bits, rounding)


def _weight_quantizer(space: QuantSpace, bits: int, rounding: str, tensor: torch.Tensor):
    cls = PowerOfTwoQuantizer if space.format == "fixed" else UniformQuantizer
    return cls(bits, rounding, channels=scale_channels(tensor, space.per_channel))


def quantize_model(model: nn.Module, candidate: Candidate, space: QuantSpace) -> nn.Module:
    """A copy of ``model`` with ``candidate``'s quantizers attached (eval mode); ``model`` is untouched.

    Stochastic rounding is drawn here, once, from a generator seeded with ``space.seed``.
    """
    model = copy.deepcopy(model).eval()
    layers = [(n, m) for n, m in model.named_modules() if hasattr(m, "state_quantizer")]
    rounding = candidate.rounding
    for group, bits in candidate.bits:
        if group == "weights":
            for name in weight_names(model):
                tensor = model.get_submodule(name.rpartition(".")[0]).weight
                attach_quantizer(model, name, _weight_quantizer(space, bits, rounding, tensor))
        elif group == "neurons":
            for name, _ in layers:
                for attr in ("threshold", "leak"):
                    attach_quantizer(model, f"{name}.{attr}", PowerOfTwoQuantizer(bits, rounding))
        elif group == "state":
            for _, lif in layers:
                lif.state_quantizer = state_quantizer(lif, bits, rounding, space.state_range).to(
                    lif.threshold.device)
    if rounding == "stochastic":
        snap_to_grid_(model, generator=torch.Generator().manual_seed(space.seed))
    return model


def memory_bytes(model: nn.Module, neurons: dict[str, int] | None) -> tuple[int, int]:
    """``(bytes without state, bytes with state)`` the checkpoint of ``model`` stores (state: 1 value/neuron)."""
    fp = footprint(model, include_state=True, neurons_per_layer=neurons or {})
    return math.ceil((fp["bits"] - fp["by_kind"]["state"]) / 8), fp["bytes"]


# ----------------------------------------------------------------------------- results


def pareto_front(points: list, memory: Callable, accuracy: Callable) -> list:
    """The points no other point beats on both: smaller ``memory(p)`` and higher ``accuracy(p)``, by memory."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (memory(p), -accuracy(p))):
        if accuracy(p) > best:
            front.append(p)
            best = accuracy(p)
    return front


@dataclass
class Evaluated:
    candidate: Candidate
    accuracy: float
    bytes: int                 # stored, without membrane state
    bytes_with_state: int
    phase: str                 # "baseline", "sensitivity", "joint", "itq"
    passed: bool               # accuracy >= baseline - max drop
    fits: bool                 # memory <= limit
    seconds: float = 0.0

    def memory(self, include_state: bool) -> int:
        return self.bytes_with_state if include_state else self.bytes

    def as_dict(self) -> dict:
        return {**self.candidate.as_dict(), "val_accuracy": self.accuracy, "bytes": self.bytes,
                "bytes_with_state": self.bytes_with_state, "phase": self.phase, "passed": self.passed,
                "fits": self.fits, "seconds": round(self.seconds, 3)}


@dataclass
class Exploration:
    baseline: Evaluated
    evaluated: list[Evaluated]
    chosen: Evaluated | None
    include_state: bool
    max_accuracy_drop: float
    max_memory_bytes: int | None
    pruned: dict[str, int]
    chosen_model: nn.Module | None = None
    space: QuantSpace | None = None

    def front(self) -> list[Evaluated]:
        """The Pareto front of memory (lower) against validation accuracy (higher), baseline included."""
        return pareto_front([self.baseline, *self.evaluated], lambda e: e.memory(self.include_state),
                            lambda e: e.accuracy)

    def tolerance(self) -> dict[str, dict[str, dict[int, float | None]]]:
        """``{group: {rounding: {bits: val accuracy, or None when pruned}}}`` from the sensitivity phase."""
        table: dict = {}
        sens = [e for e in self.evaluated if e.phase == "sensitivity"]
        for group, widths in (self.space.bits.items() if self.space else []):
            for rounding in self.space.roundings_for(group):
                found = {e.candidate.get(group): e.accuracy for e in sens
                         if e.candidate.rounding == rounding and e.candidate.get(group) is not None}
                table.setdefault(group, {})[rounding] = {b: found.get(b) for b in widths}
        return table

    def nothing_fits(self) -> str:
        """One line saying why no candidate was chosen."""
        within = [e for e in self.evaluated if e.passed]
        limit = f"{self.max_memory_bytes / 1024:.1f} KiB" if self.max_memory_bytes is not None else "no limit"
        what = "with" if self.include_state else "without"
        if within:
            small = min(within, key=lambda e: e.memory(self.include_state))
            return (f"no candidate fits: the smallest within {self.max_accuracy_drop * 100:g} points of the float "
                    f"model's validation accuracy ({small.candidate.label}) needs "
                    f"{small.memory(self.include_state) / 1024:.1f} KiB {what} state, the limit is {limit}")
        return (f"no candidate fits: none of {len(self.evaluated)} evaluated stays within "
                f"{self.max_accuracy_drop * 100:g} points of the float model's validation accuracy "
                f"({self.baseline.accuracy:.4f}); memory limit {limit}")


# ----------------------------------------------------------------------------- the search


class _Progress:
    """Counts evaluations against an announced upper bound and prints an ETA."""

    def __init__(self, log: Callable[[str], None], clock: Callable[[], float]):
        self.log, self.clock, self.done, self.seconds = log, clock, 0, 0.0

    def timed(self, fn):
        start = self.clock()
        out = fn()
        spent = self.clock() - start
        self.done += 1
        self.seconds += spent
        return out, spent

    def eta(self, left: int) -> str:
        if not self.done:
            return "eta ?"
        s = int(round(self.seconds / self.done * max(left, 0)))
        return f"eta <= {s // 60}m{s % 60:02d}s"


def explore(model: nn.Module, space: QuantSpace, evaluate: Callable[[nn.Module], float], *,
            max_accuracy_drop: float, max_memory_bytes: int | None = None, include_state: bool = False,
            neurons: dict[str, int] | None = None, train: Callable[[nn.Module, Candidate], nn.Module] | None = None,
            log: Callable[[str], None] = print, clock: Callable[[], float] = time.perf_counter) -> Exploration:
    """Search ``space`` (see the module docstring); ``evaluate`` reads the validation split only.

    Returns an :class:`Exploration` whose ``chosen`` is the smallest candidate within both limits
    (None when nothing fits: see :meth:`Exploration.nothing_fits`) and ``chosen_model`` its model.
    """
    if "itq" in space.schemes and train is None:
        raise ValueError("scheme itq needs a train function")
    progress = _Progress(log, clock)
    mem = lambda m: memory_bytes(m, neurons)  # noqa: E731
    base_acc, spent = progress.timed(lambda: float(evaluate(model)))
    progress.done, progress.seconds = 0, 0.0  # the float model runs faster than a state-quantized one
    floor = base_acc - max_accuracy_drop
    fits = lambda b, bs: max_memory_bytes is None or (bs if include_state else b) <= max_memory_bytes  # noqa: E731
    baseline = Evaluated(Candidate(()), base_acc, *mem(model), "baseline", True, fits(*mem(model)), spent)
    log(f"[quantize] float model: val accuracy {base_acc:.4f}, {baseline.bytes / 1024:.1f} KiB "
        f"({baseline.bytes_with_state / 1024:.1f} KiB with state); accept >= {floor:.4f}")
    evaluated: list[Evaluated] = []
    pruned = {"fewer_bits_after_failure": 0, "over_memory_limit": 0, "after_smallest_found": 0, "capped": 0}

    def run(candidate: Candidate, phase: str, built: nn.Module | None = None, total: int = 0) -> Evaluated:
        known = next((e for e in evaluated if e.candidate == candidate), None)
        if known is not None:
            return known  # a joint candidate that leaves all groups but one float was a sensitivity candidate
        qmodel = built if built is not None else quantize_model(model, candidate, space)
        acc, seconds = progress.timed(lambda: float(evaluate(qmodel)))
        b, bs = mem(qmodel)
        e = Evaluated(candidate, acc, b, bs, phase, acc >= floor, fits(b, bs), seconds)
        evaluated.append(e)
        log(f"[quantize] {phase} {progress.done}/{total}: {candidate.label}: val {acc:.4f} "
            f"{'ok' if e.passed else 'FAIL'}, {b / 1024:.1f} KiB ({bs / 1024:.1f} with state); "
            f"{progress.eta(total - progress.done)}")
        return e

    # 1. sensitivity: each group alone, bits high to low, stop a (group, rounding) at its first failure
    plan = [(g, r) for g in space.bits for r in space.roundings_for(g)]
    total = sum(len(space.bits[g]) for g, _ in plan)
    log(f"[quantize] sensitivity: at most {total} candidates ({len(space.bits)} groups x roundings x widths); "
        f"a failure skips the fewer bits of its group and rounding")
    passing: dict[tuple[str, str], list[int]] = {}
    for group, rounding in plan:
        ok = []
        for i, bits in enumerate(space.bits[group]):
            e = run(Candidate.of({group: bits}, rounding), "sensitivity", total=total)
            if not e.passed:
                pruned["fewer_bits_after_failure"] += len(space.bits[group]) - i - 1
                total -= len(space.bits[group]) - i - 1
                break
            ok.append(bits)
        passing[(group, rounding)] = ok

    # 2. joint PTQ: combinations of passing widths (or float) per group, within the memory limit, smallest first
    joint = []
    for rounding in space.roundings:
        options = [[(g, b) for b in passing.get((g, rounding if (g, rounding) in passing else "nearest"), [])]
                   + [(g, None)] for g in space.bits]
        for combo in itertools.product(*options):
            bits = {g: b for g, b in combo if b is not None}
            if not bits:
                continue  # the float model (one group alone: evaluated in the sensitivity phase, reused)
            candidate = Candidate.of(bits, rounding)
            joint.append((candidate, mem(quantize_model(model, candidate, space))))
    within = [(c, m) for c, m in joint if fits(*m)]
    pruned["over_memory_limit"] += len(joint) - len(within)
    # smallest memory first; among equal memory the wider (float = 32 bits) groups, the likelier to pass
    within.sort(key=lambda cm: (cm[1][1] if include_state else cm[1][0],
                                -sum(cm[0].get(g) or 32 for g in space.bits)))
    if len(within) > space.max_candidates:
        pruned["capped"] += len(within) - space.max_candidates
        within = within[:space.max_candidates]
    log(f"[quantize] joint: up to {len(within)} candidates in order of memory ({len(joint) - len(within)} over "
        f"the memory limit or the cap skipped); the first within the accuracy limit ends the search")
    chosen = None
    for i, (candidate, _) in enumerate(within):
        e = run(candidate, "joint", total=progress.done + len(within) - i)
        if e.passed:
            chosen = e
            pruned["after_smallest_found"] += len(within) - i - 1
            break
    # single-group candidates are models too (the other groups stay float): the smallest that passes may win
    singles = [e for e in evaluated if e.phase == "sensitivity" and e.passed and e.fits]
    key = lambda e: (e.memory(include_state), -e.accuracy)  # noqa: E731
    if singles and (chosen is None or key(min(singles, key=key)) < key(chosen)):
        chosen = min(singles, key=key)
    chosen_model = quantize_model(model, chosen.candidate, space) if chosen is not None else None

    # 3. ITQ: train the smallest failures that would beat the PTQ choice
    if "itq" in space.schemes:
        failed = [e for e in evaluated if e.phase == "joint" and not e.passed and e.fits
                  and (chosen is None or key(e) < key(chosen))]
        failed = sorted(failed, key=key)[:space.itq_candidates]
        log(f"[quantize] itq: {len(failed)} candidates to train and evaluate")
        for e in failed:
            candidate = Candidate(e.candidate.bits, e.candidate.rounding, "itq")
            trained = train(quantize_model(model, candidate, space).train(), candidate).eval()
            result = run(candidate, "itq", built=trained, total=progress.done + 1)
            if result.passed and (chosen is None or key(result) < key(chosen)):
                chosen, chosen_model = result, trained
    if chosen is not None:
        log(f"[quantize] chosen: {chosen.candidate.label}: val {chosen.accuracy:.4f}, "
            f"{chosen.memory(include_state) / 1024:.1f} KiB ({baseline.memory(include_state) / chosen.memory(include_state):.2f}x "
            f"smaller than float)")
    return Exploration(baseline, evaluated, chosen, include_state, max_accuracy_drop, max_memory_bytes, pruned,
                       chosen_model, space)
