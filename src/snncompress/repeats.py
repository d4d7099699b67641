"""Repeats of stages over seeds: per-method spread and paired differences between methods.

A recipe repeats a method over seeds by naming its stages ``<method>-s<seed>`` and giving each
its own ``seed`` option (see ``recipes/crit-fmnist-seeds.yaml``). Stages of two methods with
the same seed that start from the same model train on the same batches in the same order, so
the difference of a pair is the method's and the pairs can be compared seed by seed (a paired
t interval), which resolves far smaller effects than the spread of either method alone.

Accuracies are fractions in [0, 1] in the report and percentage points here.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass

#: ``<method>-s<seed>``: the stage-name convention of a repeat.
REPEAT_NAME = re.compile(r"^(?P<method>.+)-s(?P<seed>\d+)$")

#: Two-sided 95% quantiles of Student's t by degrees of freedom (df > 30: the normal's 1.96).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
         18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
         26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}

#: The accuracies compared: (metrics key, label).
SPLITS = (("val_accuracy", "val"), ("accuracy", "test"))


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation of ``n`` values (points)."""

    n: int
    mean: float
    sd: float


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` over the seeds both have (points): mean, sample sd, 95% t interval, and how many
    seeds ``a`` won, tied and lost."""

    n: int
    mean: float
    sd: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int


def spread(values: list[float]) -> Spread:
    """Mean and sample sd (0 for one value)."""
    return Spread(len(values), statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_difference(a: dict[int, float], b: dict[int, float]) -> PairedDifference | None:
    """``a[seed] - b[seed]`` over the common seeds; None for fewer than two common seeds."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = T_975.get(len(diffs) - 1, 1.96) * sd / math.sqrt(len(diffs))
    return PairedDifference(len(diffs), mean, sd, mean - half, mean + half,
                            sum(d > 0 for d in diffs), sum(d == 0 for d in diffs), sum(d < 0 for d in diffs))


def repeats_by_method(stages: list[dict], key: str) -> dict[str, dict[int, float]]:
    """``{method: {seed: points}}`` of the stages named ``<method>-s<seed>`` that have ``key``;
    only methods with at least two seeds."""
    found: dict[str, dict[int, float]] = {}
    for stage in stages:
        match = REPEAT_NAME.match(str(stage.get("name", "")))
        value = (stage.get("metrics") or {}).get(key)
        if match and isinstance(value, (int, float)):
            found.setdefault(match["method"], {})[int(match["seed"])] = 100.0 * value
    return {method: by_seed for method, by_seed in found.items() if len(by_seed) >= 2}


def pool_runs(runs: list[tuple[str, list[dict]]]) -> list[dict]:
    """The stages of several runs ``(label, stages)`` as one list for :func:`repeat_lines`.

    A method's seeds spread over runs (seeds 1-5 in one, 6-10 in another) are pooled into one
    group. A method that holds the same seed in two runs (the same recipe run at two sparsities)
    is kept apart per run, renamed ``<label>/<method>``, so its groups pair by seed instead.
    """
    seeds_by_method: dict[str, list[set[int]]] = {}
    for _, stages in runs:
        in_run: dict[str, set[int]] = {}
        for stage in stages:
            match = REPEAT_NAME.match(str(stage.get("name", "")))
            if match:
                in_run.setdefault(match["method"], set()).add(int(match["seed"]))
        for method, seeds in in_run.items():
            seeds_by_method.setdefault(method, []).append(seeds)
    clashing = {method for method, sets in seeds_by_method.items()
                if sum(map(len, sets)) > len(set().union(*sets))}
    pooled = []
    for label, stages in runs:
        for stage in stages:
            match = REPEAT_NAME.match(str(stage.get("name", "")))
            if match and match["method"] in clashing:
                stage = {**stage, "name": f"{label}/{stage['name']}"}
            pooled.append(stage)
    return pooled


def repeat_lines(stages: list[dict]) -> list[str]:
    """Markdown: each repeated method's mean +- sd, and every pair of methods' paired difference;
    empty when no method is repeated."""
    groups = {label: repeats_by_method(stages, key) for key, label in SPLITS}
    methods = sorted(set().union(*(g.keys() for g in groups.values())))
    if not methods:
        return []
    lines = ["## Repeats over seeds", "",
             "Stages named `<method>-s<seed>`; accuracy in points, mean ± sample sd over the seeds.", "",
             "| method | seeds | " + " | ".join(label for _, label in SPLITS) + " |",
             "|---|---|" + "---|" * len(SPLITS)]
    for method in methods:
        cells = []
        for _, label in SPLITS:
            values = groups[label].get(method)
            cells.append("–" if not values else _spread_cell(spread(list(values.values()))))
        seeds = sorted(set().union(*(g.get(method, {}).keys() for g in groups.values())))
        lines.append(f"| {method} | {', '.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    pairs = [(a, b) for i, a in enumerate(methods) for b in methods[i + 1:]]
    rows = []
    for a, b in pairs:
        for _, label in SPLITS:
            d = paired_difference(groups[label].get(a, {}), groups[label].get(b, {}))
            if d is not None:
                rows.append(f"| {a} − {b} | {label} | {d.n} | {d.mean:+.2f} | {d.sd:.2f} | "
                            f"[{d.low:+.2f}, {d.high:+.2f}] | {d.wins} / {d.ties} / {d.losses} |")
    if rows:
        lines += ["", "Paired by seed (same start, same batches): the 95% interval is Student's t on the "
                      "per-seed differences.", "",
                  "| difference | split | seeds | mean | sd | 95% interval | wins / ties / losses |",
                  "|---|---|---|---|---|---|---|", *rows]
    return lines + [""]


def _spread_cell(s: Spread) -> str:
    return f"{s.mean:.2f} ± {s.sd:.2f}"
