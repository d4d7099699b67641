"""The PNG plots of one run (matplotlib's Agg canvas, no pyplot state)."""

from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from .cells import _has_trained, _num
from .contract import TRAINED_LABEL, TWIN_LABEL

SNN_COLOR, ANN_COLOR, MAC_COLOR, AC_COLOR = "#1f77b4", "#ff7f0e", "#d62728", "#2ca02c"
TRAINED_ANN_COLOR = "#9467bd"


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
