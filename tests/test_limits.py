"""Resource limits (docs/limits.md): estimates against measured peaks, refusals before any write,
and disk errors that end with one line and leave every finished file whole."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_RECIPE
from safetensors import SafetensorError
from safetensors.torch import load_file

import snncompress.checkpoint
import snncompress.resources
import snncompress.training.resume
from snncompress import build_model, save_checkpoint
from snncompress.cli import main
from snncompress.errors import UserError
from snncompress.io import atomic_write, write_json
from snncompress.pipeline import Run
from snncompress.resources import network_size

GIB = 2**30


def test_network_size_counts_the_tiny_convnet_by_hand():
    # conv 4x28x28 = 3136, its LIF 3136, pool 4x14x14 = 784, linear 8, LIF 8, dropout 8, linear 10
    # parameters: conv 4x1x3x3 = 36, linear 784x8 = 6272, linear 8x10 = 80, leak and threshold of 2 LIFs = 4
    size = network_size("convnet", 10, (1, 28, 28), features=[4, "A"], classifier=[8])
    assert size.activations == 3136 * 2 + 784 + 8 * 3 + 10 == 7090
    assert size.params == 36 + 6272 + 80 + 4 == 6392


#: Runs a recipe's stages in order; prints, for each, the estimate and the measured peak RSS growth (bytes).
MEASURE = """
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from snncompress.pipeline import Run

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

run, model, found = Run(sys.argv[1], sys.argv[2]), None, []
for index, (stage, opts) in enumerate(run.stages):
    folder = Path(sys.argv[2]) / str(index)
    folder.mkdir(parents=True)
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current RSS
    start = status("VmRSS")
    model = stage.run(run.context(model, folder, []), opts).model or model
    found.append({"stage": opts.name, "estimate": run.estimates[index].bytes, "peak": status("VmHWM") - start})
print(json.dumps(found))
"""

MEASURED_RECIPE = """
name: measured
seed: 0
device: cpu
data: {dataset: mnist-builtin, batch_size: 256, train_subset: 512, test_subset: 64, test_batch_size: 64}
model: {arch: convnet, timesteps: 8, options: {features: [16, A, 32, A], classifier: [64]}}
stages:
  - {kind: train_ann, epochs: 1, max_batches: 1}
  - {kind: train_snn, epochs: 1, max_batches: 1}
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_estimates_are_within_2x_of_the_measured_peak_memory(tmp_path):
    """An ANN and a BPTT training step whose activations (about 90 MB and 700 MB) dwarf the rest."""
    recipe = tmp_path / "measured.yaml"
    recipe.write_text(MEASURED_RECIPE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(recipe), str(tmp_path / "scratch")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [f["stage"] for f in found] == ["train_ann", "train_snn"]
    for stage in found:
        assert stage["estimate"] / 2 <= stage["peak"] <= stage["estimate"] * 2, stage
    # the estimates themselves, by hand: 42538 activations and 105750 parameters (network_size), float32,
    # two saved tensors per activation, four parameter copies; T = 1 (ANN) and 8, batch 256
    assert found[0]["estimate"] == 42538 * 1 * 256 * 4 * 2 + 105750 * 4 * 4
    assert found[1]["estimate"] == 42538 * 8 * 256 * 4 * 2 + 105750 * 4 * 4


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """The tiny recipe in a folder, on a machine said to have 16 MiB (so the lines do not depend on it)."""
    monkeypatch.setattr(snncompress.resources, "available_memory", lambda device="cpu": 16 * 2**20)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TINY_RECIPE)
    return tmp_path


def refusal(overrides: list[str]) -> str:
    with pytest.raises(UserError) as caught:
        Run("tiny.yaml", "out", overrides)
    return str(caught.value)


def test_timesteps_refusal_names_the_option_and_the_estimate(tiny):
    # the report's measurement: 7090 activations x 1e9 steps x 64 test images x 4 bytes x 2 = 3.6 PB
    assert refusal(["model.timesteps=1000000000"]) == (
        "recipe tiny.yaml: model.timesteps: 1000000000 needs about 3.6 PB for measure inference activations; "
        "this machine has 16 MiB available (--ignore-limits runs it anyway)")


def test_batch_size_refusal_counts_the_images_a_batch_can_hold(tiny):
    # a batch holds at most the 231 training images: 7090 x 2 steps x 231 x 4 bytes x 2 + 6392 x 16 = 26 MB
    assert refusal(["data.batch_size=1000000000000"]) == (
        "recipe tiny.yaml: data.batch_size: 1000000000000 needs about 26 MB for train_snn activations; "
        "this machine has 16 MiB available (--ignore-limits runs it anyway)")


def test_width_refusal_names_model_options(tiny):
    # 1000 channels: conv and LIF 2 x 784000, pool 196000 activations, 784 x 8 -> 196000 x 8 weights
    assert refusal(["model.options.features=[1000, A]"]).startswith(
        "recipe tiny.yaml: model.options: {features: [1000, 'A'], classifier: [8]} needs about ")


@pytest.mark.parametrize("override, line", [
    ("stages.convert.calib_images=100000000",
     "stages.convert.calib_images: 100000000 images is above the ceiling of 10000000"),
    ("measure.latency_repeats=1000000", "measure.latency_repeats: 1000000 repeats is above the ceiling of 100000"),
    ("measure.robustness_images=20000000",
     "measure.robustness_images: 20000000 images is above the ceiling of 10000000"),
    ("stages.train_snn.epochs=100000000",
     "stages.train_snn.epochs: 100000000 epochs of 2 batches are 200000000 training steps, above the ceiling of "
     "100000000"),
])
def test_count_refusals_name_the_option_and_the_ceiling(tiny, override, line):
    assert refusal([override]) == f"recipe tiny.yaml: {line} (--ignore-limits runs it anyway)"


def test_ignore_limits_lets_the_recipe_through(tiny):
    run = Run("tiny.yaml", "out", ["model.timesteps=1000000000", "measure.latency_repeats=1000000"],
              ignore_limits=True)
    assert run.recipe.model.timesteps == 10**9 and run.estimates == []
    assert not (tiny / "out").exists()


def test_the_tiny_recipe_fits(tiny):
    run = Run("tiny.yaml", "out")
    assert max(e.bytes for e in run.estimates) < 16 * 2**20


def test_cli_refuses_with_one_line_exit_2_and_writes_nothing(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_RECIPE)
    proc = subprocess.run([sys.executable, "-m", "snncompress.cli", "run", "tiny.yaml", "--out", "out",
                           "--set", "model.timesteps=1000000000"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("snncompress: error: recipe tiny.yaml: model.timesteps: 1000000000 needs about "
                                  "3.6 PB for measure inference activations; this machine has ")
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_counts_from_set(tmp_path, capsys):
    ckpt = tmp_path / "model.safetensors"
    save_checkpoint(ckpt, build_model("convnet", 10, (1, 28, 28), 2, features=[4, "A"], classifier=[8]),
                    info={"dataset": "mnist-builtin"})
    code = main(["evaluate", str(ckpt), "--out", str(tmp_path / "out"), "--set", "ops_images=100000000"])
    assert code == 2
    assert capsys.readouterr().err == ("snncompress: error: evaluate --set: ops_images: 100000000 images is above "
                                       "the ceiling of 10000000 (--ignore-limits runs it anyway)\n")
    assert not (tmp_path / "out").exists()


def test_quantize_refuses_counts_and_memory_before_writing(tmp_path, capsys):
    ckpt = tmp_path / "model.safetensors"
    save_checkpoint(ckpt, build_model("convnet", 10, (1, 28, 28), 2, features=[4, "A"], classifier=[8]),
                    info={"dataset": "mnist-builtin"})
    out = tmp_path / "out"
    assert main(["quantize", str(ckpt), "--out", str(out), "--set", "max_candidates=10000000"]) == 2
    assert capsys.readouterr().err == ("snncompress: error: quantize --set: max_candidates: 10000000 candidates is "
                                       "above the ceiling of 1000000 (--ignore-limits runs it anyway)\n")
    # T = 10^9: one validation batch of 512 images needs 512 x 10^9 x 7090 activations (conv 3136, its LIF 3136,
    # pool 784, linear, LIF and dropout 8 each, output 10) x 4 bytes x 2 copies = 29.0 PB
    huge = tmp_path / "huge.safetensors"
    save_checkpoint(huge, build_model("convnet", 10, (1, 28, 28), 10**9, features=[4, "A"], classifier=[8]),
                    info={"dataset": "mnist-builtin"})
    assert main(["quantize", str(huge), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "snncompress: error: quantize --set: batch: 512 needs about 29 PB for quantize inference activations; "
        "this machine has ")
    assert not out.exists()


# ----------------------------------------------------------------------------- disk errors


def no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("code, cause", [(errno.ENOSPC, "no space left on the device"),
                                         (errno.EROFS, "the file system is read-only"),
                                         (errno.EDQUOT, "the disk quota is exceeded"),
                                         (errno.EACCES, "permission denied")])
def test_a_failed_write_is_one_line_and_keeps_the_previous_file(tmp_path, code, cause):
    path = tmp_path / "metrics.json"
    write_json(path, {"complete": True})

    def half_then_fail(tmp):
        Path(tmp).write_text('{"comp')
        raise OSError(code, os.strerror(code))

    with pytest.raises(UserError) as caught:
        atomic_write(path, half_then_fail)
    assert str(caught.value) == (f"cannot write {path}: {cause}; nothing was left half-written: free space or "
                                 f"fix the folder, then rerun the same command to resume")
    assert json.loads(path.read_text()) == {"complete": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_safetensors_disk_error_is_one_line(tmp_path, monkeypatch):
    def full(_tensors, tmp, metadata=None):
        Path(tmp).write_bytes(b"\x00" * 10)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(snncompress.checkpoint, "save_file", full)
    path = tmp_path / "model.safetensors"
    with pytest.raises(UserError, match=r"^cannot write .*model\.safetensors: no space left on the device; "):
        save_checkpoint(path, build_model("convnet", 10, (1, 28, 28), 2, features=[4, "A"], classifier=[8]))
    assert list(tmp_path.iterdir()) == []


def test_an_error_that_is_not_about_the_disk_is_not_hidden(tmp_path):
    def bug(_tmp):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        atomic_write(tmp_path / "x.json", bug)
    assert list(tmp_path.iterdir()) == []


def snapshot_recipe(folder: Path) -> Path:
    raw = yaml.safe_load(TINY_RECIPE)
    raw["stages"][2].update(max_batches=4, snapshot_every_steps=1)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def final_weights(out: Path) -> dict:
    return load_file(str(out / "stages" / "02-train_snn" / "model.safetensors"))


def test_a_full_disk_mid_stage_ends_cleanly_and_the_rerun_ends_with_the_same_weights(tmp_path, monkeypatch,
                                                                                      capsys):
    recipe = snapshot_recipe(tmp_path)
    assert main(["run", str(recipe), "--out", str(tmp_path / "whole")]) == 0

    real_save, calls = snncompress.training.resume.save_file, []

    def third_snapshot_fails(tensors, tmp, metadata=None):
        calls.append(json.loads(metadata[snncompress.training.resume.META_KEY])["progress"]["step"])
        if len(calls) == 3:
            Path(tmp).write_bytes(b"\x00" * 64)  # part of the file, then the disk is full
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
        return real_save(tensors, tmp, metadata=metadata)

    out = tmp_path / "cut"
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(snncompress.training.resume, "save_file", third_snapshot_fails)
        assert main(["run", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    snapshot = out / "stages" / "02-train_snn" / "train_log.resume.safetensors"
    assert err == (f"snncompress: error: stage train_snn: cannot write {snapshot}: no space left on the device; "
                   f"nothing was left half-written: free space or fix the folder, then rerun the same command "
                   f"to resume\n")
    # the finished stages are whole, the snapshot is the last one written whole, no temporary file is left
    assert (out / "stages" / "01-convert" / "metrics.json").is_file()
    assert not (out / "stages" / "02-train_snn" / "metrics.json").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    with snncompress.training.resume.safe_open(str(snapshot), framework="pt") as opened:
        meta = opened.metadata()
    assert json.loads(meta[snncompress.training.resume.META_KEY])["progress"]["step"] == calls[1] < calls[2]

    assert main(["run", str(recipe), "--out", str(out)]) == 0  # space freed: resumes from the snapshot
    assert "resuming stage train_snn" in capsys.readouterr().out
    whole, resumed = final_weights(tmp_path / "whole"), final_weights(out)
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
