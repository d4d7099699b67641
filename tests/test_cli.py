"""The command line: bad input gives one line and exit 2; a rerun skips finished stages."""

import json
import os
import subprocess
import sys

import pytest

from snncompress.cli import main


def run_cli(*args):
    """Run the CLI in a subprocess (as a user would); returns (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "snncompress.cli", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return proc.returncode, proc.stdout, proc.stderr


def assert_user_error(capsys, args, fragment):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("snncompress: error:") and fragment in err, err


@pytest.mark.parametrize("override,fragment", [
    ("bogus_key=1", "bogus_key: unknown option"),
    ("model.timesteps=0", "model.timesteps: Input should be greater than or equal to 1"),
    ("model.timesteps=four", "model.timesteps: Input should be a valid integer"),
    ("stages.train_snn.lr=-0.1", "stages[2] (train_snn): lr: Input should be greater than 0"),
    ("model.arch=vgg99", "unknown model 'vgg99'"),
    ("stages.convert.percentile=150", "percentile: Input should be less than or equal to 100"),
    ("stages.0.kind=train_everything", "unknown stage 'train_everything'"),
    ("data.dataset=mnist", "mnist"),
    ("model.options={depth: 3}", "model.options.depth: unknown option"),
])
def test_bad_recipe_values_exit_2_with_one_line_and_write_nothing(capsys, tiny_recipe, tmp_path, override, fragment,
                                                                   monkeypatch):
    monkeypatch.delenv("SNNCOMPRESS_DATA", raising=False)
    out = tmp_path / "run"
    assert_user_error(capsys, ["run", tiny_recipe, "--out", out, "--set", override], fragment)
    assert not out.exists()


@pytest.mark.parametrize("name", ["../escaped", "a/b", ".hidden", "", "x" * 65])
def test_stage_name_that_is_not_a_plain_folder_name_exits_2_and_writes_nothing(capsys, tiny_recipe, tmp_path,
                                                                               name):
    out = tmp_path / "nested" / "run"
    assert_user_error(capsys, ["run", tiny_recipe, "--out", out, "--set", f"stages.train_snn.name={name!r}"],
                      "stages[2] (train_snn): name: String should")
    assert not (tmp_path / "nested").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


def test_missing_dataset_files_exit_2(capsys, tiny_recipe, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    assert_user_error(capsys, ["run", tiny_recipe, "--out", out, "--set", "data.dataset=fashion-mnist",
                               "--set", f"data.data_dir={empty}"], "fashion-mnist")
    assert not out.exists()


def test_missing_recipe_and_bad_yaml_exit_2(capsys, tmp_path):
    assert_user_error(capsys, ["run", tmp_path / "nope.yaml", "--out", tmp_path / "o"], "recipe not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [unclosed")
    assert_user_error(capsys, ["run", bad, "--out", tmp_path / "o"], "not valid YAML")


def test_incompatible_checkpoint_exit_2(capsys, tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert_user_error(capsys, ["evaluate", bad, "--out", tmp_path / "ev"], "not a snncompress checkpoint")
    assert not (tmp_path / "ev").exists()


def test_subprocess_user_error_has_no_traceback(tiny_recipe, tmp_path):
    code, _, err = run_cli("run", tiny_recipe, "--out", tmp_path / "r", "--set", "model.timesteps=0")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_run_writes_report_and_rerun_skips_finished_stages(tiny_recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(tiny_recipe), "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert "running stage train_snn" in first
    report = json.loads((out / "report.json").read_text())
    for key in ("accuracy", "timesteps", "params", "nonzero_params", "checkpoint"):
        assert report["final"][key] is not None
    assert report["final"]["timesteps"] == 2
    assert [s["name"] for s in report["stages"]] == ["train_ann", "convert", "train_snn"]
    assert (out / report["final"]["checkpoint"]).is_file()
    stamp = (out / "stages/02-train_snn/model.safetensors").stat().st_mtime_ns

    assert main(["run", str(tiny_recipe), "--out", str(out)]) == 0
    second = capsys.readouterr().out
    assert second.count("finished earlier; skipped") == 3 and "running stage" not in second
    assert "[report] measuring" not in second                       # the cached measurement is reused
    assert (out / "stages/02-train_snn/model.safetensors").stat().st_mtime_ns == stamp

    # changed measurement options re-measure (no stage reruns) instead of reporting stale numbers
    assert main(["run", str(tiny_recipe), "--out", str(out), "--set", "measure.noise_sigmas=[0.0, 0.2]"]) == 0
    remeasured = capsys.readouterr().out
    assert remeasured.count("finished earlier; skipped") == 3 and "[report] measuring train_snn" in remeasured
    assert sorted(json.loads((out / "report.json").read_text())["final"]["robustness"]) == ["0.0", "0.2"]
    assert json.loads((out / "report.json").read_text())["final"]["accuracy"] == report["final"]["accuracy"]

    # changing the last stage's options reruns that stage only
    assert main(["run", str(tiny_recipe), "--out", str(out), "--set", "stages.train_snn.lr=2e-4"]) == 0
    third = capsys.readouterr().out
    assert third.count("finished earlier; skipped") == 2 and "running stage train_snn" in third


@pytest.mark.slow
def test_resumed_run_trains_like_an_uninterrupted_one(tiny_recipe, tmp_path, capsys):
    """A run resumed after its first stages sees the same training shuffles as one that never stopped."""
    import shutil

    import torch
    from snncompress import load

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(["run", str(tiny_recipe), "--out", str(whole)]) == 0
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "stages/02-train_snn")
    assert main(["run", str(tiny_recipe), "--out", str(resumed)]) == 0
    assert capsys.readouterr().out.count("finished earlier; skipped") == 2
    a = load(whole / "stages/02-train_snn/model.safetensors")
    b = load(resumed / "stages/02-train_snn/model.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_same_seed_gives_the_same_run(tiny_recipe, tmp_path, capsys):
    reports = []
    for name in ("a", "b"):
        import torch
        torch.rand(97)  # whatever ran before must not change the run: the recipe's seed decides
        assert main(["run", str(tiny_recipe), "--out", str(tmp_path / name)]) == 0
        reports.append(json.loads((tmp_path / name / "report.json").read_text()))
    capsys.readouterr()
    acc = [[s["metrics"]["accuracy"] for s in r["stages"]] for r in reports]
    assert acc[0] == acc[1]
    from snncompress import load
    import torch
    a = load(tmp_path / "a" / reports[0]["final"]["checkpoint"])
    b = load(tmp_path / "b" / reports[1]["final"]["checkpoint"])
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_stages_command_lists_options_with_defaults_and_descriptions(capsys):
    assert main(["stages", "temporal"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("temporal  (stp)  Lower T along the schedule")
    assert "    tolerance = 0.01  [Ge(ge=0), Le(le=1)]  accepted validation-accuracy drop below the start" in out
    assert "    lr_schedule = 'cosine'" in out and "lean_memory = False" in out
    assert main(["stages"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line and not line.startswith(" ")]
    from snncompress.stages import stage_kinds

    assert sorted(listed) == sorted(stage_kinds())  # every registered stage, each once
    assert {"convert", "evaluate", "load", "prune_pca", "quant_sweep", "temporal", "train_ann",
            "train_snn"} <= set(listed)
    assert_user_error(capsys, ["stages", "prune_everything"], "unknown stage 'prune_everything'")


def test_version_flag_prints_the_package_version():
    import snncompress

    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"snncompress {snncompress.__version__}"
