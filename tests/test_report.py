"""report.json / report.md / plots of a run, and the comparison of several runs."""

from __future__ import annotations

import json

import pytest
import torch

from snncompress import build_model
from snncompress.errors import UserError
from snncompress.metrics import measure_model
from snncompress.report import (METRIC_KEYS, PLOT_FILES, REPORT_KEYS, compare_runs, missing_keys, pareto_front,
                                write_report)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def measured():
    """Metrics of a tiny random convnet at T=3 and, pruned by half, at T=2 (real measure_model output)."""
    torch.manual_seed(0)
    model = build_model("convnet", 4, (1, 8, 8), 3, features=[4, "A"], classifier=[8], neuron={"threshold": 0.3})
    images, labels = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    loader = [(images[:8], labels[:8]), (images[8:], labels[8:])]
    opts = dict(noise_sigmas=(0.0, 0.1, 0.3), robustness_images=16, ops_images=8, latency_repeats=2)
    base = measure_model(model, loader, **opts)
    weight = model.classifier[0].weight
    model.masks = {"classifier.0.weight": torch.rand(weight.shape) < 0.5}
    model.apply_masks()
    model.timesteps = 2
    pruned = measure_model(model, loader, baseline_footprint=base["footprint_bytes"], **opts)
    return {**base, "checkpoint": "stages/0/model.safetensors"}, {**pruned, "checkpoint": "stages/1/model.safetensors"}


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
    for text in ("Effective_ACs", "Effective_MACs", "Dense", "prune+T2", "features.1", "ANN twin", "sigma"):
        assert text in md, text
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


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
    points = [(10.0, 0.9), (5.0, 0.8), (20.0, 0.85), (5.0, 0.7), (1.0, 0.5)]
    assert pareto_front(points) == [4, 1, 0]


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


def test_compare_runs_rejects_a_folder_without_report(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no report.json"):
        compare_runs([tmp_path / "empty"], tmp_path / "cmp")
