"""``report.md`` of one run: the stage table, baseline vs final, the ANN references, layers, robustness."""

from __future__ import annotations

from ..repeats import repeat_lines
from .cells import _has_trained, _kib, _num, _pct, _syn, _table
from .contract import PLOT_FILES, TRAINED_LABEL, TWIN_LABEL


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
