"""Data-parallel training under torchrun: 2 gloo processes on the CPU against one process, same global batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from snncompress.distributed import ShardedLoader

# every test here starts gloo process groups (tens of seconds each)
pytestmark = pytest.mark.slow


DDP_RECIPE = """
name: ddp
seed: 0
device: cpu
data: {dataset: mnist-builtin, batch_size: 32, train_subset: 500, test_subset: 64}
model:
  arch: convnet
  timesteps: 2
  options: {features: [6, A], classifier: [16], dropout: 0.0}   # each rank draws its own dropout masks
stages:
  - {kind: train_ann, epochs: 1, lr: 1.0e-3, max_batches: 12, snapshot_every_steps: 1}
  - {kind: convert, calib_images: 32, calib_timesteps: 4}
  - {kind: train_snn, epochs: 1, lr: 1.0e-3, max_batches: 4, snapshot_every_steps: 1}
measure: {robustness_images: 16, ops_images: 16, latency_repeats: 1, noise_sigmas: [0.0]}
"""
#: |DDP - single| allowed on any weight: the gradients are summed in another order (measured:
#: at most 8e-8 after the 12 ANN steps, 2.3e-7 after the 4 SNN steps that follow).
ANN_TOLERANCE = 2e-6
SNN_TOLERANCE = 2e-5


def command(recipe: Path, out: Path, processes: int) -> list[str]:
    cli = ["-m", "snncompress.cli", "run", str(recipe), "--out", str(out)]
    if processes == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *cli]


def run(recipe: Path, out: Path, processes: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command(recipe, out, processes), capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    recipe = folder / "ddp.yaml"
    recipe.write_text(DDP_RECIPE)
    single = run(recipe, folder / "single", 1)
    ddp = run(recipe, folder / "ddp", 2)
    return folder, single, ddp


def tensors(folder: Path, stage: str) -> dict:
    return load_file(str(folder / "stages" / stage / "model.safetensors"))


def test_two_gloo_ranks_train_like_one_process_on_the_same_global_batch(runs):
    folder, _, _ = runs
    single, ddp = tensors(folder / "single", "00-train_ann"), tensors(folder / "ddp", "00-train_ann")
    assert single.keys() == ddp.keys()
    for key in single:
        assert torch.allclose(ddp[key], single[key], rtol=0, atol=ANN_TOLERANCE), \
            (key, (ddp[key] - single[key]).abs().max().item())
    snn_single, snn_ddp = tensors(folder / "single", "02-train_snn"), tensors(folder / "ddp", "02-train_snn")
    worst = max((snn_ddp[k].float() - snn_single[k].float()).abs().max().item() for k in snn_single)
    assert worst < SNN_TOLERANCE


def test_rank_zero_alone_writes_the_same_files_and_the_epoch_metrics_cover_the_whole_split(runs):
    folder, single_out, ddp_out = runs
    def files(root):
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files(folder / "ddp") == files(folder / "single")
    assert not [p for p in (folder / "ddp").rglob("*.tmp")]
    log_single = (folder / "single" / "stages" / "00-train_ann" / "train_log.csv").read_text().splitlines()
    log_ddp = (folder / "ddp" / "stages" / "00-train_ann" / "train_log.csv").read_text().splitlines()
    header = log_single[0].split(",")
    row_single = dict(zip(header, log_single[1].split(",")))
    row_ddp = dict(zip(header, log_ddp[1].split(",")))
    # train accuracy is summed over both ranks' shares: the same 12 x 32 images as one process
    assert float(row_ddp["train_accuracy"]) == pytest.approx(float(row_single["train_accuracy"]), abs=2 / 384)
    assert float(row_ddp["train_loss"]) == pytest.approx(float(row_single["train_loss"]), rel=1e-3)
    assert ddp_out.count("epoch 1/1") == 2 * 2  # each rank trains both stages and prints the reduced row


def test_the_sharded_loader_splits_each_global_batch_into_disjoint_shares():
    batches = [(torch.arange(10).view(10, 1).float(), torch.arange(10)), (torch.arange(3).view(3, 1).float(),
                                                                           torch.arange(10, 13))]
    shares = [list(ShardedLoader(batches, rank, 3)) for rank in range(3)]
    assert [s[0][1].tolist() for s in shares] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert [s[1][1].tolist() for s in shares] == [[10], [11], [12]]
    assert {s[0][2] for s in shares} == {10} and {s[1][2] for s in shares} == {3}


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc's parent ids)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def test_a_killed_ddp_run_resumes_to_the_uninterrupted_ddp_weights(runs):
    folder, _, _ = runs
    recipe, out = folder / "ddp.yaml", folder / "ddp-killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command(recipe, out, 2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    snapshot = out / "stages" / "00-train_ann" / "train_log.resume.safetensors"
    deadline = time.monotonic() + 300
    while not snapshot.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    for pid in [*descendants(proc.pid), proc.pid]:  # both ranks (torchrun starts them in their own sessions)
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    output = run(recipe, out, 2)
    assert "resuming at epoch 1" in output
    for stage in ("00-train_ann", "01-convert", "02-train_snn"):
        got, want = tensors(out, stage), tensors(folder / "ddp", stage)
        for key in want:
            assert torch.equal(got[key], want[key]), (stage, key)
