"""Run reports (docs/reference/report.md): ``report.json``, ``report.md`` and PNG plots; comparisons of several runs.

A run folder gets, from :func:`write_report`:

* ``report.json``: the report dict as given (the report contract (docs/reference/report.md):
  ``schema, dataset, model, recipe, stages [{name, kind, seconds, metrics}],
  baseline, final``), written atomically (temp file + ``os.replace``);
* ``report.md``: tables of the stages, of stages repeated over seeds (:mod:`snncompress.repeats`),
  baseline vs final, the final model
  against its ANN references, the final model's per-layer firing rates,
  synaptic operations (NeuroBench names Effective_ACs / Effective_MACs /
  Dense) and energy, and robustness;
* ``firing_rates.png``: spikes per neuron per timestep of each LIF layer
  (baseline and final);
* ``energy_layers.png``: the final model's energy per layer, split into
  MAC (analog input) and AC (spike input) energy, beside the ANN references'
  dense MAC energy;
* ``robustness.png``: accuracy vs Gaussian input noise sigma, SNN and ANN
  references;
* ``trajectory.png``: accuracy vs footprint and accuracy vs timesteps across
  the run's stages (the compression trajectory).

:func:`compare_runs` puts several run folders side by side: one markdown
table (``report.md``), ``comparison.json`` and one Pareto plot
(``pareto.png``: accuracy vs footprint and accuracy vs energy).

ANN references, labelled for what they are (see :mod:`snncompress.metrics.measure`):
"ReLU twin" is the SNN's own weights with ReLU in place of each LIF (metrics
keys ``ann_accuracy``, ``ann_energy_uj``, ``energy_ratio``,
``robustness_ann``, ...); "trained ANN" is the ANN the user trained in the run
(keys ``trained_ann_accuracy``, ``trained_ann_energy_uj``,
``energy_ratio_trained_ann``, ``robustness_trained_ann``, ...), shown only
where the metrics have it: a table column or row for it appears only when at
least one shown model has a trained-ANN measurement.

Plots are drawn with matplotlib's Agg canvas directly (no pyplot state), so
writing reports from several threads or processes is safe.

Modules: :mod:`.contract` (keys, files, labels, reading a report back), :mod:`.cells` (table
cells), :mod:`.markdown` (``report.md``), :mod:`.plots` (the PNGs), :mod:`.compare` (several
runs); :func:`write_report` here composes them, and this package re-exports their public names.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io import save_figure, write_bytes
from ..report_schema import jsonable
from .compare import COMPARISON_COLUMNS, TRAINED_SUMMARY_KEYS, compare_runs
from .contract import (METRIC_KEYS, PLOT_FILES, REPORT_KEYS, SCHEMA, STAGE_KEYS, SYNOPS_KEYS, TRAINED_KEY,
                       TRAINED_LABEL, TWIN_LABEL, missing_keys, read_report)
from .markdown import COMPARE_ROWS, STAGE_COLUMNS, TRAINED_COMPARE_ROWS, TRAINED_STAGE_COLUMNS, render_markdown
from .plots import (AC_COLOR, ANN_COLOR, MAC_COLOR, PLOTTERS, SNN_COLOR, TRAINED_ANN_COLOR, plot_energy_layers,
                    plot_firing_rates, plot_robustness, plot_trajectory)

__all__ = [
    "AC_COLOR", "ANN_COLOR", "COMPARE_ROWS", "COMPARISON_COLUMNS", "MAC_COLOR", "METRIC_KEYS", "PLOTTERS",
    "PLOT_FILES", "REPORT_KEYS", "SCHEMA", "SNN_COLOR", "STAGE_COLUMNS", "STAGE_KEYS", "SYNOPS_KEYS",
    "TRAINED_ANN_COLOR", "TRAINED_COMPARE_ROWS", "TRAINED_KEY", "TRAINED_LABEL", "TRAINED_STAGE_COLUMNS",
    "TRAINED_SUMMARY_KEYS", "TWIN_LABEL", "compare_runs", "missing_keys", "plot_energy_layers",
    "plot_firing_rates", "plot_robustness", "plot_trajectory", "read_report", "render_markdown", "write_report",
]


def write_report(run_dir, report: dict) -> None:
    """Write ``report.json`` (atomically), ``report.md`` and the plots of :data:`PLOT_FILES` into ``run_dir``.

    ``report`` must hold the report contract's top-level keys (``ValueError`` names any missing);
    metrics keys that a stage lacks show as '–' in the tables and are left out of plots.
    """
    absent = [k for k in REPORT_KEYS if k not in report]
    if absent:
        raise ValueError(f"report lacks the report contract's key(s) {absent}")
    run_dir = Path(run_dir)
    report = jsonable(report)
    write_bytes(run_dir / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    write_bytes(run_dir / "report.md", render_markdown(report).encode())
    for name, plotter in PLOTTERS.items():
        save_figure(plotter(report), run_dir / name)
