"""A stage's own ``seed``: repeats of a stage over seeds, paired across methods (same batches, same order)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from snncompress.data import TensorBatchLoader
from snncompress.pipeline import Run, fingerprint, stage_data_order, validate_stages
from snncompress.recipe import load_recipe

from conftest import CRIT_TINY_HEAD


def _loader(seed: int) -> TensorBatchLoader:
    """40 one-pixel images whose labels are their indices, 8 per batch, shuffled."""
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1)
    return TensorBatchLoader(images, torch.arange(40), [0.0], [1.0], 8, shuffle=True, augment=False, seed=seed)


def _order(loader) -> list[int]:
    """The labels of one epoch, in the order the loader gives them."""
    return torch.cat([labels for _, labels in loader]).tolist()


def test_a_seeded_stage_sees_a_fresh_runs_order_and_the_run_resumes_its_own():
    run, fresh, untouched = _loader(0), _loader(7), _loader(0)
    run.set_epoch(3)
    untouched.set_epoch(3)
    with stage_data_order(run, 7):
        seen = [_order(run), _order(run)]
    assert seen == [_order(fresh), _order(fresh)]  # epochs 0 and 1 of seed 7
    assert (run.seed, run.epoch) == (0, 3)
    assert _order(run) == _order(untouched)  # epoch 3 of seed 0, as if the stage had not run
    assert seen[0] != seen[1] and sorted(seen[0]) == list(range(40))
    with stage_data_order(run, None):
        assert _order(run) == _order(untouched)  # epoch 4: no seed, no change


def test_a_seed_is_put_back_when_the_stage_fails():
    run = _loader(0)
    run.set_epoch(2)
    try:
        with stage_data_order(run, 9):
            next(iter(run))
            raise RuntimeError("the stage failed")
    except RuntimeError:
        pass
    assert (run.seed, run.epoch) == (0, 2)


PAIRED_RECIPE = CRIT_TINY_HEAD + """
stages:
  - {kind: train_snn, epochs: 1, lr: 1.0e-3, max_batches: 2}
  - {kind: prune_criticality, name: a, seed: 5, epochs: 1, max_batches: 4, dt: 2, regrow_ratio: 0,
     finetune_epochs: 1, finetune_max_batches: 2}
  - {kind: prune_criticality, name: b, seed: 5, from_stage: train_snn, epochs: 1, max_batches: 4, dt: 2,
     regrow_ratio: 0, finetune_epochs: 1, finetune_max_batches: 2}
  - {kind: prune_criticality, name: c, seed: 6, from_stage: train_snn, epochs: 1, max_batches: 4, dt: 2,
     regrow_ratio: 0, finetune_epochs: 1, finetune_max_batches: 2}
measure: {robustness_images: 32, ops_images: 32, latency_repeats: 2, noise_sigmas: [0.0]}
"""


def test_two_stages_with_one_seed_train_on_the_same_batches(tmp_path):
    recipe = tmp_path / "seeds.yaml"
    recipe.write_text(PAIRED_RECIPE)
    Run(recipe, tmp_path / "run").execute()
    stages = tmp_path / "run" / "stages"
    a, b, c = (load_file(stages / name / "model.safetensors") for name in ("01-a", "02-b", "03-c"))
    same = lambda x, y: x.keys() == y.keys() and all(  # noqa: E731
        x[k].shape == y[k].shape and torch.equal(x[k], y[k]) for k in x)
    assert same(a, b)  # same start, same seed: the same network, bit for bit
    assert not same(a, c)  # another seed: other batches, another network ...
    live = lambda x: sum(v.numel() for k, v in x.items() if k.endswith("@values"))  # noqa: E731
    assert live(a) == live(c) == 676  # ... at the same sparsity: 10% of the 6,756 conv/linear weights


def test_each_stage_seed_has_its_own_fingerprint(tmp_path):
    recipe = tmp_path / "seeds.yaml"
    recipe.write_text(PAIRED_RECIPE)
    loaded, _ = load_recipe(recipe)
    options = {opts.name: opts for _, opts in validate_stages(loaded, "test")}
    seeds = [options["a"].model_copy(update={"seed": seed}) for seed in (5, 6, None)]
    assert len({fingerprint(loaded, opts, "") for opts in seeds}) == 3


def test_crop_padding_left_at_its_default_keeps_existing_fingerprints(tmp_path):
    # data.crop_padding was added after runs existed: at its default (4) the stages' hashes are those of a
    # recipe that does not name it, so finished run folders still resume; another padding or augment mode
    # is a different run
    recipe = tmp_path / "seeds.yaml"
    recipe.write_text(PAIRED_RECIPE)
    prints = []
    for overrides in ([], ["data.crop_padding=4"], ["data.crop_padding=2"], ["data.augment=crop_flip"]):
        loaded, _ = load_recipe(recipe, overrides)
        (_, opts), *_ = validate_stages(loaded, "test")
        prints.append(fingerprint(loaded, opts, ""))
    assert prints[0] == prints[1]
    assert len(set(prints)) == 3
    loaded, _ = load_recipe(recipe, ["data.augment=crop_flip", "data.crop_padding=2"])
    assert (loaded.data.augment, loaded.data.crop_padding) == ("crop_flip", 2)
