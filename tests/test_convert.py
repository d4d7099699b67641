"""Threshold calibration: layer by layer, in forward order, exact percentiles."""

import copy

import pytest
import torch

from snncompress import build_model, lif_multistep
from snncompress.convert import calibrate_thresholds


def _mlp():
    """Two spiking linear layers on 2x2 one-channel images: features [] -> classifier [3, 3]."""
    torch.manual_seed(0)
    model = build_model("convnet", 2, (1, 2, 2), 3, features=[], classifier=[3, 3], dropout=0.0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.uniform_(0.0, 1.0)
    return model


def test_calibration_sets_thresholds_layer_by_layer_in_order():
    model, images = _mlp(), torch.rand(5, 1, 2, 2)
    lif1, lif2 = model.classifier[1], model.classifier[4]
    seen_by_layer2 = []
    lif2.register_forward_pre_hook(lambda m, i: seen_by_layer2.append(lif1.threshold.item()))
    thresholds = calibrate_thresholds(model, images, calib_timesteps=6, percentile=100.0, scale=0.9)

    # Hand computation: layer 1 gets a constant current W1 x; its threshold is its max.
    w1, w2 = model.classifier[0].weight, model.classifier[3].weight
    current1 = images.flatten(1) @ w1.T
    thr1 = 0.9 * current1.max()
    # Layer 2 is calibrated with layer 1 already spiking at thr1 (leak 1, soft reset).
    spikes1 = lif_multistep(current1.expand(6, *current1.shape), torch.tensor(1.0), thr1)
    thr2 = 0.9 * (spikes1 @ w2.T).max()

    assert list(thresholds) == ["classifier.1", "classifier.4"]
    assert thresholds["classifier.1"] == pytest.approx(thr1.item(), rel=1e-6)
    assert thresholds["classifier.4"] == pytest.approx(thr2.item(), rel=1e-6)
    assert lif2.threshold.item() == pytest.approx(thr2.item(), rel=1e-6)
    assert seen_by_layer2 and all(v == pytest.approx(thr1.item()) for v in seen_by_layer2[-1:])
    assert model.timesteps == 3                      # restored after calibrating at T = 6


def test_percentile_is_exact_and_independent_of_chunking():
    model, images = _mlp(), torch.rand(40, 1, 2, 2)
    current1 = images.flatten(1) @ model.classifier[0].weight.T       # 120 values per step
    a = calibrate_thresholds(model, images, calib_timesteps=2, percentile=90.0, chunk=7)
    b = calibrate_thresholds(model, images, calib_timesteps=2, percentile=90.0, chunk=40)
    # nearest rank: the ceil(0.1 * 120) = 12th largest value
    expected = torch.sort(current1.flatten(), descending=True).values[11]
    assert a["classifier.1"] == pytest.approx(expected.item(), rel=1e-6)
    assert a == pytest.approx(b)


def test_rescale_batchnorm_makes_it_see_the_ann_scale():
    # conv 2 -> BN -> LIF, pool, conv 3 -> BN -> LIF, hidden linear 4 (no BN), output: conv 3 reads 0/1
    # spikes of layer 1, so calibration with rescale_batchnorm multiplies its weights by layer 1's threshold (its BatchNorm's
    # running mean stays in the ANN's units); conv 1 (images) and the linear layers (no BN) are untouched
    torch.manual_seed(0)
    model = build_model("convnet", 2, (1, 4, 4), 3, features=[2, "A", 3], classifier=[4], batchnorm=True,
                        dropout=0.0)
    with torch.no_grad():
        for bn in (model.features[1], model.features[5]):
            bn.running_mean.uniform_(-1.0, 1.0)
            bn.running_var.uniform_(0.5, 2.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith("weight")}
    images = torch.rand(6, 1, 4, 4)
    untouched = copy.deepcopy(model)
    calibrate_thresholds(untouched, images, calib_timesteps=5, percentile=100.0, scale=0.5)  # default: off
    assert all(torch.equal(a, before[n]) for n, a in untouched.named_parameters() if n.endswith("weight"))
    thresholds = calibrate_thresholds(model, images, calib_timesteps=5, percentile=100.0, scale=0.5,
                                      rescale_batchnorm=True)
    assert list(thresholds) == ["features.2", "features.6", "classifier.1"]
    after = dict(model.named_parameters())
    assert torch.equal(after["features.4.weight"], before["features.4.weight"] * thresholds["features.2"])
    for name in ("features.0.weight", "features.1.weight", "features.5.weight", "classifier.0.weight",
                 "classifier.3.weight"):
        assert torch.equal(after[name], before[name]), name


def test_networks_without_batchnorm_keep_their_weights():
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters() if p.dim() > 1]
    calibrate_thresholds(model, torch.rand(5, 1, 2, 2), calib_timesteps=4, percentile=99.0, scale=0.5,
                         rescale_batchnorm=True)
    assert all(torch.equal(a, b) for a, b in zip(before, [p for p in model.parameters() if p.dim() > 1],
                                                  strict=True))


def test_clip_floor_ann_rate_is_the_integrate_and_fire_spike_rate():
    """ann_levels = T: on a constant input an IF neuron with soft reset fires floor(T x / threshold) times
    in T steps (clamped to T), which is what the ANN twin's clip-floor activation outputs as a rate; the
    threshold receives a gradient through the straight-through floor."""
    from snncompress.neuron import LIF

    torch.manual_seed(0)
    lif = LIF(threshold=0.7, ann_levels=4, per_channel=True, num_channels=3)
    x = torch.randn(5, 3, 6, 6) * 1.5
    rate = lif.ann_rate(x)
    spikes = lif(x.unsqueeze(0).expand(4, *x.shape)).mean(0)
    assert torch.equal(rate, spikes)
    assert sorted(rate.unique().tolist()) == [0.0, 0.25, 0.5, 0.75, 1.0]
    rate.sum().backward()
    assert lif.threshold.grad is not None and (lif.threshold.grad < 0).all()  # a higher threshold lowers the rate


def test_a_clip_floor_ann_converts_with_kept_thresholds_to_t_times_its_logits():
    """One hidden layer (direct input is constant over t): the converted SNN's logits are exactly T times the
    clip-floor ANN's, with no calibration."""
    torch.manual_seed(1)
    model = build_model("convnet", 5, (1, 4, 4), 4, features=[], classifier=[12], dropout=0.0,
                        neuron={"ann_levels": 4, "threshold": 0.4}).eval()
    with torch.no_grad():
        model.classifier[0].weight.mul_(4.0)
    x = torch.randn(7, 1, 4, 4)
    with torch.no_grad():
        ann = model.set_spiking(False)(x)
        snn = model.set_spiking(True)(x)
    torch.testing.assert_close(snn, 4 * ann, rtol=0, atol=1e-5)
    hidden = model.classifier[1].ann_rate(model.classifier[0](x.flatten(1)))
    assert ann.abs().sum() > 0 and 0 < hidden.mean() < 1 and len(hidden.unique()) >= 3  # several rate levels
