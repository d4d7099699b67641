"""Gradual temporal pruning (STP, docs/methods/stp.md): lower T step by step while accuracy holds.

Starting from a trained SNN at ``T0`` with validation accuracy ``a0`` (the stage's start),
for each ``T`` of a decreasing schedule:

1. copy the last accepted model (weights, leaks, thresholds) and set its T;
2. fine-tune it a few epochs at that T (BPTT), giving accuracy ``a_T``;
3. if ``a_T < a0 - tolerance`` stop and keep the last accepted model;
   otherwise accept it and go on.

The loop is independent of training: :func:`prune_timesteps` takes the
fine-tuning step as a function, so it can be driven by a stub in tests.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable

from ..models import SpikingNetwork

#: Ratio between consecutive timesteps of the default schedule (the paper: 25, 15, 10, 5, 3, 2, 1).
DEFAULT_STEP_RATIO = 0.6


@dataclass
class TimestepTrial:
    """One schedule step: its T, the validation accuracy (0-1) after fine-tuning, whether it was kept."""

    timesteps: int
    val_accuracy: float
    accepted: bool


def default_schedule(timesteps: int) -> list[int]:
    """Timesteps below ``timesteps`` down to 1: x0.6 per step (rounded) above 4, then every integer.

    ``default_schedule(4) == [3, 2, 1]``; ``default_schedule(25) == [15, 9, 5, 3, 2, 1]``.
    """
    schedule, t = [], int(timesteps)
    while t > 1:
        t = t - 1 if t <= 4 else min(t - 1, round(t * DEFAULT_STEP_RATIO))
        schedule.append(t)
    return schedule


def check_schedule(schedule: list[int], start: int) -> list[int]:
    """The schedule's entries below ``start`` (a leading ``start``, as in the paper's lists, is dropped).

    Raises ValueError unless the entries are >= 1 and strictly decreasing.
    """
    if any(int(t) < 1 for t in schedule):
        raise ValueError(f"every timestep of the schedule must be >= 1, got {schedule}")
    if any(b >= a for a, b in zip(schedule, schedule[1:])):
        raise ValueError(f"the timestep schedule must be strictly decreasing, got {schedule}")
    return [int(t) for t in schedule if int(t) < start]


def prune_timesteps(model: SpikingNetwork, schedule: list[int], finetune: Callable[[SpikingNetwork], float],
                    start_accuracy: float, tolerance: float) -> tuple[SpikingNetwork, list[TimestepTrial]]:
    """Lower ``model``'s T along ``schedule`` until accuracy drops more than ``tolerance`` below the start.

    Args:
        model: the starting SNN at its own T (not modified).
        schedule: decreasing timesteps to try (entries >= the model's T are skipped).
        finetune: trains the given model (its T already set) in place and
            returns its validation accuracy in [0, 1].
        start_accuracy: accuracy of ``model`` at its own T (the reference).
        tolerance: largest accepted drop below ``start_accuracy`` (accuracy units, 0.01 = 1 point).

    Returns:
        the last model whose accuracy stayed within tolerance (a copy; ``model``
        itself when even the first step failed), and one :class:`TimestepTrial`
        per step tried, the failing one included.
    """
    accepted, trials = model, []
    for timesteps in check_schedule(schedule, model.timesteps):
        candidate = copy.deepcopy(accepted)
        candidate.timesteps = timesteps
        accuracy = float(finetune(candidate))
        ok = accuracy >= start_accuracy - tolerance
        trials.append(TimestepTrial(timesteps, accuracy, ok))
        if not ok:
            break
        accepted = candidate
    return accepted, trials


def trials_table(trials: list[TimestepTrial]) -> list[dict]:
    """The trials as JSON-able rows ``{"timesteps", "val_accuracy", "accepted"}``."""
    return [asdict(t) for t in trials]
