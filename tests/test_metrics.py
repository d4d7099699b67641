"""Measurements against hand counts: spikes, SynOps, energy, footprint, latency, robustness."""

from __future__ import annotations

import math

import pytest
import torch

from snncompress.compress import UniformQuantizer, attach_quantizer, set_mask
from snncompress import build_model
from snncompress.deploy import build_inference_plan
from snncompress.errors import UserError
from snncompress.metrics import (ENERGY_PRESETS, SpikeMeter, count_synops, energy_uj, footprint,
                                 measure_model, noise_robustness, sigma_key, sparse_format_bits)
from snncompress.metrics.energy import energy_pj, layer_energy_uj
from snncompress.metrics.ops import is_spike_tensor

T = 2


def two_layer_net(classes: int = 3, threshold: float = 2.5):
    """conv 1->2 (3x3, pad 1) -> LIF -> flatten -> linear 32->classes, all weights 1, on 4x4 images.

    With an image of 0.5 everywhere (analog: not -1/0/1) every conv output is half the number
    of in-bounds taps: 4/2 at the 4 corners, 6/2 at the 8 edges, 9/2 at the 4 inner positions.
    """
    model = build_model("convnet", classes, (1, 4, 4), T, features=[2], classifier=[],
                        neuron={"threshold": threshold, "learn_leak": False, "learn_threshold": False})
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    return model.eval()


# Hand count for two_layer_net on one image of 0.5s, threshold 2.5, soft reset, leak 1, T = 2:
#   conv1 (analog input, once per image): taps summed over positions = 4*4 + 8*6 + 4*9 = 100,
#     times 2 output channels -> 200 Effective_MACs = 200 Dense.
#   LIF: corners (u=2) fire at t=1 only (u=4); edges (3) and inner (4.5) fire at t=0 and t=1.
#     spikes per channel = 4*1 + 8*2 + 4*2 = 28; both channels: 56 spikes per image.
#   linear (spike input): each spike reaches 3 nonzero weights -> 56 * 3 = 168 Effective_ACs;
#     Dense = T * 32 inputs * 3 outputs = 192.
HAND_MACS, HAND_SPIKES, HAND_ACS, HAND_DENSE = 200, 56, 168, 200 + 192


def halves(batch: int = 1) -> torch.Tensor:
    """``batch`` 4x4 images of 0.5s, ``[batch, 1, 4, 4]``."""
    return torch.full((batch, 1, 4, 4), 0.5)


def test_two_layer_net_matches_hand_count():
    model = two_layer_net()
    ops = count_synops(model, halves())
    assert ops["mac"] == HAND_MACS
    assert ops["ac"] == HAND_ACS
    assert ops["dense"] == HAND_DENSE
    assert ops["per_layer"]["features.0"] == {"ac": 0.0, "mac": 200.0, "dense": 200.0}
    assert ops["per_layer"]["classifier.0"] == {"ac": 168.0, "mac": 0.0, "dense": 192.0}


def test_counts_are_per_image():
    ops = count_synops(two_layer_net(), halves(5))
    assert (ops["mac"], ops["ac"], ops["dense"], ops["images"]) == (HAND_MACS, HAND_ACS, HAND_DENSE, 5)


def test_spikes_and_firing_rate_match_hand_count():
    model = two_layer_net()
    with torch.no_grad(), SpikeMeter(model) as meter:
        model(halves(2))
    assert meter.spikes_per_image() == HAND_SPIKES
    assert meter.firing_rates() == {"features.1": pytest.approx(HAND_SPIKES / (32 * T))}
    assert meter.neurons() == {"features.1": 32}


def test_half_masked_layer_counts_half_the_acs():
    model = build_model("convnet", 4, (1, 4, 4), T, features=[2], classifier=[],
                        neuron={"threshold": 2.5, "learn_leak": False, "learn_threshold": False})
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    dense_acs = count_synops(model, halves())["per_layer"]["classifier.0"]["ac"]
    mask = torch.ones(4, 32, dtype=torch.bool)
    mask[:2] = False  # half of the weights: the rows of outputs 0 and 1
    set_mask(model, "classifier.0.weight", mask)
    masked = count_synops(model, halves())["per_layer"]["classifier.0"]
    assert dense_acs == HAND_SPIKES * 4
    assert masked["ac"] == dense_acs / 2
    assert masked["dense"] == T * 32 * 4  # Dense ignores zeros


def test_all_zero_input_gives_zero_effective_ops():
    ops = count_synops(two_layer_net(), torch.zeros(3, 1, 4, 4))
    assert ops["ac"] == 0 and ops["mac"] == 0
    assert ops["dense"] == HAND_DENSE


@pytest.mark.parametrize("timesteps", [2, 5])
def test_conv1_per_timestep_multiplies_conv1_macs_by_t(timesteps):
    model = build_model("convnet", 10, (1, 12, 12), timesteps, features=[4, "A", 6, "A"], classifier=[8],
                        neuron={"threshold": 0.2}).eval()
    images = torch.randn(3, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    once = count_synops(model, images)
    per_t = count_synops(model, images, conv1_per_timestep=True)
    assert per_t["per_layer"]["features.0"]["mac"] == timesteps * once["per_layer"]["features.0"]["mac"]
    assert per_t["mac"] - once["mac"] == pytest.approx((timesteps - 1) * once["per_layer"]["features.0"]["mac"])
    for layer in ("features.3", "classifier.0", "classifier.3"):
        assert per_t["per_layer"][layer] == once["per_layer"][layer]


@pytest.mark.parametrize("arch,in_shape,options", [
    ("convnet", (1, 12, 12), {"features": [4, "A", 6, "A"], "classifier": [8]}),
    ("vgg5", (3, 8, 8), {"features": [4, "A", 4, "A"], "classifier": [8, 8]}),
    ("resnet20", (3, 8, 8), {"width_mult": 1 / 32}),
    ("resnet19", (3, 8, 8), {"width_mult": 1 / 32}),
])
def test_snn_dense_is_t_times_ann_dense_for_every_family(arch, in_shape, options):
    timesteps = 3
    # Seeded weights and a low threshold: the spike-fed classifier layers of the small convnet and
    # vgg5 (linear init N(0, 0.01)) fire for every seed tried, so Effective_ACs > 0 is not luck.
    torch.manual_seed(0)
    model = build_model(arch, 5, in_shape, timesteps, neuron={"threshold": 0.01}, **options).eval()
    images = torch.randn(2, *in_shape, generator=torch.Generator().manual_seed(1))
    snn = count_synops(model, images, conv1_per_timestep=True)
    ann = count_synops(model.ann_twin(), images)
    assert snn["dense"] == timesteps * ann["dense"]
    assert ann["ac"] == 0 and 0 < ann["mac"] <= ann["dense"]
    assert snn["ac"] > 0 and snn["ac"] + snn["mac"] <= snn["dense"]
    first_conv = next(iter(snn["per_layer"]))
    assert snn["per_layer"][first_conv]["ac"] == 0  # direct analog input: MACs only


def test_resnet_counts_shortcut_convolutions():
    model = build_model("resnet19", 5, (3, 8, 8), 2, width_mult=1 / 32, neuron={"threshold": 0.1}).eval()
    ops = count_synops(model, torch.randn(2, 3, 8, 8))
    assert "blocks.3.shortcut.0" in ops["per_layer"]  # first block of a strided stage projects
    assert ops["per_layer"]["blocks.3.shortcut.0"]["dense"] > 0


def pooled_net():
    """conv 1->2 -> LIF -> avgpool 2x2 -> linear 8->3 (weights 1) on 4x4 images, T = 2."""
    model = build_model("convnet", 3, (1, 4, 4), T, features=[2, "A"], classifier=[],
                        neuron={"threshold": 2.5, "learn_leak": False, "learn_threshold": False})
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    return model.eval()


def test_pooled_spikes_conventions():
    # Same spikes as two_layer_net: per channel and 2x2 pool cell over both timesteps the cell holds
    # 4 + 3 = 7 spikes (one corner is silent at t=0): every pooled value is nonzero, so the linear
    # layer sees 2 ch x 4 cells x T = 16 nonzero inputs.
    model = pooled_net()
    image = halves()
    as_mac = count_synops(model, image, pooled_spikes="mac")["per_layer"]["classifier.0"]
    as_ac = count_synops(model, image, pooled_spikes="ac")["per_layer"]["classifier.0"]
    assert as_mac == {"ac": 0.0, "mac": 16 * 3.0, "dense": T * 8 * 3.0}
    assert as_ac == {"ac": HAND_SPIKES * 3.0, "mac": 0.0, "dense": 4 * T * 8 * 3.0}
    both = count_synops(model, image)
    assert both["alternative"]["pooled_spikes"] == "ac" and both["alternative"]["ac"] == HAND_SPIKES * 3.0


def test_is_spike_tensor_follows_neurobench():
    assert is_spike_tensor(torch.tensor([0.0, 1.0, -1.0]))
    assert not is_spike_tensor(torch.tensor([0.0, 0.5]))


def test_energy_equals_macs_times_e_mac_plus_acs_times_e_ac():
    macs, acs = 1234.0, 56789.0
    assert ENERGY_PRESETS == {"fp32": (4.6, 0.9), "int32": (3.2, 0.1), "int8": (0.23, 0.03)}
    for name, (e_mac, e_ac) in ENERGY_PRESETS.items():
        assert energy_pj(macs, acs, name) == pytest.approx(macs * e_mac + acs * e_ac)
        assert energy_uj(macs, acs, name) == pytest.approx((macs * e_mac + acs * e_ac) * 1e-6)
    split = layer_energy_uj({"a": {"mac": 10.0, "ac": 100.0}}, "int32")
    assert split == {"a": {"mac": pytest.approx(32e-6), "ac": pytest.approx(10e-6)}}
    with pytest.raises(UserError, match="fp32"):
        energy_uj(1, 1, "fp16")


def test_sparse_format_costs():
    # 3 x 32 weights, 24 kept, 32-bit values: dense 3072, bitmap 96 + 768, csr 24*(32+5) + 4*5.
    assert sparse_format_bits((3, 32), 24, 32) == {"dense": 3072, "bitmap": 864, "csr": 908}
    assert sparse_format_bits((3, 32), 2, 32) == {"dense": 3072, "bitmap": 160, "csr": 74 + 4 * 2}


def test_footprint_of_quantized_sparse_model_matches_hand_count():
    model = two_layer_net()
    attach_quantizer(model, "features.0.weight", UniformQuantizer(4))
    mask = torch.zeros(3, 32, dtype=torch.bool)
    mask.view(-1)[:24] = True
    set_mask(model, "classifier.0.weight", mask)
    fp = footprint(model, neurons_per_layer={"features.1": 32})
    # conv: 18 values x 4 bits + one 32-bit scale = 104; LIF leak + threshold: 2 x 32 = 64;
    # linear: 24 of 96 kept, bitmap cheapest (864 bits, see test_sparse_format_costs).
    assert fp["by_kind"]["weight"] == 104 + 864
    assert fp["by_kind"]["neuron"] == 64
    assert fp["bits"] == 1032 and fp["bytes"] == 129
    assert fp["tensors"]["classifier.0.weight"]["format"] == "bitmap"
    assert fp["tensors"]["features.0.weight"]["format"] == "dense"
    with_state = footprint(model, include_state=True, state_bits=16, neurons_per_layer={"features.1": 32})
    assert with_state["bits"] == 1032 + 32 * 16 and with_state["bytes"] == 193
    dict(model.spiking_layers())["features.1"].state_quantizer = UniformQuantizer(8)
    assert footprint(model, include_state=True, neurons_per_layer={"features.1": 32})["bytes"] == 161


def test_footprint_of_dense_float_model_is_32_bits_per_value():
    model = build_model("resnet19", 5, (3, 8, 8), 2, width_mult=1 / 32)
    fp = footprint(model)
    floats = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
    assert fp["bits"] == 32 * floats and fp["format"] == "dense"
    assert fp["by_kind"]["norm"] > 0  # BatchNorm weight, bias, running stats


def test_noise_robustness_shares_noise_and_counts_accuracy():
    class Oracle(torch.nn.Module):  # predicts class 1 when the mean pixel is positive
        def forward(self, x):
            mean = x.flatten(1).mean(1)
            return torch.stack([-mean, mean], 1)

    images = torch.cat([torch.full((4, 1, 2, 2), 1.0), torch.full((4, 1, 2, 2), -1.0)])
    labels = torch.tensor([1] * 4 + [0] * 4)
    loader = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    accs = noise_robustness({"a": Oracle(), "b": Oracle()}, loader, (0.0, 100.0), max_images=6)
    assert accs["a"][sigma_key(0.0)] == 1.0
    assert accs["a"] == accs["b"]  # the same noisy images reach both models
    assert accs["a"][sigma_key(100.0)] < 1.0


def test_measure_model_returns_the_spec_metrics():
    torch.manual_seed(0)
    model = build_model("convnet", 4, (1, 8, 8), 3, features=[4, "A"], classifier=[8],
                        neuron={"threshold": 0.3})
    images, labels = torch.randn(24, 1, 8, 8), torch.randint(0, 4, (24,))
    loader = [(images[i:i + 8], labels[i:i + 8]) for i in range(0, 24, 8)]
    m = measure_model(model, loader, baseline_footprint=4096, build_plan=build_inference_plan, energy_preset="int8", noise_sigmas=(0.0, 0.2),
                      robustness_images=None, ops_images=16, latency_batch=2, latency_repeats=2)
    for key in ("accuracy", "timesteps", "params", "nonzero_params", "footprint_bytes", "spikes_per_image",
                "firing_rate", "synops", "energy_uj", "ann_energy_uj", "energy_preset", "latency_ms",
                "latency_batch", "robustness"):
        assert key in m, key
    assert m["timesteps"] == 3 and m["latency_batch"] == 2 and m["synops_images"] == 16
    assert m["robustness_images"] == 24 and set(m["robustness"]) == {"0.0", "0.2"}
    assert m["robustness"]["0.0"] == m["accuracy"] and m["robustness_ann"]["0.0"] == m["ann_accuracy"]
    e_mac, e_ac = ENERGY_PRESETS["int8"]
    assert m["energy_uj"] == pytest.approx((m["synops"]["mac"] * e_mac + m["synops"]["ac"] * e_ac) * 1e-6)
    assert m["ann_energy_uj"] == pytest.approx(m["ann_synops"]["mac"] * e_mac * 1e-6)
    assert m["params"] == sum(p.numel() for p in model.parameters())
    assert m["footprint_bytes"] == 32 * m["params"] // 8  # all float32 parameters, no buffers
    assert m["compression_ratio"] == pytest.approx(4096 / m["footprint_bytes"])
    assert set(m["firing_rate"]) == {"features.1", "classifier.1"}
    assert 0 < m["spikes_per_image"] and all(0 <= r <= 1 for r in m["firing_rate"].values())
    assert math.isfinite(m["latency_ms"]) and m["latency_ms"] > 0
    assert next(model.parameters()).device.type == "cpu" and model.spiking  # caller's model untouched


# --------------------------------------------------------------------------- trained ANN reference

def reference_ann():
    """A trained-ANN stand-in, wider than two_layer_net: conv 1->3 -> ReLU -> avgpool 2x2 -> linear 12->5
    -> ReLU -> linear 5->3, on 4x4 images, in ANN mode, seeded weights.

    Dense MACs per image, from the shapes (zero padding costs nothing, as in the SNN's count):
      features.0: 3 output channels x 100 in-bounds taps (4*4 + 8*6 + 4*9) = 300;
      classifier.0: 12 x 5 = 60; classifier.3: 5 x 3 = 15; total 375.
    """
    torch.manual_seed(3)
    return build_model("convnet", 3, (1, 4, 4), T, features=[3, "A"], classifier=[5]).set_spiking(False).eval()


REF_MACS = {"features.0": 300.0, "classifier.0": 60.0, "classifier.3": 15.0}
TWIN_DENSE = 200 + 32 * 3  # two_layer_net's ReLU twin: conv1 200 + linear 32x3, one pass


def reference_loader(reference, correct: int = 10, total: int = 16):
    """``total`` random 4x4 images in batches of 8, labelled so that ``reference`` gets exactly ``correct`` right."""
    images = torch.randn(total, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        predicted = reference(images).argmax(1)
    labels = torch.where(torch.arange(total) < correct, predicted, (predicted + 1) % 3)
    return [(images[i:i + 8], labels[i:i + 8]) for i in range(0, total, 8)]


MEASURE_OPTS = dict(build_plan=build_inference_plan, noise_sigmas=(0.0, 0.1, 0.5), robustness_images=None, ops_images=None, latency_repeats=1,
                    latency_warmup=0)


def test_measure_model_reports_the_trained_ann_beside_the_relu_twin():
    reference = reference_ann()
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    loader = reference_loader(reference)
    m = measure_model(two_layer_net(), loader, reference_ann=reference, **MEASURE_OPTS)
    e_mac = ENERGY_PRESETS["fp32"][0]
    # accuracy: 10 of 16 by construction of the labels, and what a direct evaluation gives
    with torch.no_grad():
        direct = sum(int((reference(x).argmax(1) == y).sum()) for x, y in loader) / 16
    assert m["trained_ann_accuracy"] == direct == 10 / 16
    # energy: the hand-counted dense MACs x 4.6 pJ
    assert m["trained_ann_synops"] == {"mac": 375.0, "dense": 375.0}
    assert m["trained_ann_energy_uj"] == pytest.approx(375 * e_mac * 1e-6)
    assert m["trained_ann_energy_per_layer_uj"] == {k: pytest.approx(v * e_mac * 1e-6) for k, v in REF_MACS.items()}
    assert m["energy_ratio_trained_ann"] == pytest.approx(375 * e_mac * 1e-6 / m["energy_uj"])
    # the ReLU twin keeps its own keys and numbers
    assert m["ann_synops"] == {"mac": TWIN_DENSE, "dense": TWIN_DENSE}
    assert m["ann_energy_uj"] == pytest.approx(TWIN_DENSE * e_mac * 1e-6)
    assert m["energy_ratio"] == pytest.approx(m["ann_energy_uj"] / m["energy_uj"])
    # robustness: one entry per sigma, on the same noisy images as the SNN
    assert list(m["robustness_trained_ann"]) == ["0.0", "0.1", "0.5"]
    assert m["robustness_trained_ann"]["0.0"] == 10 / 16
    assert m["robustness_trained_ann"] == noise_robustness({"ref": reference}, loader, (0.0, 0.1, 0.5))["ref"]
    # the caller's reference is neither changed nor switched out of ANN mode
    assert reference.spiking is False and not reference.training
    assert all(torch.equal(v, before[k]) for k, v in reference.state_dict().items())


def test_trained_ann_keys_absent_without_reference_and_snn_numbers_unchanged():
    reference = reference_ann()
    loader = reference_loader(reference)
    without = measure_model(two_layer_net(), loader, **MEASURE_OPTS)
    with_ref = measure_model(two_layer_net(), loader, reference_ann=reference, **MEASURE_OPTS)
    trained_keys = {"trained_ann_accuracy", "trained_ann_energy_uj", "trained_ann_energy_per_layer_uj",
                    "trained_ann_synops", "energy_ratio_trained_ann", "robustness_trained_ann"}
    assert not trained_keys & set(without)
    assert set(with_ref) - set(without) == trained_keys
    for key in ("accuracy", "ann_accuracy", "energy_uj", "ann_energy_uj", "energy_ratio", "robustness",
                "robustness_ann", "synops", "spikes_per_image"):
        assert with_ref[key] == without[key], key


def test_measure_model_accepts_a_trained_ann_for_an_int8_preset_and_rejects_an_snn_reference():
    reference = reference_ann()
    loader = reference_loader(reference, correct=4)
    m = measure_model(two_layer_net(), loader, reference_ann=reference, energy_preset="int8", **MEASURE_OPTS)
    assert m["trained_ann_accuracy"] == 4 / 16
    assert m["trained_ann_energy_uj"] == pytest.approx(375 * 0.23e-6)
    with pytest.raises(ValueError, match="ANN mode"):
        measure_model(two_layer_net(), loader, reference_ann=two_layer_net(), **MEASURE_OPTS)
