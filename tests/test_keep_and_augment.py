"""A training stage's ``keep: best`` (the best validation epoch's weights) and its own ``augment``."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from snncompress import cli
from snncompress.data import TensorBatchLoader
from snncompress.pipeline import fingerprint, stage_augmentation, validate_stages
from snncompress.recipe import load_recipe
from snncompress.stages.base import TrainOptions
from snncompress.training import Callback, TrainConfig, train

from conftest import CRIT_TINY_HEAD
from test_resume import StopAt, assert_same, tiny_loader, tiny_model, weights
from test_stage_seed import PAIRED_RECIPE


class ScriptedValidation(Callback):
    """Replace each epoch's validation accuracy by a scripted one and record the weights at that point."""

    def __init__(self, accuracies: list[float]):
        self.accuracies, self.snapshots = accuracies, []

    def on_epoch_end(self, state, row):
        row["val_accuracy"] = self.accuracies[row["epoch"] - 1]
        self.snapshots.append(weights(state.model))


@pytest.mark.parametrize("keep, kept_epoch", [("best", 2), ("last", 3)])
def test_a_run_ends_with_the_weights_of_the_epoch_it_keeps(keep, kept_epoch):
    script = ScriptedValidation([0.5, 0.9, 0.7])
    model, loader = tiny_model().set_spiking(True), tiny_loader()
    history = train(model, loader, loader, TrainConfig(epochs=3, lr=1e-2, keep=keep), callbacks=[script])
    assert_same(weights(model), script.snapshots[kept_epoch - 1])
    assert not torch.equal(script.snapshots[1]["features.0.weight"], script.snapshots[2]["features.0.weight"])
    assert [row.get("kept") for row in history] == ([0, 1, 0] if keep == "best" else [None] * 3)


def test_ties_keep_the_earlier_epoch():
    script = ScriptedValidation([0.8, 0.8, 0.6])
    model, loader = tiny_model().set_spiking(True), tiny_loader()
    train(model, loader, loader, TrainConfig(epochs=3, lr=1e-2, keep="best"), callbacks=[script])
    assert_same(weights(model), script.snapshots[0])


def test_a_resumed_run_keeps_the_same_best_epoch(tmp_path):
    config = TrainConfig(epochs=3, lr=1e-2, keep="best", snapshot_every_steps=2)
    reference, loader = tiny_model().set_spiking(True), tiny_loader()
    train(reference, loader, loader, config, callbacks=[ScriptedValidation([0.5, 0.9, 0.7])])
    snapshot = tmp_path / "t.resume.safetensors"
    loader = tiny_loader()
    with pytest.raises(RuntimeError):  # 6 steps per epoch: killed in epoch 3, after the best (2) was kept
        train(tiny_model().set_spiking(True), loader, loader, config, snapshot_path=snapshot,
              callbacks=[ScriptedValidation([0.5, 0.9, 0.7]), StopAt(16)])
    resumed, loader = tiny_model().set_spiking(True), tiny_loader()  # the same callbacks, as a rerun has
    history = train(resumed, loader, loader, config, snapshot_path=snapshot,
                    callbacks=[ScriptedValidation([0.5, 0.9, 0.7]), StopAt(10**6)])
    assert_same(weights(resumed), weights(reference))
    assert [row["kept"] for row in history] == [0, 1, 0]


def _columns_loader(augment: bool) -> TensorBatchLoader:
    """16 images 1x3x6, every row with pixel values 10..15 from left to right, one batch."""
    images = torch.arange(10, 16, dtype=torch.uint8).repeat(16, 3, 1).view(16, 1, 3, 6)
    return TensorBatchLoader(images, torch.zeros(16, dtype=torch.int64), [0.0], [1 / 255], 16, shuffle=True,
                             augment=augment, seed=1, crop_padding=3)


def _rows(loader) -> list[list[int]]:
    """The middle row of each image of the first batch (inside the crop at a padding of 1)."""
    images, _ = next(iter(loader))
    return images[:, 0, 1].round().to(torch.int64).tolist()


def _stage(**options) -> TrainOptions:
    return TrainOptions(kind="train_snn", **options)


class _Data:
    """The recipe's data section, as far as stage_augmentation reads it."""

    crop_padding = 4


def test_a_stage_flips_only_while_it_runs_and_the_recipe_augmentation_returns():
    loader, plain = _columns_loader(augment=False), list(range(10, 16))
    with stage_augmentation(loader, _stage(augment="flip"), _Data()):
        rows = _rows(loader)
    assert {tuple(row) for row in rows} == {tuple(plain), tuple(reversed(plain))}  # flipped or not, never shifted
    assert (loader.augment, loader.crop_padding) == (False, 3)
    assert _rows(loader) == [plain] * 16


def test_a_stage_crops_with_its_own_padding_or_the_recipes_and_none_switches_augmentation_off():
    loader = _columns_loader(augment=True)
    with stage_augmentation(loader, _stage(augment="crop_flip", crop_padding=1), _Data()):
        rows = _rows(loader)
    assert sorted({row.count(0) for row in rows}) == [0, 1]  # shifted by 1 pixel or not
    with stage_augmentation(loader, _stage(augment="crop_flip"), _Data()):
        assert loader.crop_padding == 4  # the recipe's data.crop_padding
    with stage_augmentation(loader, _stage(augment="none"), _Data()):
        assert _rows(loader) == [list(range(10, 16))] * 16
    assert (loader.augment, loader.crop_padding) == (True, 3)


def test_crop_padding_needs_crop_flip(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(PAIRED_RECIPE.replace("max_batches: 2}", "max_batches: 2, augment: flip, crop_padding: 2}", 1))
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "crop_padding: only used with augment: crop_flip" in err[0]
    assert not (tmp_path / "out").exists()


def test_keep_and_augment_at_their_defaults_keep_existing_fingerprints(tmp_path):
    recipe = tmp_path / "r.yaml"
    prints = []
    for extra in ("", ", keep: last", ", keep: best", ", augment: flip"):
        recipe.write_text(PAIRED_RECIPE.replace("max_batches: 2}", f"max_batches: 2{extra}}}", 1))
        loaded, _ = load_recipe(recipe)
        (_, opts), *_ = validate_stages(loaded, "test")
        prints.append(fingerprint(loaded, opts, ""))
    assert prints[0] == prints[1]
    assert len(set(prints)) == 3


def test_a_stage_augment_on_an_image_folder_dataset_is_refused_before_any_write(tmp_path, capsys):
    from test_data import _write_png_tree
    _write_png_tree(tmp_path / "tree" / "train", ["cat", "dog"], 5)
    _write_png_tree(tmp_path / "tree" / "test", ["cat", "dog"], 2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: folder
data: {{dataset: "imagefolder:{tmp_path / 'tree'}", batch_size: 4, val_fraction: 0.2}}
model: {{arch: convnet, timesteps: 2, options: {{features: [4, A], classifier: [8]}}}}
stages:
  - {{kind: train_ann, epochs: 1, augment: flip}}
""")
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage train_ann: augment applies to in-memory datasets" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_criticality_pruning_phase_ends_at_its_last_event_under_keep_best(tmp_path, monkeypatch):
    # validation accuracy falls every epoch, so keep: best would pick the first, denser epoch; the pruning
    # phase still ends at its target sparsity, and only the fine-tuning keeps its best (first) epoch
    from snncompress.training import loop
    calls = []
    monkeypatch.setattr(loop, "evaluate_accuracy", lambda *a, **k: calls.append(0) or 1.0 / len(calls))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(CRIT_TINY_HEAD + """
stages:
  - {kind: train_snn, epochs: 1, lr: 1.0e-3, max_batches: 2}
  - {kind: prune_criticality, epochs: 2, max_batches: 4, dt: 2, regrow_ratio: 0, keep: best,
     finetune_epochs: 2, finetune_max_batches: 2}
measure: {robustness_images: 32, ops_images: 32, latency_repeats: 2, noise_sigmas: [0.0]}
""")
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 0
    stage = tmp_path / "run" / "stages" / "01-prune_criticality"
    live = sum(v.numel() for k, v in load_file(stage / "model.safetensors").items() if k.endswith("@values"))
    assert live == 676  # 10% of the 6,756 conv/linear weights, as without keep
    assert "kept" not in (stage / "prune_log.csv").read_text().splitlines()[0]
    assert [line.split(",")[-1] for line in (stage / "finetune_log.csv").read_text().splitlines()] == \
        ["kept", "1", "0"]
