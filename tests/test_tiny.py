"""tinySNN quantization: fixed-point roundings, saturation, per-channel scales, a quantized membrane, integer
storage, and the design-space exploration (stage and command)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from snncompress.checkpoint import load_checkpoint, save_checkpoint, stored_bytes
from snncompress.cli import main
from snncompress.compress import FixedPointQuantizer, UniformQuantizer, attach_quantizer, get_quantizers
from snncompress.compress.exploration import Candidate, QuantSpace, explore, memory_bytes, quantize_model
from snncompress.compress.quantizers import PowerOfTwoQuantizer, round_codes
from snncompress.errors import UserError
from snncompress.metrics import footprint
from snncompress.models import build_model
from snncompress.neuron import LIF, lif_multistep


def _convnet(seed: int = 0, size: int = 8):
    torch.manual_seed(seed)
    return build_model("convnet", 10, (1, size, size), 2, features=[6, "A"], classifier=[12], dropout=0.0).eval()


# ----------------------------------------------------------------------------- roundings and saturation


def test_fixed_point_roundings_on_hand_values():
    q = FixedPointQuantizer(1, 2, "nearest").eval()                     # Q(1.2): step 0.25, codes -7..7
    x = torch.tensor([0.3, 0.375, -0.3, -0.375, 0.625, 1.0])           # 1.2, 1.5, -1.2, -1.5, 2.5, 4 steps
    expect = {"nearest": [0.25, 0.5, -0.25, -0.5, 0.5, 1.0],           # ties to even
              "half_up": [0.25, 0.5, -0.25, -0.25, 0.75, 1.0],         # floor(r + 1/2)
              "truncate": [0.25, 0.25, -0.5, -0.5, 0.5, 1.0]}          # floor(r)
    for rounding, values in expect.items():
        q.rounding = rounding
        assert q(x).tolist() == values, rounding
    assert round_codes(torch.tensor([2.0 + 1e-6], dtype=torch.float64), "truncate", False).item() == 2.0  # on grid


def test_saturation_at_both_ends_of_the_range():
    for rounding in ("nearest", "half_up", "truncate", "stochastic"):
        q = FixedPointQuantizer(2, 3, rounding).train()                 # Q(2.3): 6 bits, step 1/8, +-31/8
        out = q(torch.tensor([100.0, 3.875, 3.9, -3.875, -3.9, -100.0]))
        assert out.tolist() == [3.875, 3.875, 3.875, -3.875, -3.875, -3.875], rounding
    p = PowerOfTwoQuantizer(4, "nearest")              # range from the tensor: 0.8 / q_max 7 = 0.114 -> step 1/8
    p.update_scale(torch.tensor([0.8, -0.2]))
    assert p.scale.item() == 0.125 and p.frac_bits == 3
    assert p.eval()(torch.tensor([0.8, -2.0, 2.0])).tolist() == [0.75, -0.875, 0.875]


def test_stochastic_rounding_is_unbiased_and_seeded():
    q = FixedPointQuantizer(1, 2, "stochastic").train()
    x = torch.full((20000,), 0.3)                                       # 1.2 steps: 0.25 w.p. 0.8, 0.5 w.p. 0.2
    q.generator = torch.Generator().manual_seed(7)
    first = q(x)
    assert set(first.unique().tolist()) == {0.25, 0.5}
    # unbiased: SE of the mean = 0.25 * sqrt(0.2 * 0.8 / 20000) = 0.00071; bound 3.5 SE, seed fixed
    assert abs(first.mean().item() - 0.3) < 3.5 * 0.25 * (0.2 * 0.8 / 20000) ** 0.5
    # per value (step 1/4, one row of 100000 draws each): only the two neighbours on the grid, and the mean
    # within 3.5 SE = 3.5 * 0.25 * sqrt(p (1 - p) / 1e5) of x (SE 0.00035 to 0.0004; a rounding biased by
    # 1 % of a step, 0.0025, is off by 6 SE or more)
    values = torch.tensor([0.05, 0.3, 0.6, 0.95, -0.45, -1.2, 1.6])   # fractions p 0.2 to 0.8 of a step
    q.generator = torch.Generator().manual_seed(11)
    draws = q(values[:, None].expand(-1, 100000).contiguous())
    low = torch.floor(values * 4) / 4
    p = (values - low) * 4
    assert ((draws == low[:, None]) | (draws == low[:, None] + 0.25)).all()
    se = 0.25 * (p * (1 - p) / 100000).sqrt()
    assert ((draws.mean(1) - values).abs() < 3.5 * se).all(), (draws.mean(1) - values) / se
    q.generator = torch.Generator().manual_seed(7)
    assert torch.equal(q(x), first)                                     # same seed, same draws
    q.generator = torch.Generator().manual_seed(8)
    assert not torch.equal(q(x), first)
    q.eval()
    assert torch.equal(q(x), torch.full((20000,), 0.25))                # eval mode: nearest, the same every time


def test_per_channel_scales_and_their_storage(tmp_path):
    w = torch.tensor([[1.0, -0.4], [0.1, 0.04]])
    u = UniformQuantizer(3, channels=2)                                 # q_max 3: codes [3, -1.2 -> -1], [3, 1.2 -> 1]
    u.update_scale(w)
    assert torch.allclose(u.scale, torch.tensor([1 / 3, 0.1 / 3]))
    assert torch.allclose(u.eval()(w), torch.tensor([[1.0, -1 / 3], [0.1, 0.1 / 3]]))
    p = PowerOfTwoQuantizer(4, channels=2)
    p.update_scale(w)
    assert p.scale.tolist() == [0.25, 2.0 ** -6] and p.frac_bits == [2, 6]
    model = _convnet()
    for name in ("features.0.weight", "classifier.0.weight"):
        rows = model.get_submodule(name.rpartition(".")[0]).weight.shape[0]
        attach_quantizer(model, name, PowerOfTwoQuantizer(5, "nearest", channels=rows))
    path = tmp_path / "pc.safetensors"
    save_checkpoint(path, model)
    loaded = load_checkpoint(path).model
    images = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    assert get_quantizers(loaded)["features.0.weight"].scale.shape == (6,)
    fp = footprint(model)
    assert fp["bytes"] <= stored_bytes(path) <= fp["bytes"] + len(load_file(str(path)))
    assert fp["tensors"]["features.0.weight"]["bits"] == 6 * 9 * 5 + 6 * 32  # codes + one scale per channel


# ----------------------------------------------------------------------------- quantized membrane


def test_quantized_membrane_changes_the_spike_train_as_a_hand_trace_predicts():
    current = torch.full((4, 1, 1), 0.7)
    one = torch.tensor(1.0)
    # float: u = .7 | 1.4 spike, u_hat .4 | 1.1 spike, .1 | .8         -> 0 1 1 0
    assert lif_multistep(current, one, one).flatten().tolist() == [0, 1, 1, 0]
    # Q(1.1) truncate (step 0.5): u = .7 -> .5 | 1.2 spike, .2 -> 0 | .7 -> .5 | 1.2 spike  -> 0 1 0 1
    q = FixedPointQuantizer(1, 1, "truncate").eval()
    assert lif_multistep(current, one, one, state_quantizer=q).flatten().tolist() == [0, 1, 0, 1]
    lif = LIF(leak=1.0, threshold=1.0, state_quantizer=q).eval()       # the module runs the same (reference) path
    assert lif(current.view(4, 1, 1, 1)).flatten().tolist() == [0, 1, 0, 1]
    lif.state_quantizer = FixedPointQuantizer(1, 1, "stochastic").train()
    lif.state_quantizer.generator = torch.Generator().manual_seed(0)
    draws = lif(torch.full((4, 500, 1, 1), 0.7))
    lif.state_quantizer.generator = torch.Generator().manual_seed(0)
    assert torch.equal(lif(torch.full((4, 500, 1, 1), 0.7)), draws)   # stochastic membrane rounding is seeded


# ----------------------------------------------------------------------------- integer storage


def test_a_chosen_candidate_stores_integer_codes_and_reloads_bit_for_bit(tmp_path):
    model = _convnet()
    space = QuantSpace({"weights": [5], "neurons": [6], "state": [8]}, per_channel=True, seed=3)
    candidate = Candidate.of({"weights": 5, "neurons": 6, "state": 8}, "stochastic")
    q = quantize_model(model, candidate, space)
    again = quantize_model(model, candidate, space)
    for name, quantizer in get_quantizers(q).items():                  # the seeded draw is reproducible
        module, attr = q.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
        other = again.get_submodule(name.rpartition(".")[0])
        assert torch.equal(getattr(module, attr), getattr(other, attr))
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, q)
    arrays = load_file(str(path))
    assert "features.0.weight@codes" in arrays and arrays["features.0.weight@codes"].dtype == torch.uint8
    assert not any(k.endswith(".weight") for k in arrays)              # no float weights stored
    loaded = load_checkpoint(path).model
    images = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(images), q(images))
    lifs = dict(loaded.spiking_layers())
    assert lifs["features.1"].state_quantizer.bits == 8
    neurons = {"features.1": 6 * 8 * 8, "classifier.1": 12, "classifier.4": 10}
    without, with_state = memory_bytes(q, {k: v for k, v in neurons.items() if k in lifs})
    assert without == footprint(q)["bytes"] and with_state > without
    assert footprint(loaded)["bytes"] == without


# ----------------------------------------------------------------------------- the exploration


def _toy_accuracy(model) -> float:
    """Hand rule: nearest needs >= 4 weight bits, truncate >= 6; neurons and state need >= 4 bits."""
    quantizers = get_quantizers(model)
    weights = quantizers.get("features.0.weight")
    acc = 0.90
    if weights is not None:
        acc -= 0.2 * (weights.bits < (4 if weights.rounding == "nearest" else 6))
    neuron = quantizers.get("features.1.threshold")
    if neuron is not None and neuron.bits < 4:
        acc -= 0.2
    state = dict(model.spiking_layers())["features.1"].state_quantizer
    if state is not None and state.bits < 4:
        acc -= 0.2
    return acc + 0.001 * getattr(model, "trained", 0)


def _toy_space(**kw):
    return QuantSpace({"weights": [8, 6, 4, 3, 2], "neurons": [8, 3], "state": [8, 4]},
                      roundings=["nearest", "truncate"], **kw)


def test_exploration_picks_the_hand_predictable_winner_and_prunes_dominated_branches():
    logs = []
    result = explore(_convnet(), _toy_space(), _toy_accuracy, max_accuracy_drop=0.01, log=logs.append)
    # a scalar threshold or leak quantized costs its bits + a 32-bit scale (> 32): neurons stay float; the state
    # is not counted (include_state False), so among equal memory the float state is preferred
    assert result.chosen.candidate == Candidate.of({"weights": 4}, "nearest")
    labels = [e.candidate.label for e in result.evaluated]
    # nearest fails at 3 bits (2 is skipped), truncate at 4 (3 and 2 skipped): 3 branches pruned
    assert result.pruned["fewer_bits_after_failure"] == 3
    assert "ptq nearest w2" not in labels and "ptq truncate w3" not in labels
    assert labels.count("ptq nearest n3") == 1 and "ptq truncate n3" in labels
    tol = result.tolerance()
    assert tol["weights"]["nearest"] == {8: 0.9, 6: 0.9, 4: 0.9, 3: pytest.approx(0.7), 2: None}
    assert "stochastic" not in tol["state"]                            # no draw in eval mode: not explored
    front = result.front()
    assert front[0].candidate == result.chosen.candidate or front[0].memory(False) <= result.chosen.memory(False)
    assert any("at most" in line for line in logs) and any("eta" in line for line in logs)
    assert result.chosen.bytes < result.baseline.bytes / 5


def test_exploration_counts_the_state_when_asked_and_refuses_cleanly_when_nothing_fits():
    with_state = explore(_convnet(), _toy_space(), _toy_accuracy, max_accuracy_drop=0.01, include_state=True,
                         neurons={"features.1": 384, "classifier.1": 12, "classifier.4": 10}, log=lambda s: None)
    assert with_state.chosen.candidate == Candidate.of({"weights": 4, "state": 4}, "nearest")
    limited = explore(_convnet(), _toy_space(), _toy_accuracy, max_accuracy_drop=0.01, max_memory_bytes=100,
                      log=lambda s: None)
    assert limited.chosen is None and limited.pruned["over_memory_limit"] > 0
    assert limited.nothing_fits().startswith("no candidate fits: the smallest within 1 points")


def test_itq_trains_the_smaller_candidates_that_failed_under_ptq():
    trained = []

    def train(model, candidate):
        assert model.training and candidate.scheme == "itq"
        trained.append(candidate)
        model.trained = 1
        return model

    def accuracy(model):                        # weights and state together fail by a hair; training fixes it
        both = bool(get_quantizers(model)) and dict(model.spiking_layers())["features.1"].state_quantizer is not None
        return 0.8895 + 0.001 * getattr(model, "trained", 0) if both else 0.90

    space = QuantSpace({"weights": [4], "state": [8]}, roundings=["nearest"], schemes=["ptq", "itq"])
    result = explore(_convnet(), space, accuracy, max_accuracy_drop=0.01, include_state=True,
                     neurons={"features.1": 384, "classifier.1": 12, "classifier.4": 10}, train=train,
                     log=lambda s: None)
    assert trained == [Candidate.of({"weights": 4, "state": 8}, "nearest", "itq")]
    assert result.chosen.candidate.scheme == "itq" and result.chosen_model.trained == 1
    assert [e.phase for e in result.evaluated].count("itq") == 1


# ----------------------------------------------------------------------------- the command and the stage


def _builtin_checkpoint(tmp_path):
    model = build_model("convnet", 10, (1, 28, 28), 2, features=[4, "A"], classifier=[8])
    path = tmp_path / "snn.safetensors"
    save_checkpoint(path, model.eval(), info={"dataset": "mnist-builtin"})
    return path


def test_quantize_command_refuses_with_one_line_and_writes_nothing(tmp_path, capsys):
    path, out = _builtin_checkpoint(tmp_path), tmp_path / "q"
    args = ["quantize", str(path), "--out", str(out), "--set", "val_batches=1", "--set", "bits={weights: [4]}",
            "--set", "roundings=[nearest]"]
    assert main(args + ["--max-memory-kb", "0.01", "--max-accuracy-drop", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("snncompress: error: no candidate fits") and "KiB" in err
    assert not out.exists()
    assert main(args + ["--max-accuracy-drop", "150"]) == 2
    assert "in points" in capsys.readouterr().err
    assert main(args + ["--set", "bits={weights: [1]}"]) == 2
    assert "bits" in capsys.readouterr().err and not out.exists()


def test_quantize_command_writes_the_chosen_model_and_its_report(tmp_path):
    path, out = _builtin_checkpoint(tmp_path), tmp_path / "q"
    # the strictest gate (0 points): this untrained model predicts one class, so 4-bit weights keep its accuracy
    code = main(["quantize", str(path), "--out", str(out), "--max-accuracy-drop", "0", "--set", "val_batches=1",
                 "--set", "bits={weights: [6, 4], state: [8]}", "--set", "roundings=[nearest, stochastic]", "--set", "include_state=true"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "pareto.png", "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    final = report["final"]
    assert report["schema"] == 1 and final["reload_bit_exact"] is True
    assert final["chosen"]["bits"] == {"weights": 4, "state": 8}
    base = report["exploration"]["baseline"]["val_accuracy"]
    assert all(c["passed"] == (c["val_accuracy"] >= base) for c in report["exploration"]["candidates"])
    assert final["footprint_bytes"] <= final["stored_tensor_bytes"] <= final["footprint_bytes"] + 64
    assert final["footprint_ratio"] > 4 and "Tolerance" in (out / "report.md").read_text()
    assert dict(load_checkpoint(out / "model.safetensors").model.spiking_layers())["features.1"].state_quantizer


def test_quantize_stage_in_a_recipe(tmp_path, tiny_recipe):
    from snncompress.pipeline import run_recipe

    # a full epoch of ANN training at 1e-2 (and 64 calibration images) so that quantizing the neurons changes a
    # prediction: on the 26 validation images the float model scores 3/26, 6-bit truncated thresholds and
    # leaks 2/26 (-3.8 points)
    text = tiny_recipe.read_text().replace("lr: 1.0e-3, max_batches: 2", "lr: 1.0e-2, max_batches: 8").replace(
        "calib_images: 32", "calib_images: 64").replace(
        "measure:", "  - {kind: quantize, max_accuracy_drop: 0.02, val_batches: 1, roundings: [truncate],\n"
                    "     bits: {weights: [6, 3], neurons: [6, 4]}}\nmeasure:")
    tiny_recipe.write_text(text)
    report = run_recipe(tiny_recipe, tmp_path / "run", [])
    stage = report["stages"][-1]
    assert stage["kind"] == "quantize" and stage["metrics"]["chosen"]["bits"] == {"weights": 3}
    folder = next((tmp_path / "run" / "stages").glob("*-quantize"))
    assert {"pareto.png", "exploration.json", "exploration.md", "model.safetensors"} <= {p.name for p in folder.iterdir()}
    # the 2-point gate: the weights pass at the float accuracy, 6-bit neurons fall 1 image (3.8 points) below it
    # and are rejected, so their 4 bits are never tried and no joint candidate quantizes the neurons
    record = json.loads((folder / "exploration.json").read_text())
    assert record["max_accuracy_drop"] == 0.02
    base = record["baseline"]["val_accuracy"]
    verdicts = {c["label"]: (round((c["val_accuracy"] - base) * 26), c["passed"]) for c in record["candidates"]}
    assert verdicts == {"ptq truncate w6": (0, True), "ptq truncate w3": (0, True), "ptq truncate n6": (-1, False)}
    assert record["pruned"]["fewer_bits_after_failure"] == 1
    with pytest.raises(UserError, match="no candidate fits"):
        run_recipe(tiny_recipe, tmp_path / "run2", ["stages.quantize.max_memory_kb=0.01"])
