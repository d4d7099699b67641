"""report.json / report.md / plots of a run, and the comparison of several runs."""

from __future__ import annotations

import json

import pytest
import torch

from snncompress.compress import set_mask
from snncompress import build_model
from snncompress.errors import UserError
from snncompress.deploy import build_inference_plan
from snncompress.compress.exploration import pareto_front
from snncompress.metrics import measure_model
from snncompress.report import (METRIC_KEYS, PLOT_FILES, REPORT_KEYS, compare_runs, missing_keys,
                                plot_energy_layers, plot_robustness, write_report)
from snncompress.report.cells import _num, _pct

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def measured():
    """Metrics of a tiny random convnet at T=3 and, pruned by half, at T=2 (real measure_model output)."""
    torch.manual_seed(0)
    model = build_model("convnet", 4, (1, 8, 8), 3, features=[4, "A"], classifier=[8], neuron={"threshold": 0.3})
    images, labels = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    loader = [(images[:8], labels[:8]), (images[8:], labels[8:])]
    opts = dict(build_plan=build_inference_plan, noise_sigmas=(0.0, 0.1, 0.3), robustness_images=16, ops_images=8, latency_repeats=2)
    base = measure_model(model, loader, **opts)
    weight = model.classifier[0].weight
    set_mask(model, "classifier.0.weight", torch.rand(weight.shape) < 0.5)
    model.timesteps = 2
    pruned = measure_model(model, loader, baseline_footprint=base["footprint_bytes"], **opts)
    return {**base, "checkpoint": "stages/0/model.safetensors"}, {**pruned, "checkpoint": "stages/1/model.safetensors"}


@pytest.fixture(scope="module")
def measured_ref():
    """As :func:`measured`, but both models also measured against a trained ANN twice as wide (ANN mode)."""
    torch.manual_seed(0)
    model = build_model("convnet", 4, (1, 8, 8), 3, features=[4, "A"], classifier=[8], neuron={"threshold": 0.3})
    trained = build_model("convnet", 4, (1, 8, 8), 3, features=[8, "A"], classifier=[16]).set_spiking(False)
    images, labels = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    loader = [(images[:8], labels[:8]), (images[8:], labels[8:])]
    opts = dict(build_plan=build_inference_plan, noise_sigmas=(0.0, 0.1, 0.3), robustness_images=16, ops_images=8, latency_repeats=2,
                reference_ann=trained)
    base = measure_model(model, loader, **opts)
    model.timesteps = 2
    final = measure_model(model, loader, baseline_footprint=base["footprint_bytes"], **opts)
    return {**base, "checkpoint": "stages/0/model.safetensors"}, {**final, "checkpoint": "stages/1/model.safetensors"}


def without_trained_ann(metrics: dict) -> dict:
    """``metrics`` as measured without a reference ANN: no ``trained_ann_*`` keys."""
    return {k: v for k, v in metrics.items() if "trained_ann" not in k}


def make_report(base: dict, final: dict, recipe: str = "demo.yaml") -> dict:
    return {"schema": 1, "dataset": "mnist-builtin", "model": "convnet", "recipe": recipe,
            "stages": [{"name": "snn", "kind": "train_snn", "seconds": 1.5, "metrics": base},
                       {"name": "prune+T2", "kind": "temporal", "seconds": 2.0, "metrics": final}],
            "baseline": base, "final": final}


def test_write_report_writes_the_contract_and_plots(tmp_path, measured):
    base, final = measured
    write_report(tmp_path, make_report(base, final))
    report = json.loads((tmp_path / "report.json").read_text())
    assert missing_keys(report) == []
    assert all(k in report for k in REPORT_KEYS) and all(k in report["final"] for k in METRIC_KEYS)
    assert set(report["final"]["synops"]) >= {"ac", "mac", "dense"}
    assert report["final"]["checkpoint"] == "stages/1/model.safetensors"
    assert report["final"]["footprint_format"].startswith("per masked tensor")
    for name in PLOT_FILES:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    md = (tmp_path / "report.md").read_text()
    for text in ("Effective_ACs", "Effective_MACs", "Dense", "prune+T2", "features.1", "ReLU twin", "sigma",
                 "| sigma | SNN | ReLU twin |\n"):
        assert text in md, text
    assert "trained ANN" not in md  # no reference measured: no column, row or curve for it
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def _md_row(md: str, first_cell: str) -> list[str]:
    """The cells after the first of the one report.md table row whose first cell is ``first_cell``."""
    rows = [line for line in md.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, (first_cell, rows)
    return [cell.strip() for cell in rows[0].strip().strip("|").split("|")][1:]


def test_report_md_shows_relu_twin_and_trained_ann_rows(tmp_path, measured_ref):
    base, final = measured_ref
    write_report(tmp_path, make_report(base, final))
    report = json.loads((tmp_path / "report.json").read_text())
    assert missing_keys(report) == []
    assert report["final"]["trained_ann_energy_uj"] == pytest.approx(final["trained_ann_energy_uj"])
    md = (tmp_path / "report.md").read_text()
    # the final model against both references
    assert _md_row(md, "SNN (final)") == [_pct(final["accuracy"]), _num(final["synops"]["mac"]),
                                          _num(final["synops"]["ac"]), _num(final["energy_uj"]), "1"]
    assert _md_row(md, "ReLU twin") == [_pct(final["ann_accuracy"]), _num(final["ann_synops"]["mac"]), "0",
                                        _num(final["ann_energy_uj"]), _num(final["energy_ratio"])]
    assert _md_row(md, "trained ANN") == [_pct(final["trained_ann_accuracy"]), _num(final["trained_ann_synops"]["mac"]),
                                          "0", _num(final["trained_ann_energy_uj"]),
                                          _num(final["energy_ratio_trained_ann"])]
    # the trained ANN is twice as wide, so it costs more than the ReLU twin of the narrower SNN
    assert final["trained_ann_synops"]["dense"] > final["ann_synops"]["dense"]
    # robustness: one row per sigma, SNN | ReLU twin | trained ANN
    assert "| sigma | SNN | ReLU twin | trained ANN |" in md
    for sigma in ("0.0", "0.1", "0.3"):
        assert _md_row(md, sigma) == [_pct(final["robustness"][sigma]), _pct(final["robustness_ann"][sigma]),
                                      _pct(final["robustness_trained_ann"][sigma])]
    # baseline vs final, and the stage table's extra columns
    assert _md_row(md, "trained ANN accuracy")[:2] == [_pct(base["trained_ann_accuracy"]),
                                                       _pct(final["trained_ann_accuracy"])]
    assert _md_row(md, "ReLU twin energy (µJ)")[:2] == [_num(base["ann_energy_uj"]), _num(final["ann_energy_uj"])]
    header = next(line for line in md.splitlines() if line.startswith("| # |"))
    assert "ReLU twin acc." in header and "trained ANN acc." in header and "trained ANN/SNN energy" in header
    stage_row = _md_row(md, "1")
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert stage_row[columns.index("trained ANN energy (µJ)") - 1] == _num(final["trained_ann_energy_uj"])


def _legend(fig) -> list[str]:
    return fig.axes[0].get_legend_handles_labels()[1]


def test_plots_draw_both_references(measured_ref):
    base, final = measured_ref
    report = make_report(base, final)
    fig = plot_robustness(report)
    assert _legend(fig) == ["SNN (final)", "ReLU twin (final)", "trained ANN", "SNN (baseline)"]
    trained_line = fig.axes[0].get_lines()[2]
    assert list(trained_line.get_ydata()) == pytest.approx([100 * final["robustness_trained_ann"][s]
                                                            for s in ("0.0", "0.1", "0.3")])
    fig = plot_energy_layers(report)
    assert _legend(fig) == ["SNN: MAC energy (analog input)", "SNN: AC energy (spike input)",
                            "ReLU twin: dense MACs", "trained ANN: dense MACs"]
    bars = {c.get_label(): [p.get_height() for p in c.patches] for c in fig.axes[0].containers}
    layers = list(final["energy_per_layer_uj"])
    assert bars["trained ANN: dense MACs"] == pytest.approx(
        [final["trained_ann_energy_per_layer_uj"][n] for n in layers])
    assert bars["ReLU twin: dense MACs"] == pytest.approx([final["ann_energy_per_layer_uj"][n] for n in layers])
    no_ref = make_report(*map(without_trained_ann, measured_ref))
    assert _legend(plot_robustness(no_ref)) == ["SNN (final)", "ReLU twin (final)", "SNN (baseline)"]
    assert "trained ANN: dense MACs" not in _legend(plot_energy_layers(no_ref))


def test_missing_keys_names_what_breaks_the_contract(measured):
    base, final = measured
    report = make_report(base, {k: v for k, v in final.items() if k != "energy_uj"})
    del report["recipe"]
    report["stages"][0]["metrics"] = {**base, "synops": {"ac": 1.0}}
    assert missing_keys(report) == ["recipe", "stages[0].synops.mac", "stages[0].synops.dense",
                                    "stages[1].energy_uj", "final.energy_uj"]
    with pytest.raises(ValueError, match="recipe"):
        write_report("unused", report)


def test_write_report_tolerates_stages_without_metrics(tmp_path):
    report = {"schema": 1, "dataset": "d", "model": "m", "recipe": "r",
              "stages": [{"name": "ann", "kind": "train_ann", "seconds": 0.1, "metrics": {"accuracy": 0.5}}],
              "baseline": {}, "final": {"accuracy": 0.5, "energy_uj": float("nan")}}
    write_report(tmp_path, report)
    assert json.loads((tmp_path / "report.json").read_text())["final"]["energy_uj"] is None
    assert all((tmp_path / name).is_file() for name in PLOT_FILES)


def test_pareto_front():
    """The one Pareto front (compress.exploration) that run comparisons and tinySNN's selection share."""
    points = [(10.0, 0.9), (5.0, 0.8), (20.0, 0.85), (5.0, 0.7), (1.0, 0.5), (10.0, 0.9)]
    front = pareto_front(range(len(points)), lambda i: points[i][0], lambda i: points[i][1])
    assert front == [4, 1, 0]  # of two equal points the first is kept


def test_compare_runs_tables_two_runs(tmp_path, measured):
    base, final = measured
    write_report(tmp_path / "a", make_report(base, final, "a.yaml"))
    write_report(tmp_path / "b", make_report(base, base, "b.yaml"))
    compare_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp")
    md = (tmp_path / "cmp" / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| a ") or line.startswith("| b ")]
    assert len(rows) == 2 and "Effective_ACs" in md
    summary = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert [r["run"] for r in summary] == ["a", "b"]
    assert summary[0]["footprint_bytes"] < summary[1]["footprint_bytes"]
    assert summary[0]["pareto_footprint_bytes"] is True  # smallest model is always on the front
    assert (tmp_path / "cmp" / "pareto.png").read_bytes().startswith(PNG_MAGIC)


def test_compare_runs_pools_repeats_over_seeds_across_runs(tmp_path, measured):
    base, final = measured
    for run, seeds, acc in (("a", (1, 2), (0.90, 0.92)), ("b", (3,), (0.94,))):
        report = make_report(base, final)
        report["stages"] += [{"name": f"{m}-s{s}", "kind": "prune_criticality",
                              "metrics": {"accuracy": a - (0.01 * s if m == "magnitude" else 0)}}
                             for s, a in zip(seeds, acc) for m in ("crit", "magnitude")]
        write_report(tmp_path / run, report)
    compare_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp")
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert "| crit | 1, 2, 3 | – | 92.00 ± 2.00 |" in md  # 90, 92, 94
    # differences 1, 2, 3 points: mean 2, sd 1, t(0.975, 2) = 4.303 / sqrt(3) = 2.48
    assert "| crit − magnitude | test | 3 | +2.00 | 1.00 | [-0.48, +4.48] | 3 / 0 / 0 |" in md


def test_compare_runs_shows_the_trained_ann_where_measured(tmp_path, measured_ref):
    write_report(tmp_path / "plain", make_report(*map(without_trained_ann, measured_ref)))
    write_report(tmp_path / "ref", make_report(*measured_ref))
    compare_runs([tmp_path / "plain", tmp_path / "ref"], tmp_path / "cmp")
    md = (tmp_path / "cmp" / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| run |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert "ReLU twin energy (µJ)" in columns and "trained ANN energy (µJ)" in columns
    final = measured_ref[1]
    row = _md_row(md, "ref")
    assert row[columns.index("trained ANN energy (µJ)") - 1] == _num(final["trained_ann_energy_uj"])
    assert _md_row(md, "plain")[columns.index("trained ANN acc.") - 1] == "–"
    summary = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert "trained_ann_accuracy" not in summary[0]
    assert summary[1]["trained_ann_accuracy"] == pytest.approx(final["trained_ann_accuracy"])


def test_compare_runs_rejects_a_folder_without_report(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no report.json"):
        compare_runs([tmp_path / "empty"], tmp_path / "cmp")


def test_every_committed_report_honours_the_published_schema():
    """The report schema (report_schema.Report) accepts every report.json under results/, and its JSON
    Schema requires the contract's top-level keys."""
    from pathlib import Path

    from snncompress.report_schema import Report, report_json_schema

    reports = sorted((Path(__file__).resolve().parents[1] / "results").rglob("report.json"))
    assert len(reports) >= 10
    for path in reports:
        Report.model_validate(json.loads(path.read_text()))
    schema = report_json_schema()
    assert set(schema["required"]) == {"dataset", "model", "recipe", "stages", "baseline", "final"}
    assert "schema" in schema["properties"] and "ac" in schema["$defs"]["SynOps"]["properties"]


def test_build_report_refuses_a_stage_without_its_seconds():
    from snncompress.report_schema import build_report

    stage = {"name": "s", "kind": "evaluate", "metrics": {"accuracy": 0.5}}
    with pytest.raises(ValueError, match="seconds"):
        build_report(dataset="mnist", model="convnet", recipe=None, stages=[stage], baseline={}, final={})
    ok = build_report(dataset="mnist", model="convnet", recipe=None, stages=[{**stage, "seconds": 1.0}],
                      baseline={}, final={"accuracy": 0.5}, device="cpu")
    assert ok["schema"] == 1 and ok["device"] == "cpu" and ok["final"] == {"accuracy": 0.5}
