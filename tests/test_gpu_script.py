"""The device script's dry run: the GPU chain (DIET VGG16 then STP from it) end to end on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def tiny_cifar(root: Path, per_class: int = 24) -> Path:
    """A 32x32 RGB ImageFolder (train/ and test/, 2 classes): class 1 is brighter."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in range(2):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 128, (32, 32, 3)) + 100 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_the_device_script_dry_run_runs_both_recipes_and_prints_the_summary(tmp_path):
    data = tiny_cifar(tmp_path / "data")
    env = {**os.environ, "DRY_RUN": "1", "DATASET": f"imagefolder:{data}", "OMP_NUM_THREADS": "2"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_cifar10.sh"), str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    diet = json.loads((tmp_path / "out" / "diet" / "report.json").read_text())
    stp = json.loads((tmp_path / "out" / "stp" / "report.json").read_text())
    assert [s["kind"] for s in diet["stages"]] == ["train_ann", "convert", "train_snn"]
    assert [s["kind"] for s in stp["stages"]] == ["load", "prune_pca", "temporal", "quant_sweep"]
    assert diet["model"] == "vgg16" and diet["final"]["timesteps"] == 5
    assert stp["stages"][0]["metrics"]["footprint_bytes"] == diet["final"]["footprint_bytes"]
    assert stp["final"]["footprint_bytes"] < diet["final"]["footprint_bytes"]
    assert stp["final"]["timesteps"] <= 3
    summary = done.stdout[done.stdout.index("run    stage"):].splitlines()
    assert [line.split()[:2] for line in summary[1:]] == [
        ["diet", "train_ann"], ["diet", "convert"], ["diet", "train_snn"],
        ["stp", "load"], ["stp", "prune_pca"], ["stp", "temporal"], ["stp", "quant_sweep"]]
