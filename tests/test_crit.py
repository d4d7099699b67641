"""CRIT (docs/methods/crit.md): criticality scores, the cubic schedule, pruning-regeneration, structured regrowth, IMP."""

from __future__ import annotations

import json
import math

import pytest
import torch

from snncompress.compress.criticality import CriticalityMeter, criticality_scores, weight_units
from snncompress.compress.masks import get_mask, get_masks
from snncompress.compress.pruning import (PruneRegrow, attach_masks, cubic_schedule, cubic_sparsity, imp_sparsities,
                                          kept_count, live_count, prunable_weights, prune_and_regrow_, regrow_ratios)
from snncompress.compress.importance import per_group_mean
from snncompress.compress.slimming import GammaL1, select_channels
from snncompress.compress.structure import channel_groups
from snncompress.data import TensorBatchLoader
from snncompress.errors import UserError
from snncompress.models import build_model
from snncompress.training import Callback, TrainConfig, seed_everything, train

from conftest import CRIT_TINY_HEAD

CRIT_NEURON = {"reset": "hard", "leak": 0.25, "threshold": 1.0, "surrogate": "atan",
               "learn_leak": False, "learn_threshold": False}

# ----------------------------------------------------------------------------- the score


def one_neuron_model():
    """image pixel -> Linear(1, 1) (weight 1) -> LIF (hard reset, leak 0.25, thr 1, atan) -> Linear(1, 2), T = 4."""
    model = build_model("convnet", 2, (1, 1, 1), 4, features=[], classifier=[1], dropout=0.0, neuron=CRIT_NEURON)
    with torch.no_grad():
        model.classifier[0].weight.fill_(1.0)
    return model


# Constant current 0.9: u = 0.9, 0.25*0.9 + 0.9 = 1.125 (spike, reset to 0), 0.9, 1.125 (spike).
# Constant current 0.3 (no spike): u = 0.3, 0.375, 0.39375, 0.3984375.
TRACES = [[0.9, 1.125, 0.9, 1.125], [0.3, 0.375, 0.39375, 0.3984375]]


def atan_derivative(x, a=2.0):
    return (a / 2) / (1 + (math.pi / 2 * a * x) ** 2)


def soft_spike(x, a=2.0):
    return math.atan(math.pi / 2 * a * x) / math.pi + 0.5


def hand_score(fn) -> float:
    """Mean over t and the two images of fn(u - thr), thr = 1."""
    return sum(fn(u - 1.0) for trace in TRACES for u in trace) / 8


def test_score_equals_the_hand_computed_atan_derivative_on_a_known_trace(monkeypatch):
    # the fused kernels must serve the membrane: the reference loop is forbidden
    import snncompress.kernels.cpu as kcpu
    import snncompress.kernels.membrane as kmem

    def forbidden(*args, **kwargs):
        raise AssertionError("the reference LIF loop ran")

    monkeypatch.setattr(kcpu, "lif_multistep", forbidden)
    monkeypatch.setattr(kmem, "lif_multistep", forbidden)
    images = torch.tensor([0.9, 0.3]).reshape(2, 1, 1, 1)
    model = one_neuron_model()
    expected = hand_score(atan_derivative)    # (2 (0.910170 + 0.866391) + 0.171347 + 0.205960 + 0.216104 + 0.218747) / 8
    assert expected == pytest.approx(0.545659, abs=1e-6)
    # inference: one extra fused forward pass writes u
    scores = criticality_scores(model, images)
    assert list(scores) == ["classifier.1"]
    assert scores["classifier.1"].tolist() == pytest.approx([expected], abs=1e-6)
    # a training forward pass: u is read from the kernel's saved tensor, nothing recomputed
    model.train()
    with CriticalityMeter(model) as meter:
        model(images).sum().backward()
    assert meter.scores()["classifier.1"].tolist() == pytest.approx([expected], abs=1e-6)
    # the soft-spike variant
    soft = criticality_scores(model, images, score="soft_spike")["classifier.1"]
    assert soft.tolist() == pytest.approx([hand_score(soft_spike)], abs=1e-6)


def test_channel_score_is_the_max_over_positions_averaged_over_t_and_batch():
    """A conv channel whose positions hold the two traces: per image the max over positions is taken, then the mean."""
    from snncompress.compress.criticality import layer_criticality
    from snncompress.neuron import LIF

    lif = LIF(leak=0.25, threshold=1.0, reset="hard", surrogate="atan")
    u = torch.tensor(TRACES).T.reshape(4, 1, 1, 1, 2)        # [T, B=1, C=1, H=1, W=2]
    expected = sum(max(atan_derivative(a - 1), atan_derivative(b - 1)) for a, b in zip(*TRACES)) / 4
    assert layer_criticality(lif, u).tolist() == pytest.approx([expected], abs=1e-6)
    mean = sum((atan_derivative(a - 1) + atan_derivative(b - 1)) / 2 for a, b in zip(*TRACES)) / 4
    assert layer_criticality(lif, u, reduce="channel_mean").tolist() == pytest.approx([mean], abs=1e-6)
    assert mean < expected
    neuron = layer_criticality(lif, u, reduce="neuron")      # per position
    assert neuron.reshape(-1).tolist() == pytest.approx(
        [sum(atan_derivative(v - 1) for v in TRACES[i]) / 4 for i in (0, 1)], abs=1e-6)


def test_each_weight_feeds_the_neuron_after_it():
    model = build_model("resnet19", 10, (3, 8, 8), 1, width_mult=0.0625)
    units = weight_units(model)
    assert units["stem.0.weight"] == "stem.2"
    assert units["blocks.0.conv1.weight"] == "blocks.0.lif1"
    assert units["blocks.3.conv2.weight"] == units["blocks.3.shortcut.0.weight"] == "blocks.3.lif2"
    assert units["classifier.0.weight"] == "classifier.1"
    assert "classifier.3.weight" not in units                 # the output layer feeds no neuron


# ----------------------------------------------------------------------------- schedule and regeneration


def test_cubic_schedule_targets():
    events = cubic_schedule(0.9, dt=10, steps=45)             # K = 4 events, at steps 10, 20, 30, 40
    assert [s for s, _ in events] == [10, 20, 30, 40]
    assert [t for _, t in events] == pytest.approx([0.9 * (1 - 0.75 ** 3), 0.9 * (1 - 0.5 ** 3),
                                                   0.9 * (1 - 0.25 ** 3), 0.9])
    assert [t for _, t in events] == pytest.approx([0.5203125, 0.7875, 0.8859375, 0.9])
    assert cubic_sparsity(0, 4, 0.9) == 0.0
    assert kept_count(1000, 0.5203125) == 480 and kept_count(18, 0.5) == 9
    assert imp_sparsities(0.9, 0.2) == pytest.approx(
        [0.2, 0.36, 0.488, 0.5904, 0.67232, 0.737856, 0.7902848, 0.83222784, 0.865782272, 0.8926258176, 0.9])


def small_linear_model():
    """4 pixels -> Linear(4, 3) -> LIF(3) -> Linear(3, 2): 12 + 6 = 18 prunable weights."""
    model = build_model("convnet", 2, (1, 2, 2), 2, features=[], classifier=[3], dropout=0.0, neuron=CRIT_NEURON)
    with torch.no_grad():
        model.classifier[0].weight.copy_(torch.tensor([[0.90, 0.80, 0.70, 0.60],
                                                       [0.05, -0.04, 0.03, 0.02],     # unit 1: all small
                                                       [0.50, -0.45, 0.01, 0.40]]))
        model.classifier[3].weight.copy_(torch.tensor([[0.35, -0.30, 0.25], [0.20, 0.15, -0.10]]))
    return model


def test_regrown_weights_come_from_the_most_critical_unit_and_start_at_zero():
    model = small_linear_model()
    names = prunable_weights(model)
    assert names == ["classifier.0.weight", "classifier.3.weight"]
    attach_masks(model, names)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 1, 2, 2)).sum().backward()
    optimizer.step()                                          # nonzero Adam moments everywhere
    with torch.no_grad():                                     # back to the hand values
        model.classifier[0].parametrizations.weight.original.copy_(small_linear_model().classifier[0].weight)
        model.classifier[3].parametrizations.weight.original.copy_(small_linear_model().classifier[3].weight)
    # 50% of 18: 9 live; regrow round(9 / 3) = 3; magnitude keeps 6: 0.9, 0.8, 0.7, 0.6, 0.5, -0.45
    stats = prune_and_regrow_(model, names, 0.5, 1 / 3, {"classifier.1": torch.tensor([0.1, 0.9, 0.5])}, optimizer)
    assert stats["live"] == 9 and stats["regrown"] == 3 and live_count(model, names) == 9
    expected_first = torch.tensor([[1, 1, 1, 1],
                                   [1, 1, 1, 0],              # the critical unit: its 3 largest pruned weights
                                   [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(get_mask(model, "classifier.0.weight"), expected_first)
    assert not get_mask(model, "classifier.3.weight").any()   # 0.40 lost to the regrown: output layer pruned out
    stored = model.classifier[0].parametrizations.weight.original
    assert stored[1].tolist() == [0.0, 0.0, 0.0, 0.0]         # regrown at zero (and the pruned one zeroed)
    state = optimizer.state[stored]
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key in state:
            assert state[key][1, :3].abs().sum() == 0 and state[key][0].abs().sum() > 0
    # without regeneration: plain global magnitude, the 9 largest: 0.9 .. 0.4 and the output layer's 0.35, -0.30
    model = small_linear_model()
    attach_masks(model, names)
    prune_and_regrow_(model, names, 0.5)
    assert get_mask(model, "classifier.0.weight").tolist() == [[True] * 4, [False] * 4, [True, True, False, True]]
    assert get_mask(model, "classifier.3.weight").tolist() == [[True, True, False], [False, False, False]]



def two_hidden_model():
    """4 pixels -> Linear(4, 3) -> LIF(3) -> Linear(3, 2) -> LIF(2) -> Linear(2, 2): 12 + 6 + 4 = 22 prunable weights.

    Magnitudes fall row by row: the first hidden layer holds mid-sized weights, the second only small ones, the
    output layer the largest.
    """
    model = build_model("convnet", 2, (1, 2, 2), 2, features=[], classifier=[3, 2], dropout=0.0, neuron=CRIT_NEURON)
    with torch.no_grad():
        model.classifier[0].weight.copy_(torch.tensor([[0.90, 0.80, 0.70, 0.60],
                                                       [0.55, 0.50, 0.45, 0.40],
                                                       [0.35, 0.30, 0.25, 0.20]]))
        model.classifier[3].weight.copy_(torch.tensor([[0.19, 0.18, 0.17], [0.16, 0.15, 0.14]]))
        model.classifier[6].weight.copy_(torch.tensor([[0.95, 0.85], [0.75, 0.65]]))
    return model


# layer A (classifier.1): mean 0.5, its unit 1 the most critical in absolute terms (0.6);
# layer B (classifier.4): mean 0.2, its unit 1 three times its layer's mean-scoring unit (0.3 / 0.1)
TWO_LAYER_SCORES = {"classifier.1": torch.tensor([0.5, 0.6, 0.4]), "classifier.4": torch.tensor([0.1, 0.3])}


def test_unit_scores_normalised_per_layer_by_the_mean_and_by_rank():
    from snncompress.compress.pruning import normalize_unit_scores

    mean = normalize_unit_scores(TWO_LAYER_SCORES, "mean")
    assert mean["classifier.1"].tolist() == pytest.approx([1.0, 1.2, 0.8])
    assert mean["classifier.4"].tolist() == pytest.approx([0.5, 1.5])
    rank = normalize_unit_scores({"a": torch.tensor([1.0, 2.0, 3.0, 2.0])}, "rank")
    assert rank["a"].tolist() == pytest.approx([0.25, 0.75, 1.0, 0.75])    # ties share the value
    assert normalize_unit_scores({"a": torch.zeros(2)}, "mean")["a"].tolist() == [0.0, 0.0]
    assert normalize_unit_scores(TWO_LAYER_SCORES)["classifier.1"] is TWO_LAYER_SCORES["classifier.1"]
    with pytest.raises(ValueError, match="unknown normalization"):
        normalize_unit_scores(TWO_LAYER_SCORES, "max")


@pytest.mark.parametrize("normalize, budget, first_mask, second_mask", [
    # raw scores, one global pick: A's unit 1 (0.6) has the highest score: all 4 of its pruned weights regrow
    ("none", "global", [[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], [[0, 0, 0], [0, 0, 0]]),
    # divided by the layer mean: B's unit 1 (1.5) comes first (its 3 weights), then A's unit 1 (1.2): its largest
    ("mean", "global", [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], [[0, 0, 0], [1, 1, 1]]),
    # per layer: A lost 9, B lost 6 -> 4 * (9, 6) / 15 = (2.4, 1.6) -> (2, 2) by largest remainder; each layer's
    # most critical unit, largest pruned weights first
    ("none", "per_layer", [[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], [[0, 0, 0], [1, 1, 0]]),
])
def test_per_layer_normalisation_and_budget_decide_which_layer_regrows(normalize, budget, first_mask, second_mask):
    model = two_hidden_model()
    names = prunable_weights(model)
    assert names == ["classifier.0.weight", "classifier.3.weight", "classifier.6.weight"]
    attach_masks(model, names)
    # 50% of 22: 11 live; regrow round(11 * 4 / 11) = 4; magnitude keeps 7: the output layer's 4, A's 0.9, 0.8, 0.7
    stats = prune_and_regrow_(model, names, 0.5, 4 / 11, TWO_LAYER_SCORES, normalize=normalize, budget=budget)
    assert stats["live"] == 11 and stats["regrown"] == 4 and live_count(model, names) == 11
    assert get_mask(model, "classifier.0.weight").int().tolist() == first_mask
    assert get_mask(model, "classifier.3.weight").int().tolist() == second_mask
    assert get_mask(model, "classifier.6.weight").all()
    grown = {"classifier.0.weight": sum(map(sum, first_mask)) - 3, "classifier.3.weight": sum(map(sum, second_mask))}
    assert stats["regrown_by_layer"] == {n: c for n, c in grown.items() if c}
    assert model.classifier[0].parametrizations.weight.original[0, :3].tolist() == pytest.approx([0.9, 0.8, 0.7])


def test_per_layer_budget_counts_only_the_weights_lost_in_this_event():
    """A second event: weights pruned earlier are not lost again; the shares follow this event's losses."""
    model = two_hidden_model()
    names = prunable_weights(model)
    attach_masks(model, names)
    prune_and_regrow_(model, names, 0.5)    # magnitude alone: 11 live: output 4, A's 0.9 .. 0.4 (7), none of B
    assert live_count(model, ["classifier.3.weight"]) == 0
    # 75%: 22 - round(16.5) = 5 live, regrow round(5 * 0.4) = 2, magnitude keeps 3 (0.95, 0.9, 0.85): A lost its
    # other 6 live weights, B nothing (all pruned before): both regrown weights go to A, its unit 1 (0.55, 0.5)
    stats = prune_and_regrow_(model, names, 0.75, 0.4, TWO_LAYER_SCORES, budget="per_layer")
    assert stats["regrown_by_layer"] == {"classifier.0.weight": 2}
    assert get_mask(model, "classifier.0.weight").int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    assert get_mask(model, "classifier.3.weight").sum() == 0
    # the same event with a global pick regrows B's unit 1 after normalising by the mean
    model = two_hidden_model()
    attach_masks(model, names)
    prune_and_regrow_(model, names, 0.5)
    stats = prune_and_regrow_(model, names, 0.75, 0.4, TWO_LAYER_SCORES, normalize="mean")
    assert stats["regrown_by_layer"] == {"classifier.3.weight": 2}
    assert get_mask(model, "classifier.3.weight").int().tolist() == [[0, 0, 0], [1, 1, 0]]


def tiny_loader(n=64, batch=8, seed=3) -> TensorBatchLoader:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 6, 6), dtype=torch.uint8, generator=gen)
    labels = (images.float().mean((1, 2, 3)) > 127.5).long()
    return TensorBatchLoader(images, labels, [0.5], [0.25], batch, shuffle=True, augment=False, seed=seed)


def tiny_model():
    seed_everything(0)
    return build_model("convnet", 2, (1, 6, 6), 2, features=[4, "A"], classifier=[8], dropout=0.0,
                       neuron={**CRIT_NEURON, "threshold": 0.3})


class LiveLog(Callback):
    def __init__(self, names):
        self.names, self.live = names, []

    def after_step(self, state):  # runs after PruneRegrow (callbacks run in order)
        self.live.append(live_count(state.model, self.names))


def test_live_weights_follow_the_schedule_exactly_during_training():
    model = tiny_model()
    names = prunable_weights(model)
    attach_masks(model, names)
    total = live_count(model, names)                          # 36 + 288 + 16 = 340
    assert total == 340
    pruner = PruneRegrow(names, 0.9, dt=3, regrow_ratio=0.2, score_steps=2)
    log = LiveLog(names)
    loader = tiny_loader()                                    # 8 batches per epoch; 2 epochs: 16 steps, K = 5
    train(model, loader, tiny_loader(16), TrainConfig(epochs=2, lr=1e-2), callbacks=[pruner, log])
    pruner.close()
    targets = {3 * k: kept_count(total, cubic_sparsity(k, 5, 0.9)) for k in range(1, 6)}
    expected, live = [], total
    for step in range(1, 17):
        live = targets.get(step, live)
        expected.append(live)
    assert log.live == expected
    assert expected[-1] == 34                                 # 340 - round(306)
    assert [e["step"] for e in pruner.events] == [3, 6, 9, 12, 15]
    assert all(e["regrown"] == round(0.2 * e["live"]) for e in pruner.events)
    assert not any(lif._forward_hooks for _, lif in model.spiking_layers())


def test_cosine_decay_anneals_the_regrowth_to_zero_at_the_last_event():
    # r (1 + cos(pi k / 4)) / 2 with r = 0.2: 0.2 * 0.85355, 0.1, 0.2 * 0.14645, 0
    assert regrow_ratios(0.2, 4, "cosine") == pytest.approx([0.170711, 0.1, 0.029289, 0.0], abs=1e-6)
    assert regrow_ratios(0.2, 3) == [0.2, 0.2, 0.2]
    model = tiny_model()
    names = prunable_weights(model)
    attach_masks(model, names)
    pruner = PruneRegrow(names, 0.9, dt=3, regrow_ratio=0.2, score_steps=2, decay="cosine")
    train(model, tiny_loader(), tiny_loader(16), TrainConfig(epochs=2, lr=1e-2), callbacks=[pruner])
    pruner.close()
    # K = 5 events keep 191, 100, 54, 36, 34 of 340 weights; ratios 0.1809, 0.1309, 0.0691, 0.0191, 0
    assert [e["live"] for e in pruner.events] == [191, 100, 54, 36, 34]
    assert [e["regrown"] for e in pruner.events] == [35, 13, 4, 1, 0]
    assert pruner.events[-1]["regrow_ratio"] == 0.0


def wide_random_model():
    """16 pixels -> Linear(16, 64) -> LIF(64) -> Linear(64, 8): 1024 + 512 prunable weights, N(0, 1) values."""
    model = build_model("convnet", 8, (1, 4, 4), 2, features=[], classifier=[64], dropout=0.0, neuron=CRIT_NEURON)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in (model.classifier[0], model.classifier[3]):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
    return model


def test_random_regrowth_draws_uniformly_among_the_pruned_weights():
    """The control for criticality: the same count, regrown at zero, spread over the layers as the candidates are."""
    names = ["classifier.0.weight", "classifier.3.weight"]
    before = wide_random_model()
    magnitude = torch.cat([before.classifier[0].weight.abs().flatten(), before.classifier[3].weight.abs().flatten()])
    kept_by_magnitude = torch.zeros(1536, dtype=torch.bool)
    kept_by_magnitude[torch.topk(magnitude, 384).indices] = True         # 50% of 1536 = 768 live, half regrown
    in_output = torch.arange(1536) >= 1024
    candidates_in_output = int((~kept_by_magnitude & in_output).sum()) / 1152
    critical_unit0 = {"classifier.1": torch.tensor([1.0] + [0.0] * 63)}
    chosen = {}
    for how in ("criticality", 7, 7, 8):
        model = wide_random_model()
        attach_masks(model, names)
        stats = prune_and_regrow_(model, names, 0.5, 0.5, critical_unit0,
                                  random_seed=None if how == "criticality" else how)
        assert (stats["live"], stats["regrown"], live_count(model, names)) == (768, 384, 768)
        live = torch.cat([get_mask(model, n).flatten() for n in names])
        stored = torch.cat([model.classifier[i].parametrizations.weight.original.flatten() for i in (0, 3)])
        grown = live & ~kept_by_magnitude
        assert int(grown.sum()) == 384 and (stored[grown] == 0).all() and (live | ~kept_by_magnitude).all()
        chosen.setdefault(how, []).append(grown)
    assert not chosen["criticality"][0][in_output].any()              # criticality never reaches the output layer
    assert torch.equal(chosen["criticality"][0][:16], ~kept_by_magnitude[:16])  # unit 0's row: all pruned regrown
    share = chosen[7][0][in_output].sum().item() / 384               # hypergeometric sd 0.02: 0.05 is 2.5 sd
    assert abs(share - candidates_in_output) < 0.05 and candidates_in_output > 0.25
    assert torch.equal(chosen[7][0], chosen[7][1]) and not torch.equal(chosen[7][0], chosen[8][0])


def test_random_regrowth_in_training_scores_nothing():
    model = tiny_model()
    names = prunable_weights(model)
    attach_masks(model, names)
    pruner = PruneRegrow(names, 0.9, dt=3, regrow_ratio=0.2, regrow_by="random", seed=5)
    train(model, tiny_loader(), tiny_loader(16), TrainConfig(epochs=2, lr=1e-2), callbacks=[pruner])
    pruner.close()
    assert pruner.meter is None and [e["live"] for e in pruner.events] == [191, 100, 54, 36, 34]
    assert [e["regrown"] for e in pruner.events] == [38, 20, 11, 7, 7]   # round(0.2 * live)
    assert live_count(model, names) == 34


def test_a_shortened_training_schedule_still_ends_at_the_final_sparsity():
    """A time budget that cuts the loop's schedule to 10 steps: the events re-plan to K = 2 and end at s_f."""
    from snncompress.training.loop import TrainState

    model = tiny_model()
    names = prunable_weights(model)
    attach_masks(model, names)
    state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), TrainConfig(), "cpu", total_steps=20)
    pruner = PruneRegrow(names, 0.9, dt=5, regrow_ratio=0.0)
    pruner.on_train_begin(state)
    assert [s for s, _ in pruner.schedule] == [5, 10, 15, 20]
    state.total_steps = 10                                    # the loop re-planned after its first epoch
    for step in range(10):
        state.step = step
        pruner.after_step(state)
    assert [(e["step"], e["live"]) for e in pruner.events] == [(5, kept_count(340, 0.7875)), (10, 34)]
    assert live_count(model, names) == 34


def test_pruning_resumes_exactly_after_a_crash(tmp_path):
    """Killed mid-window (the criticality sums are half full), the rerun ends with the same masks and weights."""
    class StopAt(Callback):
        def after_step(self, state):
            if state.step + 1 == 8:
                raise RuntimeError("killed")

    def run(stop):
        model = tiny_model()
        names = prunable_weights(model)
        attach_masks(model, names)
        pruner = PruneRegrow(names, 0.8, dt=4, regrow_ratio=0.25, score_steps=3)
        cfg = TrainConfig(epochs=2, lr=1e-2, snapshot_every_steps=1)
        try:
            train(model, tiny_loader(), tiny_loader(16), cfg, callbacks=[pruner] + ([StopAt()] if stop else []),
                  snapshot_path=tmp_path / ("a.safetensors" if stop is not None else "b.safetensors"))
        finally:
            pruner.close()
        return model

    with pytest.raises(RuntimeError):
        run(True)                                             # snapshot a.safetensors after step 7
    resumed = run(False)                                      # resumes from it
    reference = run(None)                                     # never stopped
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


# ----------------------------------------------------------------------------- structured


def bn_model():
    seed_everything(0)
    return build_model("convnet", 2, (1, 4, 4), 2, features=[4, "A", 4], classifier=[3], batchnorm=True,
                       dropout=0.0, neuron=CRIT_NEURON)


def test_structured_regrowth_picks_the_channels_a_hand_example_predicts():
    model = bn_model()
    groups = channel_groups(model)
    assert [g.name for g in groups] == ["features.0", "features.4", "classifier.0"]
    with torch.no_grad():
        model.features[1].weight.copy_(torch.tensor([0.9, 0.1, 0.5, 0.05]))    # |gamma| of group A
        model.features[5].weight.copy_(torch.tensor([0.3, -0.8, 0.02, 0.2]))   # group B
    crit = {"features.2": torch.tensor([0.2, 0.3, 0.1, 0.4]), "features.6": torch.tensor([0.1, 0.2, 0.7, 0.3]),
            "classifier.1": torch.zeros(3)}
    # 8 BN channels, prune 50%: keep 4; regrow round(0.25 * 4) = 1. By gamma: A0 0.9, B1 0.8, A2 0.5.
    # Left out: A1, A3, B0, B2, B3; the most critical of them is B2 (0.7), not B0 (0.3, next by gamma).
    keep, summary = select_channels(model, groups, 0.5, 0.25, per_group_mean(groups, crit))
    assert {k: v.tolist() for k, v in keep.items()} == {"features.0": [0, 2], "features.4": [1, 2],
                                                       "classifier.0": [0, 1, 2]}      # no BN: kept whole
    assert summary["kept"] == 4 and summary["regrown"] == 1 and summary["regrown_by_group"] == {"features.4": 1}
    keep, _ = select_channels(model, groups, 0.5, 0.0, per_group_mean(groups, crit))                  # gamma alone
    assert keep["features.4"].tolist() == [0, 1]
    keep, _ = select_channels(model, groups, 0.9, 0.0, per_group_mean(groups, crit), min_channels=2)  # keep 1; floors to 2 each
    assert keep["features.0"].tolist() == [0, 2] and keep["features.4"].tolist() == [0, 1]


def test_gamma_l1_adds_the_penalty_to_the_loss():
    model = bn_model()
    bns = [model.features[1], model.features[5]]
    with torch.no_grad():
        bns[0].weight.copy_(torch.tensor([1.0, -2.0, 0.5, 0.0]))
        bns[1].weight.fill_(0.25)
    loss = GammaL1(bns, 0.01).loss(None, None, None, None, torch.tensor(1.0))
    assert loss.item() == pytest.approx(1.0 + 0.01 * (3.5 + 1.0))


# ----------------------------------------------------------------------------- the stages in a recipe


CRIT_RECIPE = CRIT_TINY_HEAD + """
stages:
  - {kind: train_snn, epochs: 1, lr: 1.0e-3, max_batches: 3}
  - {kind: prune_criticality, name: crit, epochs: 1, max_batches: 6, dt: 2, score_steps: 1, finetune_epochs: 1,
     finetune_max_batches: 2}
  - {kind: prune_criticality, name: magnitude, from_stage: train_snn, epochs: 1, max_batches: 6, dt: 2,
     regrow_ratio: 0, finetune_epochs: 0}
  - {kind: prune_imp, name: imp, from_stage: train_snn, epochs: 1, max_batches: 2, rate: 0.5, final_sparsity: 0.8,
     finetune_epochs: 1}
  - {kind: prune_criticality, name: slim, mode: structured, from_stage: train_snn, epochs: 1, max_batches: 2,
     prune_fraction: 0.5, regrow_fraction: 0.2, score_images: 32, finetune_epochs: 0}
  - {kind: prune_criticality, name: random, from_stage: train_snn, epochs: 1, max_batches: 6, dt: 2,
     regrow_by: random, finetune_epochs: 0}
measure: {robustness_images: 32, ops_images: 32, latency_repeats: 2, noise_sigmas: [0.0]}
"""


class _ReadForbidden:
    def __iter__(self):
        raise AssertionError("a stage read the test split")

    def __len__(self):
        return 1


def test_the_three_methods_side_by_side_record_their_costs(tmp_path):
    from snncompress.pipeline import Run

    class GuardedRun(Run):
        def context(self, model, stage_dir, previous=None, seed=None):
            ctx = super().context(model, stage_dir, previous, seed)
            if stage_dir != self.out:
                ctx.test_loader = _ReadForbidden()
            return ctx

    recipe = tmp_path / "crit.yaml"
    recipe.write_text(CRIT_RECIPE)
    report = GuardedRun(recipe, tmp_path / "run").execute()
    stages = {s["name"]: s["metrics"] for s in report["stages"]}
    crit, mag, imp, slim = stages["crit"], stages["magnitude"], stages["imp"], stages["slim"]
    # 36 + 288 + 392 * 16 + 160 = 6756 prunable weights; 90% sparsity: 676 live
    assert crit["prunable_weights"] == mag["prunable_weights"] == 6756
    assert crit["live_weights"] == mag["live_weights"] == 676 and crit["events"] == 3
    assert crit["regrown_weights"] > 0 and mag["regrown_weights"] == 0
    rand = stages["random"]                                   # the control: same events, same counts, no criticality
    assert (rand["method"], crit["method"], mag["method"]) == ("random_regrowth", "criticality", "magnitude")
    assert rand["live_weights"] == 676 and rand["regrown_weights"] == crit["regrown_weights"]
    assert "spatial" in crit and "spatial" not in rand and rand["regrow_by"] == "random"
    assert crit["pruning_iterations"] == 6 and crit["pruning_images"] == 6 * 32
    assert crit["finetune_iterations"] == 2 and crit["finetune_images"] == 64
    assert mag["finetune_iterations"] == 0 and mag["finetune_seconds"] == 0
    # IMP at rate 0.5 to 0.8: 0.5, 0.75, 0.8: two trained rounds of 2 steps, then the fine-tuned ticket
    assert imp["round_sparsities"] == [0.5, 0.75, 0.8] and imp["live_weights"] == kept_count(6756, 0.8)
    assert imp["pruning_iterations"] == 4 and imp["pruning_images"] == 4 * 32 and imp["finetune_iterations"] == 2
    assert all(m["pruning_seconds"] > 0 and 0 <= m["accuracy"] <= 1 for m in (crit, mag, imp, slim))
    # structured: 12 BN channels, keep 6 (round(0.2 * 6) = 1 regrown by criticality), the hidden linear layer kept whole
    assert slim["channels_prunable"] == 12 and slim["channels_kept"] == 6 and slim["channels_regrown"] == 1
    assert slim["pruning_images"] == 2 * 32 + 32 and slim["params"] < slim["params_before"]
    assert slim["group_widths"]["classifier.0"] == 16
    # every stage started from the baseline (from_stage), and its checkpoint holds its masks
    from snncompress.checkpoint import load_checkpoint
    ticket = load_checkpoint(tmp_path / "run" / imp["checkpoint"]).model
    assert sum(int(m.sum()) for m in get_masks(ticket).values()) == imp["live_weights"]
    events = json.loads((tmp_path / "run" / "stages" / "01-crit" / "events.json").read_text())["events"]
    assert [e["step"] for e in events] == [2, 4, 6]


@pytest.mark.parametrize("stage, message", [
    ("{kind: prune_criticality, prune_fraction: 0.5}", "prune_fraction: not used with mode: unstructured"),
    ("{kind: prune_criticality, regrow_ratio: 0, score: soft_spike}", "score: not used with regrow_ratio: 0"),
    ("{kind: prune_criticality, mode: structured, dt: 10}", "dt: not used with mode: structured"),
    ("{kind: prune_criticality, regrow_ratio: 0, regrow_budget: per_layer}",
     "regrow_budget: not used with regrow_ratio: 0"),
    ("{kind: prune_criticality, regrow_ratio: 0, spatial: mean}", "spatial: not used with regrow_ratio: 0"),
    ("{kind: prune_criticality, regrow_ratio: 0, regrow_decay: cosine}",
     "regrow_decay: not used with regrow_ratio: 0"),
    ("{kind: prune_criticality, mode: structured, regrow_decay: cosine}",
     "regrow_decay: not used with mode: structured"),
    ("{kind: prune_criticality, mode: structured, regrow_normalize: mean}",
     "regrow_normalize: not used with mode: structured"),
    ("{kind: prune_criticality, regrow_normalize: layer}", "regrow_normalize"),
    ("{kind: prune_criticality, regrow_by: random, score: soft_spike}", "score: not used with regrow_by: random"),
    ("{kind: prune_criticality, regrow_ratio: 0, regrow_by: random}", "regrow_by: not used with regrow_ratio: 0"),
    ("{kind: prune_imp, finetune_epochs: 0, finetune_lr: 0.1}", "finetune_lr: not used with finetune_epochs: 0"),
    ("{kind: prune_criticality, epochs: 0}", "epochs: mode unstructured prunes while training"),
    ("{kind: prune_imp, from_stage: nope}", r"from_stage: no earlier stage named 'nope' \(earlier: train_snn\)"),
    ("{kind: prune_imp, from_stage: prune_imp}", "from_stage: a stage cannot start from its own model"),
])
def test_options_a_mode_does_not_use_are_errors(tmp_path, stage, message):
    from snncompress.pipeline import Run

    recipe = tmp_path / "bad.yaml"
    recipe.write_text(CRIT_RECIPE.split("stages:")[0] + f"stages:\n  - {{kind: train_snn}}\n  - {stage}\n")
    with pytest.raises(UserError, match=message):
        Run(recipe, tmp_path / "run")


def test_runtime_mistakes_end_with_one_line(tmp_path):
    from snncompress.pipeline import run_recipe

    head = CRIT_RECIPE.split("stages:")[0].replace("batchnorm: true", "batchnorm: false")
    cases = [("{kind: prune_criticality, dt: 100, max_batches: 2}", "dt: 100 steps is longer than the pruning phase"),
             ("{kind: prune_criticality, mode: structured, epochs: 0}", "has no BatchNorm")]
    for i, (stage, message) in enumerate(cases):
        recipe = tmp_path / f"r{i}.yaml"
        recipe.write_text(head + f"stages:\n  - {{kind: train_snn, max_batches: 1}}\n  - {stage}\n")
        with pytest.raises(UserError, match=message):
            run_recipe(recipe, tmp_path / f"run{i}")
