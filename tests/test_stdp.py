"""The Diehl & Cook STDP network: the rule, normalisation, thresholds, labels, kernels, stages."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from snncompress.checkpoint import load_checkpoint, save_checkpoint
from snncompress.errors import UserError
from snncompress.kernels.population import population_library, run_steps_c
from snncompress.models import build_model
from snncompress.training.stdp import (STDPConfig, STDPLearner, WeightGrid, labels_from_responses, pre_traces,
                                       stdp_change, train_stdp)

KEEP = math.exp(-1.0 / 20.0)  # a 20 ms trace after one 1 ms step


def network(neurons=10, steps=50, **options):
    return build_model("diehl_cook", 10, (1, 28, 28), steps, neurons=neurons, **options)


def hand_traces(spikes: list[int], keep: float) -> list[float]:
    """x = 1 on a spike, else x * keep, written out step by step."""
    x, out = 0.0, []
    for s in spikes:
        x = 1.0 if s else x * keep
        out.append(x)
    return out


def pair(pre_at: int, post_at: int, k: int = 8):
    s_pre = torch.zeros(k, 1, 1)
    s_post = torch.zeros(k, 1, 1)
    s_pre[pre_at], s_post[post_at] = 1, 1
    x_pre = pre_traces(s_pre, torch.zeros(1, 1), KEEP)
    x_post = torch.tensor(hand_traces(s_post.flatten().tolist(), KEEP)).view(k, 1, 1)
    return stdp_change(s_pre, x_pre, s_post, x_post, nu_pre=1e-4, nu_post=1e-2)


def test_pre_before_post_potentiates_by_the_trace_left_at_the_post_spike():
    # pre at t=2, post at t=5: the pre trace has decayed 3 steps; no post trace at the pre spike
    assert pair(2, 5).item() == pytest.approx(1e-2 * KEEP ** 3, rel=1e-6)


def test_post_before_pre_depresses_by_the_post_trace_at_the_pre_spike():
    # post at t=2, pre at t=5: depression nu_pre * KEEP^3, plus potentiation nu_post * 0 (no pre trace yet)
    assert pair(5, 2).item() == pytest.approx(-1e-4 * KEEP ** 3, rel=1e-6)


def test_simultaneous_pre_and_post_both_count_with_trace_one():
    assert pair(4, 4).item() == pytest.approx(1e-2 - 1e-4, rel=1e-6)


def test_pre_traces_match_the_step_by_step_definition_with_a_carry():
    spikes = torch.tensor([0, 1, 0, 0, 1, 1, 0, 0], dtype=torch.float32).view(8, 1, 1)
    carry = torch.tensor([[0.5]])
    expected, x = [], 0.5
    for s in spikes.flatten().tolist():
        x = 1.0 if s else x * KEEP
        expected.append(x)
    got = pre_traces(spikes, carry, KEEP).flatten()
    assert torch.allclose(got, torch.tensor(expected), rtol=1e-6)


def test_pre_traces_one_step_at_a_time_equal_the_whole_window():
    spikes = (torch.rand(12, 2, 5, generator=torch.Generator().manual_seed(3)) > 0.6).float()
    carry, steps = torch.full((2, 5), 0.3), []
    for t in range(12):
        carry = pre_traces(spikes[t:t + 1], carry, KEEP)[0]
        steps.append(carry)
    assert torch.allclose(torch.stack(steps), pre_traces(spikes, torch.full((2, 5), 0.3), KEEP), rtol=1e-6)


def mnist_like(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 784, generator=g) * (torch.rand(n, 784, generator=g) > 0.7)


def test_normalisation_keeps_every_neurons_input_sum_at_norm():
    model = network(neurons=6, steps=40)
    learner = STDPLearner(model, STDPConfig(samples=4, norm=78.4, update_every=10))
    for row in mnist_like(4):
        learner.learn(row.unsqueeze(0))
    sums = model.synapses.weight.sum(1)
    assert torch.allclose(sums, torch.full((6,), 78.4), rtol=1e-5)
    assert float(model.synapses.weight.min()) >= 0.0


def test_thresholds_rise_by_theta_plus_per_crossing():
    model = network(neurons=8, steps=60, one_spike=False, inhibition="direct")
    learner = STDPLearner(model, STDPConfig(samples=1, theta_plus=0.05, tau_theta_ms=1e12))
    counts = learner.learn(torch.ones(1, 784) * 0.8)  # without one_spike every crossing is a spike
    assert counts.sum() > 0
    assert torch.allclose(model.excitatory.threshold - 13.0, 0.05 * counts[0], atol=1e-4)


def test_thresholds_decay_with_tau_theta_while_silent():
    model = network(neurons=3, steps=50)
    model.excitatory.threshold.fill_(13.0 + 1.0)
    learner = STDPLearner(model, STDPConfig(samples=1, tau_theta_ms=100.0, update_every=10))
    learner.learn(torch.zeros(1, 784))  # no input: no spike, theta only decays, 50 steps of 1 ms
    assert torch.allclose(model.excitatory.threshold - 13.0, torch.full((3,), math.exp(-50 / 100)), rtol=1e-5)


def test_labels_go_to_the_strongest_class_and_silent_neurons_get_none():
    responses = torch.tensor([[0.0, 2.0, 0.0, 1.0],    # class 0
                              [3.0, 1.0, 0.0, 1.0],    # class 1
                              [1.0, 0.5, 0.0, 4.0]])   # class 2
    assert labels_from_responses(responses).tolist() == [1.0, 0.0, -1.0, 2.0]


def test_votes_are_each_class_mean_over_its_neurons():
    model = build_model("diehl_cook", 3, (1, 28, 28), 10, neurons=4)
    model.labels.copy_(torch.tensor([0.0, 0.0, 2.0, -1.0]))
    votes = model.votes(torch.tensor([[4.0, 2.0, 5.0, 9.0]]))
    assert votes.tolist() == [[3.0, 0.0, 5.0]]  # class 1 has no neuron; neuron 3 has no label


@pytest.mark.parametrize("inhibition", ["layer", "direct"])
@pytest.mark.parametrize("one_spike", [True, False])
def test_c_kernel_gives_the_tensor_loops_spikes_state_and_thresholds_exactly(inhibition, one_spike):
    model = network(neurons=30, steps=80, inhibition=inhibition, one_spike=one_spike)
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    currents = torch.rand(80, 5, 30, generator=g) * 6
    noise = torch.rand(currents.shape, generator=g) if one_spike else None
    lib = population_library(currents, twin)
    assert lib is not None  # the test machine builds the C kernels
    s1, s2 = model.initial_state(5, "cpu"), twin.initial_state(5, "cpu")
    x1, x2 = torch.zeros(5, 30), torch.zeros(5, 30)
    a, ta = model.run_steps_torch(s1, currents, noise, 0.05, x1, KEEP)
    b, tb = run_steps_c(lib, twin, s2, currents, noise, 0.05, x2, KEEP)
    assert a.sum() > 20
    assert torch.equal(a, b) and torch.equal(ta, tb)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert torch.equal(model.excitatory.threshold, twin.excitatory.threshold)
    if one_spike:
        assert float(a.sum(2).max()) == 1.0


def test_one_spike_reports_at_most_one_spike_per_sample_and_step():
    model = network(neurons=20, steps=30, inhibition="direct", one_spike=True)
    state = model.initial_state(3, "cpu")
    spikes, _ = model.run_steps(state, torch.full((30, 3, 20), 20.0))  # every neuron crosses at step 0
    assert spikes[0].sum(1).tolist() == [1.0, 1.0, 1.0]


def test_tiny_updates_vanish_under_truncation_and_survive_stochastic_rounding():
    results = {}
    for rounding in ("truncate", "nearest", "stochastic"):
        grid = WeightGrid(8, rounding, 1.0, torch.Generator().manual_seed(0))
        step = float(grid.quantizer.scale)
        w = torch.full((2000,), 32 * step)
        for _ in range(50):  # 50 potentiations of a fifth of a step: +10 steps expected
            w += step / 5
            grid.snap_(w)
        results[rounding] = float((w / step).mean()) - 32
    assert results["truncate"] == 0.0 and results["nearest"] == 0.0
    # per weight: 50 draws of variance 0.16 -> sd 2.83 steps; mean of 2000: SE 0.063; 3.5 SE
    assert results["stochastic"] == pytest.approx(10.0, abs=0.22)


def test_quantized_learning_keeps_weights_on_the_grid_and_stores_them_at_that_width():
    model = network(neurons=5, steps=30)
    images = torch.rand(3, 1, 28, 28)
    train_stdp(model, [(images, torch.zeros(3, dtype=torch.long))],
               STDPConfig(samples=3, weight_bits=6, rounding="stochastic"), log=lambda s: None)
    from snncompress.compress.masks import original
    from snncompress.compress.footprint import footprint
    stored = original(model.synapses, "weight")
    scale = 2.0 ** -5  # 6 bits, signed: q_max 31, the finest power of two with 31 * scale >= 1
    assert torch.equal(stored, torch.round(stored / scale) * scale)
    assert footprint(model)["tensors"]["synapses.weight"]["bits"] == 5 * 784 * 6 + 32


def test_evaluation_is_repeatable_and_survives_a_checkpoint(tmp_path):
    model = network(neurons=12, steps=40)
    model.labels.copy_(torch.arange(12) % 10)
    images = torch.rand(6, 1, 28, 28)
    first = model(images)
    assert torch.equal(first, model(images))
    save_checkpoint(tmp_path / "m.safetensors", model)
    again = load_checkpoint(tmp_path / "m.safetensors").model
    assert torch.equal(again(images), first)
    assert again.labels.tolist() == model.labels.tolist()


RECIPE = """
name: stdp-test
seed: 0
data: {{dataset: mnist-builtin, batch_size: 50}}
model: {{arch: {arch}, timesteps: 30, options: {options}}}
stages:
{stages}
measure: {{robustness_images: 50, ops_images: 20, latency_repeats: 2}}
"""


def recipe(arch="diehl_cook", options="{neurons: 10}", stages="  - {kind: train_stdp, samples: 20}"):
    return RECIPE.format(arch=arch, options=options, stages=stages)


@pytest.mark.parametrize("text, message", [
    (recipe(arch="convnet", options="{}"), "train_stdp trains the diehl_cook network"),
    (recipe(stages="  - {kind: train_stdp, samples: 20, rounding: truncate}"), "only used with weight_bits"),
    (recipe(stages="  - {kind: train_stdp}\n  - {kind: train_snn}"), "learns by STDP"),
    (recipe(stages="  - {kind: select_stdp, neurons: 50}"), "select_stdp trains every size"),
    (recipe(options="{neurons: 0}"), "neurons"),
])
def test_recipe_mistakes_are_one_line_errors_before_anything_is_written(tmp_path, text, message):
    from snncompress.pipeline import Run

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        Run(path, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_pipeline_trains_labels_and_measures_the_network(tmp_path):
    from snncompress.pipeline import run_recipe

    out, path = tmp_path / "run", tmp_path / "stdp.yaml"
    stages = ("  - {kind: train_stdp, samples: 40, label_samples: 100}\n"
              "  - {kind: quantize, bits: {weights: [6, 3]}, roundings: [truncate], max_accuracy_drop: 0.0005}")
    path.write_text(recipe(stages=stages))
    run_recipe(path, out)
    report = json.loads((out / "report.json").read_text())
    trained, quantized = report["stages"][0]["metrics"], report["stages"][1]["metrics"]
    assert trained["samples"] == 40 and trained["neurons"] == 10
    assert trained["spikes_per_image"] > 0
    assert trained["timesteps"] == 30
    # float: 10 x 784 weights, 10 thresholds, 1 leak, 10 labels, all float32
    assert trained["footprint_bytes"] == (7840 + 10 + 1 + 10) * 4
    # 6-bit weights (+ one float32 scale): 7840 * 6 / 8 + 4 bytes; the rest stays float32
    assert quantized["footprint_bytes"] == 7840 * 6 // 8 + 4 + (10 + 1 + 10) * 4
    # the accuracy gate (0.05 points on 1200 validation images, float 10.75%) picks 6 bits: 3-bit truncated
    # weights score 10.67%, one image under it, and are rejected although they are half the size
    record = json.loads(next((out / "stages").glob("*-quantize")).joinpath("exploration.json").read_text())
    base = record["baseline"]["val_accuracy"]
    assert base == pytest.approx(0.1075)
    verdicts = {c["label"]: (round((c["val_accuracy"] - base) * 1200), c["passed"]) for c in record["candidates"]}
    assert verdicts == {"ptq truncate w6": (16, True), "ptq truncate w3": (-1, False)}


@pytest.mark.parametrize("name, kinds", [
    ("tiny-stdp-mnist.yaml", ["train_stdp", "quantize", "train_stdp"]),
    ("tiny-stdp-fmnist.yaml", ["train_stdp", "quantize", "train_stdp"]),
    ("tiny-stdp-mnist-options.yaml", ["train_stdp"] * 6 + ["select_stdp"]),
    ("tiny-stdp-mnist-rounding.yaml", ["train_stdp"] * 3),
])
def test_shipped_stdp_recipes_validate(name, kinds):
    from pathlib import Path

    import snncompress
    from snncompress.pipeline import validate_stages
    from snncompress.recipe import load_recipe

    recipe, _ = load_recipe(Path(snncompress.__file__).parent / "recipes" / name)
    assert [opts.kind for _, opts in validate_stages(recipe, name)] == kinds


@pytest.mark.parametrize("weight_bits", [None, 6])
def test_validation_checks_keep_the_best_network_seen(tmp_path, weight_bits):
    from snncompress.pipeline import run_recipe

    out, path = tmp_path / "run", tmp_path / "stdp.yaml"
    bits = f", weight_bits: {weight_bits}" if weight_bits else ""
    path.write_text(recipe(stages=f"  - {{kind: train_stdp, samples: 60, validate_every: 20, label_samples: 100{bits}}}"))
    run_recipe(path, out)
    metrics = json.loads((out / "report.json").read_text())["stages"][0]["metrics"]
    history = metrics["validation_checks"]
    assert [h["samples"] for h in history] == [20, 40, 60]
    best = max(history, key=lambda h: h["val_accuracy"])
    assert metrics["kept_after_samples"] == best["samples"]
    assert metrics["val_accuracy"] == best["val_accuracy"]  # the kept network, labelled as it was then
