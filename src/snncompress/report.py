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
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from .compress.exploration import pareto_front
from .errors import UserError
from .io import save_figure, write_bytes
from .repeats import pool_runs, repeat_lines
from .report_schema import SCHEMA_VERSION, jsonable

SCHEMA = SCHEMA_VERSION
REPORT_KEYS = ("schema", "dataset", "model", "recipe", "stages", "baseline", "final")
STAGE_KEYS = ("name", "kind", "seconds", "metrics")
METRIC_KEYS = ("checkpoint", "accuracy", "timesteps", "params", "nonzero_params", "footprint_bytes",
               "spikes_per_image", "firing_rate", "synops", "energy_uj", "ann_energy_uj", "energy_preset",
               "latency_ms", "latency_batch", "robustness")
SYNOPS_KEYS = ("ac", "mac", "dense")
PLOT_FILES = ("firing_rates.png", "energy_layers.png", "robustness.png", "trajectory.png")
SNN_COLOR, ANN_COLOR, MAC_COLOR, AC_COLOR = "#1f77b4", "#ff7f0e", "#d62728", "#2ca02c"
TRAINED_ANN_COLOR = "#9467bd"
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


# --------------------------------------------------------------------------- number formatting

def _num(value, digits: int = 3) -> str:
    """A compact human number: 1234567 -> '1.23M', 0.01234 -> '0.0123', None -> '–'."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    for size, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.{digits}g}{suffix}"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def _kib(value) -> str:
    return "–" if value is None else f"{value / 1024:.1f}"


def _syn(metrics: dict, key: str):
    return (metrics.get("synops") or {}).get(key)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _has_trained(*metrics: dict) -> bool:
    """Whether any of these metrics dicts holds a trained-ANN measurement."""
    return any(isinstance(m, dict) and m.get(TRAINED_KEY) is not None for m in metrics)


# --------------------------------------------------------------------------- report.md

STAGE_COLUMNS = ["#", "stage", "kind", "time (s)", "accuracy", f"{TWIN_LABEL} acc.", "T", "params", "nonzero",
                 "footprint (KiB)", "spikes/img", "Effective_ACs", "Effective_MACs", "Dense", "energy (µJ)",
                 f"{TWIN_LABEL} energy (µJ)", f"{TWIN_LABEL}/SNN energy", "latency (ms/img)"]
#: Added before the latency column when some stage measured the trained ANN.
TRAINED_STAGE_COLUMNS = [f"{TRAINED_LABEL} acc.", f"{TRAINED_LABEL} energy (µJ)", f"{TRAINED_LABEL}/SNN energy"]


def _trained_cells(m: dict) -> list[str]:
    return [_pct(m.get("trained_ann_accuracy")), _num(m.get("trained_ann_energy_uj")),
            _num(m.get("energy_ratio_trained_ann"))]


def _stage_columns(trained: bool) -> list[str]:
    return STAGE_COLUMNS[:-1] + TRAINED_STAGE_COLUMNS + STAGE_COLUMNS[-1:] if trained else STAGE_COLUMNS


def _stage_row(i: int, stage: dict, trained: bool = False) -> list[str]:
    m = stage.get("metrics") or {}
    return [str(i), stage.get("name", ""), stage.get("kind", ""), _num(stage.get("seconds")),
            _pct(m.get("accuracy")), _pct(m.get("ann_accuracy")), _num(m.get("timesteps")),
            _num(m.get("params")), _num(m.get("nonzero_params")), _kib(m.get("footprint_bytes")),
            _num(m.get("spikes_per_image")), _num(_syn(m, "ac")), _num(_syn(m, "mac")), _num(_syn(m, "dense")),
            _num(m.get("energy_uj")), _num(m.get("ann_energy_uj")), _num(m.get("energy_ratio")),
            *(_trained_cells(m) if trained else []), _num(m.get("latency_ms"))]


COMPARE_ROWS = [
    ("accuracy", lambda m: m.get("accuracy"), _pct),
    ("timesteps", lambda m: m.get("timesteps"), _num),
    ("params", lambda m: m.get("params"), _num),
    ("nonzero params", lambda m: m.get("nonzero_params"), _num),
    ("footprint (KiB)", lambda m: m.get("footprint_bytes"), _kib),
    ("compression ratio", lambda m: m.get("compression_ratio"), _num),
    ("spikes / image", lambda m: m.get("spikes_per_image"), _num),
    ("Effective_ACs", lambda m: _syn(m, "ac"), _num),
    ("Effective_MACs", lambda m: _syn(m, "mac"), _num),
    ("Dense", lambda m: _syn(m, "dense"), _num),
    ("energy (µJ)", lambda m: m.get("energy_uj"), _num),
    (f"{TWIN_LABEL} accuracy", lambda m: m.get("ann_accuracy"), _pct),
    (f"{TWIN_LABEL} energy (µJ)", lambda m: m.get("ann_energy_uj"), _num),
    ("latency (ms/img)", lambda m: m.get("latency_ms"), _num),
]
#: Rows added before latency when the baseline or the final model measured the trained ANN.
TRAINED_COMPARE_ROWS = [
    (f"{TRAINED_LABEL} accuracy", lambda m: m.get("trained_ann_accuracy"), _pct),
    (f"{TRAINED_LABEL} energy (µJ)", lambda m: m.get("trained_ann_energy_uj"), _num),
]


def _change(before, after) -> str:
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)) or not before:
        return "–"
    return f"x{after / before:.3g}"


def _baseline_final_lines(report: dict) -> list[str]:
    base, final = report.get("baseline") or {}, report.get("final") or {}
    specs = COMPARE_ROWS[:-1] + TRAINED_COMPARE_ROWS + COMPARE_ROWS[-1:] if _has_trained(base, final) \
        else COMPARE_ROWS
    rows = [[label, fmt(get(base)), fmt(get(final)), _change(get(base), get(final))] for label, get, fmt in specs]
    return ["## Baseline vs final", "", *_table(["metric", "baseline", "final", "final / baseline"], rows), ""]


def _reference_lines(final: dict) -> list[str]:
    """The final model beside its ANN references: accuracy, ops and energy per image."""
    if final.get("energy_uj") is None and final.get("accuracy") is None:
        return []
    name = "SNN (final)" if final.get("spiking", True) else "final model (ANN)"
    rows = [[name, _pct(final.get("accuracy")), _num(_syn(final, "mac")), _num(_syn(final, "ac")),
             _num(final.get("energy_uj")), "1" if final.get("energy_uj") else "–"]]
    refs = [(TWIN_LABEL, "ann", "energy_ratio")]
    if _has_trained(final):
        refs.append((TRAINED_LABEL, "trained_ann", "energy_ratio_trained_ann"))
    for label, key, ratio in refs:
        rows.append([label, _pct(final.get(f"{key}_accuracy")), _num((final.get(f"{key}_synops") or {}).get("mac")),
                     "0", _num(final.get(f"{key}_energy_uj")), _num(final.get(ratio))])
    return ["## Final model vs ANN references", "",
            f"{TWIN_LABEL}: the final model's own weights with ReLU in place of each LIF."
            + (f" {TRAINED_LABEL}: the ANN trained in this run." if _has_trained(final) else "")
            + " ANNs run densely: every MAC counts, no ACs.", "",
            *_table(["model", "accuracy", "MACs / image", "ACs / image", "energy (µJ)", "energy / SNN energy"],
                    rows), ""]


def _layer_lines(final: dict) -> list[str]:
    lines = ["## Final model, per layer", ""]
    rates, spikes = final.get("firing_rate") or {}, final.get("spikes_per_layer") or {}
    if rates:
        rows = [[name, f"{rate:.4f}", _num(spikes.get(name))] for name, rate in rates.items()]
        lines += ["Firing rate = spikes per neuron per timestep.", "",
                  *_table(["spiking layer", "firing rate", "spikes / image"], rows), ""]
    ops, energy = final.get("synops_per_layer") or {}, final.get("energy_per_layer_uj") or {}
    if ops:
        rows = [[name, _num(o.get("ac")), _num(o.get("mac")), _num(o.get("dense")),
                 _num((energy.get(name) or {}).get("ac")), _num((energy.get(name) or {}).get("mac"))]
                for name, o in ops.items()]
        lines += [f"Synaptic operations per image and energy ({final.get('energy_preset', '?')} preset):", "",
                  *_table(["layer", "Effective_ACs", "Effective_MACs", "Dense", "AC energy (µJ)",
                           "MAC energy (µJ)"], rows), ""]
    return lines


def _robustness_lines(final: dict) -> list[str]:
    snn, ann = final.get("robustness") or {}, final.get("robustness_ann") or {}
    trained = final.get("robustness_trained_ann") or {}
    if not snn:
        return []
    rows = [[sigma, _pct(acc), _pct(ann.get(sigma)), *([_pct(trained.get(sigma))] if trained else [])]
            for sigma, acc in snn.items()]
    n = final.get("robustness_images")
    return ["## Robustness to Gaussian input noise", "",
            f"Accuracy with `x + sigma * N(0, 1)` on the normalised input{f' ({n} test images)' if n else ''}"
            "; the same noisy images for every model.",
            "", *_table(["sigma", "SNN", TWIN_LABEL, *([TRAINED_LABEL] if trained else [])], rows), ""]


def _method_lines(final: dict) -> list[str]:
    conv = final.get("synops_conventions") or {}
    pj = final.get("energy_pj_per_op") or {}
    alt = final.get("synops_alt") or {}
    lines = ["## How these numbers were measured", ""]
    lines.append(f"- Synaptic operations: NeuroBench definitions, counted per aten op on "
                 f"{final.get('synops_images', '?')} test images; conv1 on direct input counted "
                 f"{'T times' if conv.get('conv1') == 'per_timestep' else 'once per image'}; "
                 f"average-pooled spikes counted as {'ACs on the raw spikes' if conv.get('pooled_spikes') == 'ac' else 'MACs (non-binary input, as NeuroBench)'}.")
    if alt:
        lines.append(f"- Under the other pooled-spike convention ({alt.get('pooled_spikes')}): "
                     f"Effective_ACs {_num(alt.get('ac'))}, Effective_MACs {_num(alt.get('mac'))}, "
                     f"Dense {_num(alt.get('dense'))}, energy {_num(alt.get('energy_uj'))} µJ.")
    if pj:
        refs = f"the {TWIN_LABEL}" + (f" and the {TRAINED_LABEL}" if _has_trained(final) else "")
        lines.append(f"- Energy: MACs x {pj.get('mac')} pJ + ACs x {pj.get('ac')} pJ "
                     f"(preset {final.get('energy_preset')}); {refs}: all dense MACs x {pj.get('mac')} pJ, "
                     f"counted on one test image.")
    lines.append(f"- Footprint: {final.get('footprint_format', 'dense')}; membrane state "
                 f"{'included' if final.get('footprint_include_state') else 'not included'}"
                 f" ({_kib(final.get('footprint_state_bytes'))} KiB).")
    if final.get("latency_ms") is not None:
        threads = f"{final.get('latency_threads', '?')} thread(s)"
        if final.get("latency_threads_available") is not None:
            threads += f" of {final['latency_threads_available']} (the fastest count, tuned per model)"
        flushed = final.get("latency_subnormals_flushed")
        lines.append(f"- Latency: median of {final.get('latency_repeats', '?')} runs after warm-up, batch "
                     f"{final.get('latency_batch')}, {threads}, device "
                     f"{final.get('latency_device', '?')}, torch.inference_mode, "
                     f"{final.get('latency_form', 'eager')} form; masks and quantizers burned in"
                     + (f", {flushed} subnormal values flushed to zero." if flushed is not None else "."))
    return lines + [""]


def render_markdown(report: dict) -> str:
    """The text of ``report.md`` for a report-contract dict."""
    final = report.get("final") or {}
    stages = report.get("stages") or []
    trained = _has_trained(*(s.get("metrics") for s in stages))
    lines = [f"# snncompress run: {report.get('model', '?')} on {report.get('dataset', '?')}", "",
             f"Recipe: `{report.get('recipe', '?')}` · report schema {report.get('schema', '?')}", "",
             "## Stages", "",
             *_table(_stage_columns(trained), [_stage_row(i, s, trained) for i, s in enumerate(stages)]), "",
             *repeat_lines(stages), *_baseline_final_lines(report), *_reference_lines(final), *_layer_lines(final),
             *_robustness_lines(final),
             *_method_lines(final), "## Plots", ""]
    lines += [f"![{name[:-4]}]({name})" for name in PLOT_FILES]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots

def _legend_below(ax, ncol: int = 2) -> None:
    """Legend under the axes, so it never hides data."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=ncol, fontsize=8, frameon=False)


def _log_x(ax) -> None:
    """Logarithmic x axis with plain-number tick labels at 1, 2, 5 x 10^k."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this report", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_firing_rates(report: dict) -> Figure:
    """Bars of spikes per neuron per timestep for each LIF layer, baseline beside final."""
    series = [(label, (report.get(key) or {}).get("firing_rate") or {})
              for label, key in (("baseline", "baseline"), ("final", "final"))]
    series = [(label, rates) for label, rates in series if rates]
    layers = list(dict.fromkeys(name for _, rates in reversed(series) for name in rates))
    fig = Figure(figsize=(max(5.0, 0.7 * len(layers) + 2), 3.8))
    ax = fig.add_subplot()
    if not layers:
        _no_data(ax, "firing rates")
        return fig
    width = 0.8 / len(series)
    for j, (label, rates) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(layers))]
        ax.bar(xs, [rates.get(name, 0.0) for name in layers], width, label=label)
    ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right")
    ax.set_ylabel("firing rate (spikes / neuron / timestep)")
    ax.set_title("Firing rate per spiking layer")
    ax.legend(fontsize=8)
    return fig


def plot_energy_layers(report: dict) -> Figure:
    """The final model's energy per layer in µJ: stacked MAC and AC parts, the ANN references' dense MACs beside.

    References: the ReLU twin (hatched) and, when measured, the trained ANN (dotted); a layer the
    trained ANN has and the SNN lacks gets its own tick.
    """
    final = report.get("final") or {}
    energy = final.get("energy_per_layer_uj") or {}
    refs = [(label, final.get(key) or {}, hatch) for label, key, hatch in
            ((TWIN_LABEL, "ann_energy_per_layer_uj", "//"), (TRAINED_LABEL, "trained_ann_energy_per_layer_uj", ".."))]
    refs = [r for r in refs if r[1]]
    fig = Figure(figsize=(max(5.5, 0.8 * len(energy) + 2), 4.2))
    ax = fig.add_subplot()
    if not energy:
        _no_data(ax, "per-layer energy")
        return fig
    names = list(dict.fromkeys([*energy, *(n for _, layers, _ in refs for n in layers)]))
    xs = list(range(len(names)))
    width = 0.8 / (1 + len(refs))

    def shifted(j):  # x positions of the j-th bar group (0: SNN)
        return [x + (j - len(refs) / 2) * width for x in xs]

    macs = [(energy.get(n) or {}).get("mac", 0.0) for n in names]
    acs = [(energy.get(n) or {}).get("ac", 0.0) for n in names]
    ax.bar(shifted(0), macs, width, color=MAC_COLOR, label="SNN: MAC energy (analog input)")
    ax.bar(shifted(0), acs, width, bottom=macs, color=AC_COLOR, label="SNN: AC energy (spike input)")
    for j, (label, layers, hatch) in enumerate(refs, start=1):
        ax.bar(shifted(j), [layers.get(n, 0.0) for n in names], width, color="none",
               edgecolor="0.3", hatch=hatch, label=f"{label}: dense MACs")
    ax.set_xticks(xs, names, rotation=45, ha="right")
    ax.set_ylabel(f"energy per image (µJ, {final.get('energy_preset', '?')} preset)")
    title = (f"Energy per layer: SNN {_num(final.get('energy_uj'))} µJ, "
             f"{TWIN_LABEL} {_num(final.get('ann_energy_uj'))} µJ")
    if _has_trained(final):
        title += f",\n{TRAINED_LABEL} {_num(final.get('trained_ann_energy_uj'))} µJ"
    ax.set_title(title)
    _legend_below(ax)
    return fig


def plot_robustness(report: dict) -> Figure:
    """Accuracy vs noise sigma: final SNN, its ReLU twin, the trained ANN (when measured), the baseline SNN (dashed)."""
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.add_subplot()
    final, base = report.get("final") or {}, report.get("baseline") or {}
    curves = [("SNN (final)", final.get("robustness"), SNN_COLOR, "-"),
              (f"{TWIN_LABEL} (final)", final.get("robustness_ann"), ANN_COLOR, "-"),
              (TRAINED_LABEL, final.get("robustness_trained_ann"), TRAINED_ANN_COLOR, "-."),
              ("SNN (baseline)", base.get("robustness"), SNN_COLOR, "--")]
    curves = [c for c in curves if c[1]]
    if not curves:
        _no_data(ax, "robustness results")
        return fig
    for label, accs, color, style in curves:
        sigmas = sorted(accs, key=float)
        ax.plot([float(s) for s in sigmas], [100 * accs[s] for s in sigmas], style, marker="o",
                color=color, label=label)
    ax.set_xlabel("Gaussian noise sigma (normalised input units)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy under input noise")
    ax.grid(alpha=0.3)
    _legend_below(ax, ncol=2 if len(curves) == 4 else 3)
    return fig


def _stage_points(report: dict, key: str) -> list[tuple[str, float, float]]:
    """(stage name, metrics[key], accuracy) of each stage that has both (spiking stages for timesteps)."""
    points, previous_checkpoint = [], None
    for stage in report.get("stages") or []:
        m = stage.get("metrics") or {}
        same_model = m.get("checkpoint") is not None and m.get("checkpoint") == previous_checkpoint
        previous_checkpoint = m.get("checkpoint")
        if same_model or (key == "timesteps" and m.get("spiking") is False):
            continue  # an evaluate stage re-measures the model already plotted
        if isinstance(m.get(key), (int, float)) and isinstance(m.get("accuracy"), (int, float)):
            points.append((stage.get("name", "?"), float(m[key]), 100 * m["accuracy"]))
    return points


def _trajectory(ax, points, xlabel: str, log: bool) -> None:
    if not points:
        _no_data(ax, "stage metrics")
        return
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    ax.plot(xs, ys, "-", color="0.6", zorder=1)
    ax.scatter(xs, ys, c=range(len(points)), cmap="viridis", zorder=2)
    for name, x, y in points:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if log and min(xs) > 0:
        _log_x(ax)
    elif not log:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)


def plot_trajectory(report: dict) -> Figure:
    """Accuracy vs footprint (KiB) and accuracy vs timesteps across the run's stages, in order."""
    fig = Figure(figsize=(10, 4))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    footprint = [(n, x / 1024, y) for n, x, y in _stage_points(report, "footprint_bytes")]
    _trajectory(left, footprint, "memory footprint (KiB)", log=True)
    _trajectory(right, _stage_points(report, "timesteps"), "timesteps T", log=False)
    left.set_title("Compression trajectory: accuracy vs footprint")
    right.set_title("Accuracy vs timesteps")
    fig.tight_layout()
    return fig


PLOTTERS = {"firing_rates.png": plot_firing_rates, "energy_layers.png": plot_energy_layers,
            "robustness.png": plot_robustness, "trajectory.png": plot_trajectory}


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
