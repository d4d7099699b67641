"""The report contract: its keys and files, the labels of the ANN references, and reading a report back."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..report_schema import SCHEMA_VERSION

SCHEMA = SCHEMA_VERSION
REPORT_KEYS = ("schema", "dataset", "model", "recipe", "stages", "baseline", "final")
STAGE_KEYS = ("name", "kind", "seconds", "metrics")
METRIC_KEYS = ("checkpoint", "accuracy", "timesteps", "params", "nonzero_params", "footprint_bytes",
               "spikes_per_image", "firing_rate", "synops", "energy_uj", "ann_energy_uj", "energy_preset",
               "latency_ms", "latency_batch", "robustness")
SYNOPS_KEYS = ("ac", "mac", "dense")
PLOT_FILES = ("firing_rates.png", "energy_layers.png", "robustness.png", "trajectory.png")
#: Labels of the two ANN references in tables and plots.
TWIN_LABEL, TRAINED_LABEL = "ReLU twin", "trained ANN"
#: Metrics key present exactly when a trained ANN was measured.
TRAINED_KEY = "trained_ann_energy_uj"


# --------------------------------------------------------------------------- contract and files

def missing_keys(report: dict) -> list[str]:
    """Dotted paths of the report contract's keys absent from ``report`` (empty when it honours the contract)."""
    missing = [k for k in REPORT_KEYS if k not in report]
    blocks = [(f"stages[{i}]", s.get("metrics") or {}) for i, s in enumerate(report.get("stages") or [])]
    for i, stage in enumerate(report.get("stages") or []):
        missing += [f"stages[{i}].{k}" for k in STAGE_KEYS if k not in stage]
    blocks += [(k, report.get(k) or {}) for k in ("baseline", "final")]
    for where, metrics in blocks:
        missing += [f"{where}.{k}" for k in METRIC_KEYS if k not in metrics]
        if "synops" in metrics:
            missing += [f"{where}.synops.{k}" for k in SYNOPS_KEYS if k not in (metrics["synops"] or {})]
    return missing


def read_report(run_dir) -> dict:
    """The ``report.json`` of a run folder; :class:`UserError` when it is missing or not valid JSON."""
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise UserError(f"{run_dir} has no report.json (not a finished snncompress run folder?)")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(report, dict) or not isinstance(report.get("final", {}), dict) \
            or not isinstance(report.get("stages", []), list):
        raise UserError(f"{path} is not a snncompress report (a mapping with 'final' and 'stages')")
    return report
