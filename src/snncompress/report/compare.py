"""Several runs side by side: ``report.md``, ``comparison.json`` and ``pareto.png``."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure

from ..compress.exploration import pareto_front
from ..errors import UserError
from ..io import save_figure, write_bytes
from ..repeats import pool_runs, repeat_lines
from ..report_schema import jsonable
from .cells import _has_trained, _kib, _num, _pct, _syn, _table
from .contract import TRAINED_LABEL, TWIN_LABEL, read_report
from .markdown import TRAINED_STAGE_COLUMNS, _trained_cells
from .plots import SNN_COLOR, _legend_below, _log_x, _no_data, _stage_points


# --------------------------------------------------------------------------- several runs

def _run_labels(run_dirs: list[Path]) -> list[str]:
    """Folder names, prefixed with their parent where two runs share a name."""
    names = [p.name for p in run_dirs]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in run_dirs]


def _comparison_rows(labels: list[str], reports: list[dict]) -> list[dict]:
    rows = []
    for label, report in zip(labels, reports):
        final = report.get("final") or {}
        rows.append({"run": label, "dataset": report.get("dataset"), "model": report.get("model"),
                     "recipe": report.get("recipe"), "stages": len(report.get("stages") or []), **final})
    for cost in ("footprint_bytes", "energy_uj"):
        valid = [i for i, r in enumerate(rows)
                 if isinstance(r.get(cost), (int, float)) and isinstance(r.get("accuracy"), (int, float))]
        front = pareto_front(valid, lambda i: rows[i][cost], lambda i: rows[i]["accuracy"])
        for i in valid:
            rows[i][f"pareto_{cost}"] = i in front
    return rows


COMPARISON_COLUMNS = ["run", "dataset", "model", "recipe", "stages", "accuracy", "T", "footprint (KiB)",
                      "compression", "spikes/img", "Effective_ACs", "Effective_MACs", "Dense", "energy (µJ)",
                      f"{TWIN_LABEL} energy (µJ)", f"{TWIN_LABEL}/SNN energy", "latency (ms/img)",
                      "Pareto (footprint / energy)"]
#: Comparison keys of the trained ANN, in comparison.json only for runs that measured it.
TRAINED_SUMMARY_KEYS = ("trained_ann_accuracy", "trained_ann_energy_uj", "energy_ratio_trained_ann")


def _comparison_columns(trained: bool) -> list[str]:
    return COMPARISON_COLUMNS[:-2] + TRAINED_STAGE_COLUMNS + COMPARISON_COLUMNS[-2:] if trained \
        else COMPARISON_COLUMNS


def _comparison_line(row: dict, trained: bool = False) -> list[str]:
    front = "/".join("yes" if row.get(f"pareto_{c}") else "no" for c in ("footprint_bytes", "energy_uj"))
    return [row["run"], str(row.get("dataset")), str(row.get("model")), f"`{row.get('recipe')}`",
            str(row["stages"]), _pct(row.get("accuracy")), _num(row.get("timesteps")),
            _kib(row.get("footprint_bytes")), _num(row.get("compression_ratio")), _num(row.get("spikes_per_image")),
            _num(_syn(row, "ac")), _num(_syn(row, "mac")), _num(_syn(row, "dense")), _num(row.get("energy_uj")),
            _num(row.get("ann_energy_uj")), _num(row.get("energy_ratio")),
            *(_trained_cells(row) if trained else []), _num(row.get("latency_ms")), front]


def _pareto_panel(ax, labels, reports, rows, cost: str, scale: float, xlabel: str) -> None:
    for label, report in zip(labels, reports):  # each run's stages, faint, in order
        pts = [(x * scale, y) for _, x, y in _stage_points(report, cost)]
        if len(pts) > 1:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ".-", color="0.8", zorder=1)
    valid = [r for r in rows if isinstance(r.get(cost), (int, float)) and isinstance(r.get("accuracy"), (int, float))]
    if not valid:
        _no_data(ax, cost)
        return
    for r in valid:
        ax.scatter(r[cost] * scale, 100 * r["accuracy"], s=40, zorder=3,
                   color="#d62728" if r.get(f"pareto_{cost}") else SNN_COLOR)
        ax.annotate(r["run"], (r[cost] * scale, 100 * r["accuracy"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    front = sorted((r for r in valid if r.get(f"pareto_{cost}")), key=lambda r: r[cost])
    ax.step([r[cost] * scale for r in front], [100 * r["accuracy"] for r in front], where="post",
            color="#d62728", label="Pareto front (final models)", zorder=2)
    if min(r[cost] for r in valid) > 0:
        _log_x(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.plot([], [], ".-", color="0.8", label="stages of each run")
    _legend_below(ax)


def compare_runs(run_dirs: list, out_dir) -> None:
    """Compare the final models of several run folders: ``report.md``, ``comparison.json``, ``pareto.png``.

    ``report.md`` also holds the runs' repeats over seeds, pooled as :func:`~.repeats.pool_runs` says.

    Raises :class:`UserError` when a folder has no (valid) ``report.json``.
    """
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise UserError("compare needs at least one run folder")
    reports = [read_report(d) for d in run_dirs]
    labels = _run_labels(run_dirs)
    rows = _comparison_rows(labels, reports)
    out_dir = Path(out_dir)
    trained = _has_trained(*rows)
    text = ["# snncompress run comparison", "",
            "Final model of each run. Pareto: not beaten by another run on both accuracy and cost. "
            f"{TWIN_LABEL}: the SNN's own weights with ReLU in place of each LIF"
            + (f"; {TRAINED_LABEL}: the ANN trained in that run." if trained else "."), "",
            *_table(_comparison_columns(trained), [_comparison_line(r, trained) for r in rows]), "",
            "![pareto](pareto.png)", "",
            *repeat_lines(pool_runs([(label, report.get("stages") or []) for label, report in zip(labels, reports)]))]
    write_bytes(out_dir / "report.md", "\n".join(text).encode())
    summary = [{**{k: r.get(k) for k in ("run", "dataset", "model", "recipe", "accuracy", "timesteps",
                                         "footprint_bytes", "energy_uj", "ann_energy_uj", "synops",
                                         "pareto_footprint_bytes", "pareto_energy_uj")},
                **{k: r[k] for k in TRAINED_SUMMARY_KEYS if k in r}} for r in rows]
    write_bytes(out_dir / "comparison.json", (json.dumps(jsonable(summary), indent=2) + "\n").encode())
    fig = Figure(figsize=(11, 4.2))
    _pareto_panel(fig.add_subplot(1, 2, 1), labels, reports, rows, "footprint_bytes", 1 / 1024,
                  "memory footprint (KiB)")
    _pareto_panel(fig.add_subplot(1, 2, 2), labels, reports, rows, "energy_uj", 1.0, "energy per image (µJ)")
    fig.suptitle("Accuracy vs cost across runs")
    save_figure(fig, out_dir / "pareto.png")
