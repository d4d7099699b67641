"""AGC (docs/methods/agc.md): attention transfer, sparse momentum at fixed density, masks kept through the SNN stages."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from snncompress.compress.attention import ActivationTap, AttentionTransfer, attention_loss, attention_map, block_ends
from snncompress.compress.masks import density, get_mask, get_masks, original, owner
from snncompress.compress.pruning import live_count, prunable_weights
from snncompress.compress.sparse_momentum import (SparseMomentum, channel_alive, cosine_prune_rate, group_tensors,
                                                  init_channel_masks, init_weight_masks, live_channels,
                                                  prune_redistribute_regrow_, prune_regrow_channels_, share_out)
from snncompress.compress.structure import channel_groups, narrow_model
from snncompress.convert import calibrate_thresholds
from snncompress.data import TensorBatchLoader
from snncompress.models import build_model
from snncompress.training import Callback, TrainConfig, seed_everything, train
from snncompress.hooks import TrainState


def tiny_loader(n=64, batch=8, seed=3) -> TensorBatchLoader:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=gen)
    labels = (images.float().mean((1, 2, 3)) > 127.5).long()
    return TensorBatchLoader(images, labels, [0.5], [0.25], batch, shuffle=True, augment=False, seed=seed)


def tiny_model(batchnorm=False, features=(4, "A", 6)):
    seed_everything(0)
    return build_model("convnet", 2, (1, 8, 8), 2, features=list(features), classifier=[8], dropout=0.0,
                       batchnorm=batchnorm, neuron={"threshold": 0.3}).set_spiking(False)


# ----------------------------------------------------------------------------- attention transfer


def test_attention_map_sums_squares_over_channels():
    a = torch.tensor([[[[1.0, 2.0]], [[math.sqrt(2.0), 0.0]]]])  # [B=1, C=2, H=1, W=2]
    assert torch.allclose(attention_map(a), torch.tensor([[3.0, 4.0]]))


def test_attention_loss_is_zero_for_identical_maps_and_equals_the_hand_computation():
    a = torch.randn(3, 5, 4, 4)
    assert attention_loss([a], [a.clone()]).item() == 0.0
    assert attention_loss([a], [2 * a], reduction="norm").item() == pytest.approx(0.0, abs=1e-4)  # scale-free
    # student Q = [3, 4] -> q = [0.6, 0.8]; meta (one channel [2, 0]) Q = [4, 0] -> q = [1, 0];
    # q_S - q_M = [-0.4, 0.8]; second image identical in both models (difference 0)
    student = torch.tensor([[[[1.0, 2.0]], [[math.sqrt(2.0), 0.0]]], [[[1.0, 1.0]], [[0.0, 0.0]]]])
    meta = torch.tensor([[[[2.0, 0.0]]], [[[1.0, 1.0]]]])
    # norm (docs/methods/agc.md as written): 1000/2 * mean_b ||d||_2 = 500 * (sqrt(0.8) + 0) / 2 = 223.6068
    assert attention_loss([student], [meta], 1000.0, "norm").item() == pytest.approx(223.6068, rel=1e-5)
    # mean (Zagoruyko's code): 500 * (0.16 + 0.64 + 0 + 0) / 4 = 100
    assert attention_loss([student], [meta], 1000.0, "mean").item() == pytest.approx(100.0, rel=1e-5)
    # two block ends add up
    assert attention_loss([student, student], [meta, meta], 1000.0, "mean").item() == pytest.approx(200.0, rel=1e-5)


def test_block_ends_and_the_callback_term():
    model = tiny_model()  # features 4, A, 6: one pool, then a trailing conv read at classifier.0
    assert block_ends(model) == [("features.2", None), ("classifier.0", 6)]
    tap = ActivationTap(model)
    model(torch.randn(2, 1, 8, 8))
    shapes = [tuple(v.shape) for v in tap.take()]
    tap.close()
    assert shapes == [(2, 4, 8, 8), (2, 6, 16)]
    # the callback adds nothing when the student is the meta-model; a different student adds beta/2 * ...
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    for student, zero in ((copy.deepcopy(model), True), (tiny_model(features=(4, "A", 6)), False)):
        if not zero:
            with torch.no_grad():
                for p in student.parameters():
                    p.mul_(torch.linspace(0.1, 2.0, p.numel()).reshape(p.shape))
        cb = AttentionTransfer(copy.deepcopy(model), beta=1000.0)
        state = TrainState(student, None, TrainConfig(), "cpu")
        cb.on_train_begin(state)
        logits = student(images)
        ce = F.cross_entropy(logits, labels)
        total = cb.loss(state, images, labels, logits, ce)
        cb.close()
        assert (total.item() == pytest.approx(ce.item(), abs=1e-6)) == zero
        if not zero:
            total.backward()  # the term reaches the student's weights
            assert student.features[0].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- sparse momentum, irregular


def test_share_out_and_the_cosine_prune_rate():
    assert share_out(18, [1.0, 3.0], [100, 14]) == [5, 13]  # 4.5 / 13.5: the tie goes to the earlier layer
    assert share_out(10, [1.0, 3.0], [100, 2]) == [8, 2]    # capped at 2; the rest to the other layer
    assert share_out(6, [0.0, 0.0, 0.0], [5, 5, 5]) == [2, 2, 2]
    assert [cosine_prune_rate(e, 4) for e in range(5)] == pytest.approx([0.5, 0.4267767, 0.25, 0.0732233, 0.0])


def test_one_event_holds_the_total_and_moves_budget_to_the_layer_with_larger_momentum():
    model = build_model("convnet", 2, (1, 4, 4), 1, features=[], classifier=[8], dropout=0.0).set_spiking(False)
    names = prunable_weights(model)
    assert names == ["classifier.0.weight", "classifier.3.weight"]  # 8 x 16 = 128 and 2 x 8 = 16 weights
    with torch.no_grad():  # distinct magnitudes: |w| = flat index + 1
        for n in names:
            w = original(*owner(model, n))
            w.copy_(torch.arange(1, w.numel() + 1, dtype=w.dtype).reshape(w.shape))
    init_weight_masks(model, names, 0.25, "magnitude")
    assert [int(get_mask(model, n).sum()) for n in names] == [32, 4]  # the largest |w| of each layer
    # momentum: |m| = 1 on layer A, 3 on layer B, except on dead weights of B where it ranks the regrowth
    mom = {names[0]: torch.ones(8, 16), names[1]: torch.full((2, 8), 3.0)}
    mom[names[1]].view(-1)[:12] = torch.arange(12, dtype=torch.float32)  # dead positions 0..11: larger index, larger m
    stats = prune_redistribute_regrow_(model, names, 0.5, mom)
    # prune round(0.5 * 32) = 16 and 2: K = 18; shares 18 * 1/4 = 4.5 and 18 * 3/4 = 13.5 -> 5 and 13
    assert stats["pruned"] == {names[0]: 16, names[1]: 2} and stats["share"] == {names[0]: 5, names[1]: 13}
    assert stats["live_after"] == {names[0]: 21, names[1]: 15}  # B gained: 4 -> 15; A lost: 32 -> 21
    assert sum(stats["live_after"].values()) == 36
    mask_b = get_mask(model, names[1]).view(-1)
    # B's live 13..16 lose 13 and 14 (flat 12, 13); 13 regrown = all 14 dead except the lowest momentum (flat 0)
    assert not mask_b[0] and mask_b[1:].all()
    stored_b = original(*owner(model, names[1])).detach().view(-1)
    assert stored_b[14:].tolist() == [15, 16] and (stored_b[1:14] == 0).all()  # regrown weights start at zero


class Densities(Callback):
    def __init__(self, names):
        self.names, self.seen = names, []

    def on_epoch_end(self, state, row):
        self.seen.append(live_count(state.model, self.names))


def test_density_held_over_training_and_momentum_resumes():
    model = tiny_model()
    names = prunable_weights(model)
    sizes = [original(*owner(model, n)).numel() for n in names]
    init_weight_masks(model, names, 0.2, "random")
    target = 0.2 * sum(sizes)
    start = live_count(model, names)
    assert abs(start - target) <= len(names)
    sparse, watch = SparseMomentum("irregular", names=names), Densities(names)
    train(model, tiny_loader(), tiny_loader(16), TrainConfig(epochs=4, lr=1e-2), callbacks=[sparse, watch])
    sparse.close()
    assert [e["epoch"] for e in sparse.events] == [1, 2, 3]  # no event after the last epoch (rate 0)
    assert [e["rate"] for e in sparse.events] == pytest.approx([0.4267767, 0.25, 0.0732233])
    assert all(sum(e["share"].values()) == sum(e["pruned"].values()) > 0 for e in sparse.events)
    assert watch.seen == [start] * 4 and abs(density(model) - 0.2) <= len(names) / sum(sizes)
    assert any(e["live_after"] != e["live_before"] for e in sparse.events)  # budgets did move between layers
    assert all(v.abs().sum() > 0 for v in sparse.momentum.values())  # dense momentum, dead positions included
    dead = {n: ~get_mask(model, n) for n in names}
    assert all(sparse.momentum[n][dead[n]].abs().sum() > 0 for n in names if dead[n].any())
    state = sparse.state_dict()
    again = SparseMomentum("irregular", names=names)
    again.on_train_begin(TrainState(model, None, TrainConfig(), "cpu"))
    again.load_state_dict(state)
    again.close()
    assert again.events == sparse.events and all(torch.equal(again.momentum[n], sparse.momentum[n]) for n in names)


def test_global_magnitude_mask_keeps_exactly_the_largest_weights_over_all_layers():
    model = tiny_model()
    names = prunable_weights(model)
    weights = torch.cat([original(*owner(model, n)).detach().abs().flatten() for n in names])
    init_weight_masks(model, names, 0.1, "global_magnitude")
    keep = int(0.1 * weights.numel() + 0.5)
    assert live_count(model, names) == keep
    kept = torch.cat([original(*owner(model, n)).detach().abs()[get_mask(model, n)] for n in names])
    dropped = torch.cat([original(*owner(model, n)).detach().abs()[~get_mask(model, n)] for n in names])
    assert kept.min() >= dropped.max()
    with pytest.raises(ValueError, match="global_magnitude"):
        init_weight_masks(model, names, 0.1, "nope")


def test_one_shot_magnitude_prunes_once_to_the_density_and_the_mask_stays_fixed(tmp_path):
    from snncompress.checkpoint import load_checkpoint
    from snncompress.pipeline import Run

    recipe = tmp_path / "one_shot.yaml"
    recipe.write_text(AGC_RECIPE.split("stages:")[0] + """stages:
  - {kind: train_ann, epochs: 1, max_batches: 2}
  - {kind: train_ann_sparse, name: oneshot, method: one_shot_magnitude, init: meta, beta: 0, density: 0.2,
     epochs: 3, max_batches: 2}
""")
    run = Run(recipe, tmp_path / "run")
    report = run.execute()
    stages = {s["name"]: s["metrics"] for s in report["stages"]}
    one = stages["oneshot"]
    meta = load_checkpoint(tmp_path / "run" / stages["train_ann"]["checkpoint"]).model.set_spiking(False)
    names = prunable_weights(meta)
    total = sum(original(*owner(meta, n)).numel() for n in names)
    assert one["live_weights"] == int(0.2 * total + 0.5) and one["events"] == 0 and one["regrown"] == 0
    assert one["method"] == "one_shot_magnitude" and one["mask_init"] == "global_magnitude"
    # the mask after fine-tuning is the one-shot global magnitude mask of the meta-model
    init_weight_masks(meta, names, 0.2, "global_magnitude")
    ann = load_checkpoint(tmp_path / "run" / one["checkpoint"]).model
    for n in names:
        assert torch.equal(get_mask(ann, n).cpu(), get_mask(meta, n).cpu())
        assert (original(*owner(ann, n))[~get_mask(ann, n)] == 0).all()
    assert sum(int((original(*owner(ann, n)) != 0).sum()) for n in names) <= one["live_weights"]


# ----------------------------------------------------------------------------- the SNN keeps the mask


def test_masked_weights_stay_exactly_zero_through_convert_and_snn_training():
    model = tiny_model()
    names = prunable_weights(model)
    init_weight_masks(model, names, 0.3, "random")
    sparse = SparseMomentum("irregular", names=names)
    train(model, tiny_loader(), tiny_loader(16), TrainConfig(epochs=2, lr=1e-2), callbacks=[sparse])
    sparse.close()
    masks = {n: m.clone() for n, m in get_masks(model).items()}
    before = {n: original(*owner(model, n)).detach().clone() for n in names}
    model.set_spiking(True)
    calibrate_thresholds(model, next(iter(tiny_loader()))[0], calib_timesteps=4)
    thresholds = [lif.threshold.detach().clone() for _, lif in model.spiking_layers()]
    train(model, tiny_loader(), tiny_loader(16), TrainConfig(epochs=1, lr=1e-2, weight_decay=5e-2))
    for n in names:
        stored, mask = original(*owner(model, n)), get_mask(model, n)
        assert torch.equal(mask, masks[n])                      # the mask is the ANN's
        assert (stored[~mask] == 0).all()                        # exactly zero in storage
        assert (getattr(*owner(model, n))[~mask] == 0).all()     # and as the forward pass sees it
        assert not torch.equal(stored[mask], before[n][mask])    # the live weights trained
    assert any(not torch.equal(t, lif.threshold) for t, (_, lif) in zip(thresholds, model.spiking_layers()))


# ----------------------------------------------------------------------------- channel variant


@pytest.mark.parametrize("batchnorm", [False, True])
def test_channel_variant_zeroes_whole_channels_and_narrowing_keeps_the_logits(batchnorm):
    model = tiny_model(batchnorm=batchnorm)
    groups = channel_groups(model)
    assert [g.size for g in groups] == [4, 6, 8]
    init_channel_masks(model, groups, 0.5, "random")
    assert [int(channel_alive(model, g).sum()) for g in groups] == [2, 3, 4]
    sparse = SparseMomentum("channel", groups=groups)
    train(model, tiny_loader(), tiny_loader(16), TrainConfig(epochs=3, lr=1e-2), callbacks=[sparse])
    sparse.close()
    assert all(sum(e["live_after"].values()) == 9 for e in sparse.events) and len(sparse.events) == 2
    assert sum(sum(e["share"].values()) for e in sparse.events) > 0
    # dead channels get a regrowth signal (the gradient at their activation), live ones all carry weights
    # (a channel regrown at zero would stay dead behind its ReLU: regrown channels restart from the init)
    for g in groups:
        alive = channel_alive(model, g)
        assert sparse.momentum[f"act.{g.name}"][~alive].gt(0).all()
        rows = original(*owner(model, group_tensors(model, g)[0][0])).detach().flatten(1).abs().sum(1)
        assert rows[alive].gt(0).all()
    for g in groups:
        alive = channel_alive(model, g)
        weights, norms = group_tensors(model, g)
        for name in weights + norms:  # whole rows zero, in storage and in the forward pass
            stored = original(*owner(model, name))
            assert (stored[~alive] == 0).all() and (getattr(*owner(model, name))[~alive] == 0).all()
    keep = live_channels(model, groups)
    narrow = narrow_model(model, keep, groups)
    assert [narrow.features[0].out_channels, narrow.classifier[0].out_features] == [int(keep[g.name].numel())
                                                                                  for g in (groups[0], groups[2])]
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in model.parameters())
    images = next(iter(tiny_loader()))[0]
    model.eval(), narrow.eval()
    with torch.no_grad():
        assert torch.allclose(narrow(images), model(images), atol=1e-5)
        model.set_spiking(True), narrow.set_spiking(True)
        assert torch.allclose(narrow(images), model(images), atol=1e-5)


def test_channel_event_moves_channels_toward_the_larger_momentum_group():
    model = tiny_model()
    groups = channel_groups(model)
    init_channel_masks(model, groups, 0.5, "magnitude")
    mom = {n: torch.full_like(original(*owner(model, n)), 0.01) for g in groups for n in group_tensors(model, g)[0]}
    mom["classifier.0.weight"].fill_(1.0)  # the hidden linear group: much larger momentum
    stats = prune_regrow_channels_(model, groups, 0.5, mom)
    # prune round(0.5 * live) (halves up), at least one channel left: 1 of 2, 2 of 3, 2 of 4; the 5 are shared by momentum
    assert stats["pruned"] == {g.name: k for g, k in zip(groups, [1, 2, 2])}
    assert sum(stats["live_after"].values()) == 9
    assert stats["live_after"]["classifier.0"] > stats["live_before"]["classifier.0"]


# ----------------------------------------------------------------------------- the stages chained


AGC_RECIPE = """
name: agc-tiny
seed: 0
device: cpu
data: {dataset: mnist-builtin, batch_size: 32, train_subset: 256, test_subset: 64}
model:
  arch: convnet
  timesteps: 2
  options: {features: [8, A, 8, A], classifier: [16]}
stages:
  - {kind: train_ann, epochs: 1, max_batches: 2}
  - {kind: train_ann_sparse, name: sparse, density: 0.3, epochs: 2, max_batches: 2}
  - {kind: convert, calib_images: 32, calib_timesteps: 4}
  - {kind: train_snn, epochs: 1, lr: 1.0e-3, max_batches: 2}
  - {kind: train_ann_sparse, name: channel, structure: channel, density: 0.5, epochs: 2, max_batches: 2}
  - {kind: convert, name: convert_ch, calib_images: 32, calib_timesteps: 4}
  - {kind: train_snn, name: snn_ch, epochs: 1, max_batches: 2}
measure: {robustness_images: 32, ops_images: 32, latency_repeats: 2, noise_sigmas: [0.0]}
"""


def test_agc_stages_chain_and_the_snn_keeps_the_mask(tmp_path):
    from snncompress.checkpoint import load_checkpoint
    from snncompress.pipeline import Run

    recipe = tmp_path / "agc.yaml"
    recipe.write_text(AGC_RECIPE)
    report = Run(recipe, tmp_path / "run").execute()
    stages = {s["name"]: s["metrics"] for s in report["stages"]}
    sparse, snn, channel = stages["sparse"], stages["train_snn"], stages["channel"]
    # 72 + 576 + 392 * 16 + 16 * 10 = 7080 masked weights, density 0.3: 22 + 173 + 1882 + 48 = 2125 (2124 +- 4)
    assert sparse["live_weights"] == 2125 and sparse["events"] == 1 and sparse["regrown"] > 0
    events = json.loads((tmp_path / "run" / "stages" / "01-sparse" / "events.json").read_text())["events"]
    assert sum(events[0]["live_after"].values()) == sum(events[0]["live_before"].values()) == 2125
    ann = load_checkpoint(tmp_path / "run" / sparse["checkpoint"]).model
    final = load_checkpoint(tmp_path / "run" / snn["checkpoint"]).model
    assert final.spiking and get_masks(final).keys() == get_masks(ann).keys()
    for name, mask in get_masks(final).items():
        assert torch.equal(mask, get_masks(ann)[name]) and (original(*owner(final, name))[~mask] == 0).all()
    # channels: 8, 8, 16 start at 4, 4, 8; one event moves channels between groups, 16 of 32 stay
    kept = {k: int(v.split("/")[0]) for k, v in channel["channels"].items()}
    assert sum(kept.values()) == 16 and channel["channel_density"] == 0.5
    assert channel["params_after"] < channel["params_before"]
    narrow = load_checkpoint(tmp_path / "run" / stages["snn_ch"]["checkpoint"]).model  # physically narrower
    assert narrow.features[0].out_channels == kept["features.0"] and not get_masks(narrow)
    assert narrow.classifier[0].out_features == kept["classifier.0"]


@pytest.mark.parametrize("stage, message", [
    ("{kind: train_ann_sparse}", "meta_checkpoint: no meta-model"),
    ("{kind: train_ann_sparse, structure: channel, exclude: [features.0.weight], beta: 0}", "exclude: only for"),
    ("{kind: train_ann_sparse, method: one_shot_magnitude, init: meta, meta_checkpoint: m.safetensors}",
     "one_shot_magnitude prunes the meta-model once"),
])
def test_option_mistakes(tmp_path, stage, message):
    from snncompress.errors import UserError
    from snncompress.pipeline import Run

    recipe = tmp_path / "bad.yaml"
    recipe.write_text(AGC_RECIPE.split("stages:")[0] + f"stages:\n  - {stage}\n")
    with pytest.raises(UserError, match=message):
        Run(recipe, tmp_path / "run")


def test_a_bad_exclude_ends_with_one_line(tmp_path):
    from snncompress.errors import UserError
    from snncompress.pipeline import run_recipe

    recipe = tmp_path / "bad.yaml"
    recipe.write_text(AGC_RECIPE.split("stages:")[0] + "stages:\n  - {kind: train_ann, max_batches: 1}\n"
                      "  - {kind: train_ann_sparse, exclude: [nope.weight], max_batches: 1}\n")
    with pytest.raises(UserError, match=r"train_ann_sparse: exclude: no conv/linear weight named \['nope.weight'\]"):
        run_recipe(recipe, tmp_path / "run")


def test_sparse_training_resumes_exactly_after_a_crash(tmp_path):
    """Killed mid-epoch 2 (after one event; momentum half built), the rerun ends with the same masks and weights."""
    class StopAt(Callback):
        def after_step(self, state):
            if state.step + 1 == 12:
                raise RuntimeError("killed")

    meta = tiny_model()

    def run(stop):
        model = tiny_model()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)
        names = prunable_weights(model)
        init_weight_masks(model, names, 0.3)
        sparse, attention = SparseMomentum("irregular", names=names), AttentionTransfer(copy.deepcopy(meta))
        cfg = TrainConfig(epochs=3, lr=1e-2, snapshot_every_steps=1)
        try:
            train(model, tiny_loader(), tiny_loader(16), cfg,
                  callbacks=[sparse, attention] + ([StopAt()] if stop else []),
                  snapshot_path=tmp_path / ("a.safetensors" if stop is not None else "b.safetensors"))
        finally:
            sparse.close(), attention.close()
        return model, sparse

    with pytest.raises(RuntimeError):
        run(True)
    resumed, sparse_resumed = run(False)
    reference, sparse_reference = run(None)
    assert len(sparse_reference.events) == 2 and sparse_resumed.events == sparse_reference.events
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
