"""Fault tolerance: resumable training snapshots, kill -9 / Ctrl-C and resume, non-finite loss, the run lock."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from snncompress import cli
from snncompress.data import TensorBatchLoader
from snncompress.io import folder_lock
from snncompress.models import build_model
from snncompress.training import Callback, TrainConfig, seed_everything, train
from snncompress.training.loop import TrainingDiverged


def tiny_loader(n=96, batch=16, seed=3) -> TensorBatchLoader:
    """Shuffled, augmented random images (labels from their brightness): order and crops depend on (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=gen)
    labels = (images.float().mean((1, 2, 3)) > 127.5).long() + (images[:, 0, :4].float().mean((1, 2)) > 127.5).long()
    return TensorBatchLoader(images, labels, [0.5], [0.25], batch, shuffle=True, augment=True, seed=seed)


def tiny_model():
    seed_everything(0)
    return build_model("convnet", 3, (1, 8, 8), 2, features=[4, "A"], classifier=[8], dropout=0.3,
                       neuron={"threshold": 0.3})


CONFIG = TrainConfig(epochs=2, lr=1e-2, snapshot_every_steps=2)


class StopAt(Callback):
    """Raise at a given step (after the optimizer step, before any snapshot of it): a crash mid-epoch."""

    def __init__(self, step: int, error=RuntimeError):
        self.stop, self.error = step, error

    def after_step(self, state):
        if state.step + 1 == self.stop:
            raise self.error("killed")


def weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_crash_mid_epoch_resumes_to_the_same_weights(tmp_path):
    loader = tiny_loader()
    reference, start = tiny_model().set_spiking(True), weights(tiny_model())
    reference_history = train(reference, loader, loader, CONFIG)
    assert reference_history[-1]["train_loss"] < reference_history[0]["train_loss"]  # it learns
    assert not torch.equal(reference.state_dict()["features.0.weight"], start["features.0.weight"])
    for crash_step in (1, 6, 9):  # 6 steps per epoch: before any snapshot, at an epoch's end, mid-epoch 2
        snapshot = tmp_path / f"s{crash_step}.resume.safetensors"
        loader = tiny_loader()
        with pytest.raises(RuntimeError):
            train(tiny_model().set_spiking(True), loader, loader, CONFIG, snapshot_path=snapshot,
                  callbacks=[StopAt(crash_step)])
        assert snapshot.is_file() == (crash_step > 2)  # the first snapshot follows step 2
        resumed = tiny_model().set_spiking(True)
        loader = tiny_loader()  # a new process: the loader's epoch counter starts at 0 again
        history = train(resumed, loader, loader, CONFIG, snapshot_path=snapshot)
        assert_same(weights(resumed), weights(reference))
        assert [h["train_loss"] for h in history] == pytest.approx([h["train_loss"] for h in reference_history],
                                                                   rel=1e-12)
        assert loader.epoch == 2


def test_a_snapshot_of_another_config_or_start_is_ignored(tmp_path, capsys):
    snapshot = tmp_path / "t.resume.safetensors"
    loader = tiny_loader()
    train(tiny_model().set_spiking(True), loader, loader, CONFIG, snapshot_path=snapshot)
    other = TrainConfig(epochs=2, lr=2e-2, snapshot_every_steps=2)
    model, loader = tiny_model().set_spiking(True), tiny_loader()
    history = train(model, loader, loader, other, snapshot_path=snapshot)
    assert "another configuration" in capsys.readouterr().out
    assert len(history) == 2
    fresh, loader = tiny_model().set_spiking(True), tiny_loader()
    train(fresh, loader, loader, other)
    assert_same(weights(model), weights(fresh))


def test_ctrl_c_saves_a_snapshot_between_steps_and_the_rerun_finishes_the_same(tmp_path):
    loader = tiny_loader()
    reference = tiny_model().set_spiking(True)
    train(reference, loader, loader, CONFIG)

    class CtrlC(Callback):
        def after_step(self, state):
            if state.step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    snapshot = tmp_path / "c.resume.safetensors"
    loader = tiny_loader()
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs as a shell's background job
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model().set_spiking(True), loader, loader, CONFIG, snapshot_path=snapshot, callbacks=[CtrlC()])
    assert signal.getsignal(signal.SIGINT) is before  # the handler was put back
    resumed, loader = tiny_model().set_spiking(True), tiny_loader()
    train(resumed, loader, loader, CONFIG, snapshot_path=snapshot)
    assert_same(weights(resumed), weights(reference))


def test_a_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_snapshot(tmp_path):
    class Explode(Callback):
        def loss(self, state, images, labels, logits, loss):
            return loss * float("nan") if state.step == 7 else loss

    snapshot = tmp_path / "n.resume.safetensors"
    loader = tiny_loader()
    with pytest.raises(TrainingDiverged) as info:
        train(tiny_model().set_spiking(True), loader, loader, CONFIG, snapshot_path=snapshot, desc="snn",
              callbacks=[Explode()])
    assert str(info.value) == ("snn: the loss became nan at epoch 2, batch 2; training stopped (try a lower lr); "
                               "the last good state is kept in n.resume.safetensors")
    kept = load_file(str(snapshot))
    assert all(torch.isfinite(v).all() for k, v in kept.items() if k.startswith("model.") and v.is_floating_point())


def test_a_second_run_on_a_live_run_folder_is_refused(tiny_recipe, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with folder_lock(out):
        code = cli.main(["run", str(tiny_recipe), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"snncompress: error: {out} is in use by a live snncompress run (pid {os.getpid()}); " \
                  "wait for it to finish or choose another --out"
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


# ----------------------------------------------------------------------------- kill -9 of the real command

KILL_RECIPE = """
name: killme
seed: 1
device: cpu
data: {dataset: mnist-builtin, batch_size: 16, train_subset: 1200, test_subset: 64}
model:
  arch: convnet
  timesteps: 2
  options: {features: [6, A], classifier: [16], dropout: 0.2}
stages:
  - {kind: train_ann, epochs: 2, lr: 1.0e-3, max_batches: 40, snapshot_every_steps: 1}
  - {kind: convert, calib_images: 32, calib_timesteps: 4}
  - {kind: train_snn, epochs: 2, lr: 1.0e-3, max_batches: 30, snapshot_every_steps: 1}
measure: {robustness_images: 16, ops_images: 16, latency_repeats: 1, noise_sigmas: [0.0]}
"""
STAGES = ("00-train_ann", "01-convert", "02-train_snn")


def start(recipe: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "snncompress.cli", "run", str(recipe), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finish(recipe: Path, out: Path) -> str:
    proc = start(recipe, out)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    return output


def interrupt_when(snapshot: Path, proc: subprocess.Popen, delay: float, sig: int) -> str:
    """Send ``sig`` ``delay`` seconds after ``snapshot`` first appears (a point inside that training)."""
    deadline = time.monotonic() + 300
    while not snapshot.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(sig)
    return proc.communicate(timeout=300)[0]


@pytest.fixture(scope="module")
def kill_recipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kill")
    recipe = folder / "killme.yaml"
    recipe.write_text(KILL_RECIPE)
    finish(recipe, folder / "reference")
    return recipe, folder


def resumed_mid_epoch(output: str) -> bool:
    return any("resuming at epoch" in line and "batch 0 " not in line for line in output.splitlines())


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_random_points_then_rerun_gives_the_uninterrupted_weights(kill_recipe, seed):
    """Killed once inside the ANN training and once inside the SNN training (Ctrl-C there for seed 2)."""
    recipe, folder = kill_recipe
    out, rng = folder / f"killed{seed}", random.Random(seed)
    outputs = []
    for stage in ("00-train_ann", "02-train_snn"):
        sig = signal.SIGINT if seed == 2 and stage == "02-train_snn" else signal.SIGKILL
        proc = start(recipe, out)
        outputs.append(interrupt_when(out / "stages" / stage / "train_log.resume.safetensors", proc,
                                      rng.uniform(0.0, 0.1), sig))
        assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL), outputs[-1]
    outputs.append(finish(recipe, out))
    assert any(map(resumed_mid_epoch, outputs)), outputs
    for stage in STAGES:
        got = load_file(str(out / "stages" / stage / "model.safetensors"))
        want = load_file(str(folder / "reference" / "stages" / stage / "model.safetensors"))
        assert_same(got, want)
        assert not list((out / "stages" / stage).glob("*.resume.safetensors"))


@pytest.mark.slow
def test_the_snapshot_interval_is_not_part_of_what_a_run_computes(tiny_recipe, tmp_path, capsys):
    from snncompress.training.resume import run_key

    model = tiny_model()
    base = run_key(TrainConfig(epochs=2, lr=1e-2, snapshot_every_steps=2), model, 6)
    assert run_key(TrainConfig(epochs=2, lr=1e-2, snapshot_every_steps=50), model, 6) == base
    assert run_key(TrainConfig(epochs=2, lr=2e-2, snapshot_every_steps=2), model, 6) != base
    assert run_key(TrainConfig(epochs=2, lr=1e-2, snapshot_every_steps=2), model, 7) != base
    out = tmp_path / "run"
    assert cli.main(["run", str(tiny_recipe), "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["run", str(tiny_recipe), "--out", str(out), "--set", "stages.train_snn.snapshot_every_steps=1"]) == 0
    assert capsys.readouterr().out.count("finished earlier; skipped") == 3
