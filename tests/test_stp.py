"""STP: PCA significance, channel surgery, temporal pruning, weight quantization sweep (docs/methods/stp.md)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from torch import nn

from snncompress.checkpoint import load_checkpoint, save_checkpoint
from snncompress.errors import UserError
from snncompress.models import build_model
from snncompress.neuron import LIF
from snncompress.compress import get_quantizers, quantize_weights
from snncompress.compress.pca import (as_samples, explained_variance_ratio, pca_significance,
                                             significant_dimension)
from snncompress.compress.structure import (channel_groups, group_widths, narrow_model, projection_conflicts,
                                            select_channels)
from snncompress.compress.temporal import check_schedule, default_schedule, prune_timesteps
from snncompress.stages.quant import QuantSweepOptions, smallest_within
from snncompress.stages.stp import TemporalOptions

# ----------------------------------------------------------------------------- PCA


def _rank_r_samples(n: int, channels: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.linalg.qr(torch.randn(channels, rank, generator=g))[0].T  # orthonormal rows [rank, C]
    factors = torch.randn(n, rank, generator=g) * torch.linspace(3.0, 1.0, rank)
    return factors @ mixing + torch.randn(channels, generator=g) * 5.0  # + an offset centring removes


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_pca_picks_the_rank_of_rank_deficient_data(rank):
    samples = _rank_r_samples(500, 12, rank)
    ratios = explained_variance_ratio(samples)
    assert ratios.sum().item() == pytest.approx(1.0)
    assert torch.all(ratios[:-1] >= ratios[1:])                 # descending
    assert ratios[rank:].sum().item() < 1e-10                   # nothing beyond the rank
    assert significant_dimension(ratios, 1.0) == rank
    assert significant_dimension(ratios, 0.999999) == rank


def test_pca_theta_counts_components_of_known_variances():
    # independent columns with variances 8, 4, 2, 1, 1 (total 16): cumulative 0.5, 0.75, 0.875, 0.9375, 1
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 5, generator=g, dtype=torch.float64)
    x = torch.linalg.qr(x - x.mean(0))[0] * torch.tensor([8.0, 4, 2, 1, 1], dtype=torch.float64).sqrt()
    ratios = explained_variance_ratio(x)
    torch.testing.assert_close(ratios.float(), torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625]))
    assert [significant_dimension(ratios, t) for t in (0.5, 0.7, 0.8, 0.9, 0.99)] == [1, 2, 3, 4, 5]


def test_conv_potential_becomes_pixels_by_channels():
    u = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    samples = as_samples(u)
    assert samples.shape == (8, 3)
    torch.testing.assert_close(samples[5], u[1, :, 0, 1])        # image 1, pixel (0, 1)
    assert as_samples(torch.zeros(4, 7)).shape == (4, 7)


def test_layer_pca_of_a_network_finds_the_rank_of_its_weights():
    """A linear layer with a rank-3 weight and no spikes (huge threshold): mean_t u = (T+1)/2 * W x has rank 3."""
    torch.manual_seed(0)
    model = build_model("convnet", 4, (1, 4, 4), 3, features=[], classifier=[10], dropout=0.0,
                        neuron={"threshold": 1e6})
    with torch.no_grad():
        model.classifier[0].weight.copy_(torch.randn(10, 3) @ torch.randn(3, 16))
    pca = pca_significance(model, torch.randn(200, 1, 4, 4), theta=0.999999, chunk=64)
    assert list(pca) == ["classifier.1"]
    assert pca["classifier.1"].k == 3
    # sum over t instead of mean scales the potential, not its rank
    assert pca_significance(model, torch.randn(50, 1, 4, 4), 0.999999, accumulate="sum")["classifier.1"].k == 3
    assert not model.classifier[1]._forward_hooks  # the recorder's hooks are gone


def test_significance_ranks_the_channels_that_carry_variance():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1000, 6, generator=g) * torch.tensor([0.01, 5.0, 0.01, 3.0, 0.01, 0.01])
    from snncompress.compress.pca import Scatter, layer_pca

    scatter = Scatter(6)
    for part in x.split(300):                                     # streaming == one shot
        scatter.add(part)
    pca = layer_pca(scatter, theta=0.99)
    assert pca.k == 2
    assert set(torch.topk(pca.significance, 2).indices.tolist()) == {1, 3}


# ----------------------------------------------------------------------------- surgery


def _randomise_(model: nn.Module, seed: int = 0) -> None:
    """Random BN statistics/affine, per-channel leaks/thresholds and linear weights that make spikes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            elif isinstance(m, nn.Linear):  # DIET's N(0, 0.01) would leave the hidden layers silent
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 4.0 / m.in_features ** 0.5)
            elif isinstance(m, LIF):
                m.leak.copy_(torch.rand(m.leak.shape, generator=g) * 0.5 + 0.5)
                m.threshold.copy_(torch.rand(m.threshold.shape, generator=g) * 0.3 + 0.1)


def _silence_removed_channels_(model: nn.Module, groups, keep) -> None:
    """Zero everything that produces a removed channel, so it never carries a signal (u = 0, no spike)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for g in groups:
            removed = torch.tensor([c for c in range(g.size) if c not in set(keep[g.name].tolist())], dtype=torch.long)
            for name in g.outputs:
                m = modules[name]
                if isinstance(m, nn.Conv2d | nn.Linear):
                    m.weight[removed] = 0.0
                elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                    m.bias[removed] = 0.0
                    m.running_mean[removed] = 0.0


def _random_keep(groups, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for group in groups:
        n = max(1, group.size // 2)
        keep[group.name] = torch.sort(torch.randperm(group.size, generator=g)[:n]).values
    return keep


def _respect_projections(model, groups, keep):
    """Narrow stride-1 projection blocks' outputs so that in != out (else the rebuilt block would use identity)."""
    for a, b in projection_conflicts(model, groups):
        if keep[a].numel() == keep[b].numel():
            keep[b] = keep[b][:-1] if keep[b].numel() > 1 else torch.arange(2)
    return keep


def _assert_narrow_reproduces(model, images):
    model = model.double().eval()
    _randomise_(model)
    groups = channel_groups(model)
    keep = _respect_projections(model, groups, _random_keep(groups))
    _silence_removed_channels_(model, groups, keep)
    narrow = narrow_model(model, keep, groups).eval()
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        dense_out, narrow_out = model(images), narrow(images)
        assert dense_out.abs().sum() > 0
        torch.testing.assert_close(narrow_out, dense_out, rtol=1e-12, atol=1e-12)
        model.set_spiking(False)
        narrow.set_spiking(False)
        torch.testing.assert_close(narrow(images), model(images), rtol=1e-12, atol=1e-12)
    return model, narrow, groups, keep


def test_narrow_vgg_reproduces_the_dense_model_when_removed_channels_are_silent():
    torch.manual_seed(0)
    model = build_model("vgg5", 10, (3, 8, 8), 3, features=[6, "A", 8, 8, "A"], classifier=[12, 10],
                        batchnorm=True, dropout=0.0, neuron={"per_channel": True})
    images = torch.randn(4, 3, 8, 8, dtype=torch.float64) * 3
    model, narrow, groups, keep = _assert_narrow_reproduces(model, images)
    assert [g.name for g in groups] == ["features.0", "features.4", "features.7", "classifier.0", "classifier.3"]
    assert narrow.spec["features"] == [3, "A", 4, 4, "A"] and narrow.spec["classifier"] == [6, 5]
    # the flatten: the first linear layer keeps the 2x2 columns of each kept channel
    assert narrow.classifier[0].weight.shape == (6, 4 * 2 * 2)


def test_per_channel_neuron_and_bn_parameters_follow_their_channels():
    torch.manual_seed(0)
    model = build_model("convnet", 10, (1, 8, 8), 2, features=[6, "A"], classifier=[5], batchnorm=True,
                        neuron={"per_channel": True})
    _randomise_(model)
    groups = channel_groups(model)
    keep = {"features.0": torch.tensor([1, 4, 5]), "classifier.0": torch.tensor([0, 3])}
    narrow = narrow_model(model, keep, groups)
    torch.testing.assert_close(narrow.features[2].threshold, model.features[2].threshold[[1, 4, 5]])
    torch.testing.assert_close(narrow.features[2].leak, model.features[2].leak[[1, 4, 5]])
    torch.testing.assert_close(narrow.features[1].running_var, model.features[1].running_var[[1, 4, 5]])
    torch.testing.assert_close(narrow.features[1].weight, model.features[1].weight[[1, 4, 5]])
    torch.testing.assert_close(narrow.classifier[1].threshold, model.classifier[1].threshold[[0, 3]])
    torch.testing.assert_close(narrow.features[0].weight, model.features[0].weight[[1, 4, 5]])
    cols = torch.cat([torch.arange(c * 16, c * 16 + 16) for c in (1, 4, 5)])
    torch.testing.assert_close(narrow.classifier[0].weight, model.classifier[0].weight[[0, 3]][:, cols])
    torch.testing.assert_close(narrow.classifier[3].weight, model.classifier[3].weight[:, [0, 3]])


@pytest.mark.parametrize("arch", ["resnet20", "resnet19"])
def test_narrow_resnet_reproduces_the_dense_model_when_removed_channels_are_silent(arch):
    torch.manual_seed(0)
    model = build_model(arch, 10, (3, 8, 8), 2, width_mult=1 / 16, batchnorm=True, dropout=0.0,
                        neuron={"per_channel": True})
    images = torch.randn(3, 3, 8, 8, dtype=torch.float64) * 3
    model, narrow, groups, keep = _assert_narrow_reproduces(model, images)
    # identity shortcuts keep their blocks' in == out; the rebuilt spec is consistent block to block
    blocks = narrow.spec["blocks"]
    for prev, block in zip(blocks, blocks[1:]):
        assert block["in"] == prev["out"]
    for b, (old, new) in enumerate(zip(model.blocks, narrow.blocks)):
        assert bool(len(old.shortcut)) == bool(len(new.shortcut)), f"block {b} changed its shortcut kind"


def test_resnet_coupled_channels_get_one_width_the_max_of_the_group():
    model = build_model("resnet20", 10, (3, 8, 8), 2, width_mult=1 / 16)
    groups = channel_groups(model)
    by_name = {g.name: g for g in groups}
    tied = by_name["blocks.2.out"]                               # stride-2 projection, then block 3 (identity)
    assert tied.lifs == ["blocks.2.lif2", "blocks.3.lif2"]
    assert ("blocks", 3, "in") in tied.spec_paths and ("blocks", 4, "in") in tied.spec_paths
    k = {name: 1 for g in groups for name in g.lifs}
    k.update({"blocks.2.lif2": 3, "blocks.3.lif2": 5})
    widths = group_widths(groups, k, conflicts=projection_conflicts(model, groups))
    assert widths["blocks.2.out"] == 5
    # block 0 is a stride-1 projection (stem 4 -> 8): in and out must not come out equal
    assert projection_conflicts(model, groups) == [("stem.6", "blocks.0.out")]
    assert widths["stem.6"] != widths["blocks.0.out"]


def test_select_channels_keeps_the_most_significant_of_a_group():
    model = build_model("resnet20", 10, (3, 8, 8), 2, width_mult=1 / 16)
    groups = [g for g in channel_groups(model) if g.name == "blocks.0.out"]
    sig = {"blocks.0.lif2": torch.tensor([0, 9, 0, 0, 0, 0, 1, 0.]),
           "blocks.1.lif2": torch.tensor([0, 0, 0, 5, 0, 0, 5, 0.])}
    keep = select_channels(groups, {"blocks.0.out": 2}, sig)
    assert keep["blocks.0.out"].tolist() == [1, 6]               # 0.9 + 0 vs 0.1 + 0.5 vs 0 + 0.5


# ----------------------------------------------------------------------------- temporal


def test_default_schedule_and_validation():
    assert default_schedule(4) == [3, 2, 1]
    assert default_schedule(25) == [15, 9, 5, 3, 2, 1]
    assert default_schedule(1) == []
    assert check_schedule([25, 15, 10, 5, 3, 2, 1], 25) == [15, 10, 5, 3, 2, 1]
    with pytest.raises(ValueError, match="decreasing"):
        check_schedule([3, 3, 1], 4)
    with pytest.raises(Exception, match="decreasing"):
        TemporalOptions(schedule=[2, 3])
    assert TemporalOptions(schedule=[3, 2, 1], step_epochs=[1, 1, 3]).epochs_by_timesteps([3, 2, 1]) == {3: 1, 2: 1, 1: 3}
    assert TemporalOptions(epochs=2).epochs_by_timesteps([3, 1]) == {3: 2, 1: 2}
    with pytest.raises(Exception, match="one entry per schedule entry"):
        TemporalOptions(schedule=[2, 1], step_epochs=[1])


def test_temporal_finetuning_decays_its_learning_rate():
    """The timestep ``schedule`` of the temporal stage must not leak into the lr schedule."""
    config = TemporalOptions(schedule=[3, 2, 1], lr=5e-4).train_config(0)
    assert config.lr_schedule == "cosine" and config.lr == 5e-4
    assert TemporalOptions(schedule=[2, 1], lr_schedule="constant").train_config(0).lr_schedule == "constant"
    from snncompress.training import TrainConfig, train

    with pytest.raises(ValueError, match="lr_schedule"):
        train(build_model("convnet", 10, (1, 8, 8), 1), [], [], TrainConfig(lr_schedule=[2, 1]))


def test_distillation_loss_blends_cross_entropy_and_teacher_kl():
    import torch.nn.functional as F

    from snncompress.training import Distillation

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    labels = torch.tensor([0, 1])
    ce = F.cross_entropy(logits, labels)

    class Fixed(nn.Module):
        def __init__(self, out):
            super().__init__()
            self.out = out

        def forward(self, x):
            return self.out

    def loss_with(teacher_logits, weight):
        student = SimpleNamespace(model=nn.Identity())                      # an ANN student: no rescaling
        return Distillation(Fixed(teacher_logits), weight, 2.0).loss(student, None, labels, logits, ce)

    assert torch.equal(loss_with(logits * 3, 0.0), ce)                    # weight 0: CE only
    assert torch.allclose(loss_with(logits.clone(), 0.5), 0.5 * ce)        # same logits: KL 0
    teacher = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    p = F.softmax(teacher / 2, 1)
    kl = (p * (p.log() - F.log_softmax(logits / 2, 1))).sum(1).mean() * 4
    assert torch.allclose(loss_with(teacher, 0.5), 0.5 * ce + 0.5 * kl)
    # a T = 4 teacher's summed logits are compared with a T = 1 student's per timestep
    big = build_model("convnet", 3, (1, 4, 4), 4, features=[], classifier=[3], dropout=0.0).eval()
    small = build_model("convnet", 3, (1, 4, 4), 1, features=[], classifier=[3], dropout=0.0)
    x = torch.randn(2, 1, 4, 4)
    assert torch.allclose(Distillation(big, 0.5).teacher_logits(small, x), big(x) / 4)
    # an ANN teacher (train_snn's distill: the converted ANN) counts as one timestep of a T = 4 student
    ann = big.ann_twin().eval()
    assert torch.allclose(Distillation(ann, 0.5).teacher_logits(big, x), ann(x) * 4)


def test_temporal_schedule_stops_at_the_tolerance():
    model = build_model("convnet", 10, (1, 8, 8), 4, features=[4, "A"], classifier=[6])
    accuracy_at = {3: 0.905, 2: 0.89, 1: 0.86}                   # start 0.90, tolerance 0.02 -> T=1 fails
    seen = []

    def finetune(candidate):
        seen.append(candidate.timesteps)
        with torch.no_grad():
            candidate.classifier[0].weight.fill_(candidate.timesteps)  # mark the weights of each step
        return accuracy_at[candidate.timesteps]

    final, trials = prune_timesteps(model, [4, 3, 2, 1], finetune, start_accuracy=0.90, tolerance=0.02)
    assert seen == [3, 2, 1]
    assert [(t.timesteps, t.accepted) for t in trials] == [(3, True), (2, True), (1, False)]
    assert final.timesteps == 2 and torch.all(final.classifier[0].weight == 2)
    assert model.timesteps == 4                                   # the input model is untouched

    final, trials = prune_timesteps(model, [3, 2], lambda m: 0.5, start_accuracy=0.9, tolerance=0.01)
    assert final is model and len(trials) == 1 and not trials[0].accepted


# ----------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_uniform_quantization_uses_max_abs_over_qmax_and_rounds_to_nearest(bits):
    model = build_model("convnet", 10, (1, 8, 8), 2, features=[4, "A"], classifier=[6]).eval()
    quantizer = quantize_weights(model, bits)["features.0.weight"]
    w = model.features[0].parametrizations.weight.original.detach()
    codes, scale = quantizer.export(w)
    q_max = 2 ** (bits - 1) - 1
    assert scale.dtype == torch.float32 and scale.dim() == 0
    assert scale.item() == pytest.approx(w.abs().max().item() / q_max, rel=1e-6)
    assert codes.abs().max().item() == q_max                        # the largest weight hits the top code
    assert (model.features[0].weight - w).abs().max().item() <= scale.item() / 2 + 1e-7
    assert torch.equal(model.features[0].weight, codes.float() * scale)


def test_quantized_checkpoint_stores_packed_codes_and_reloads_to_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_model("convnet", 10, (1, 8, 8), 3, features=[4, "A"], classifier=[6]).eval()
    quantizers = quantize_weights(model, 5)
    assert sorted(quantizers) == ["classifier.0.weight", "classifier.3.weight", "features.0.weight"]
    path = tmp_path / "q.safetensors"
    save_checkpoint(path, model)
    with safe_open(str(path), framework="pt") as f:
        codes = f.get_tensor("features.0.weight@codes")
        assert codes.dtype == torch.uint8 and codes.numel() == (4 * 9 * 5 + 7) // 8   # 5 bits per weight
        assert f.get_tensor("features.0.weight@scale").numel() == 1
        assert "features.0.weight" not in f.keys()
    loaded = load_checkpoint(path)
    images = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.model(images), model(images))
    assert get_quantizers(loaded.model)["classifier.0.weight"].bits == 5


def test_sweep_picks_the_smallest_bit_width_within_tolerance():
    results = {8: 0.90, 6: 0.895, 4: 0.885, 3: 0.85, 2: 0.30}
    assert smallest_within(results, reference=0.90, tolerance=0.01) == 6
    assert smallest_within(results, reference=0.90, tolerance=0.02) == 4
    assert smallest_within(results, reference=0.99, tolerance=0.01) is None
    assert QuantSweepOptions(bits=[2, 8, 4, 8]).bits == [8, 4, 2]
    with pytest.raises(Exception, match=r"\[2, 16\]"):
        QuantSweepOptions(bits=[1, 8])


# ----------------------------------------------------------------------------- stages in a recipe

STP_RECIPE = """
name: stp-tiny
seed: 0
device: cpu
data: {dataset: mnist-builtin, batch_size: 32, train_subset: 256, test_subset: 64}
model:
  arch: convnet
  timesteps: 3
  options: {features: [6, A], classifier: [12]}
stages:
  - {kind: train_ann, epochs: 1, lr: 2.0e-3, max_batches: 3}
  - {kind: convert, calib_images: 32, calib_timesteps: 4}
  - {kind: train_snn, epochs: 1, max_batches: 2}
  - {kind: prune_pca, name: pca-finetune, mode: finetune, theta: 0.9, pca_images: 32, epochs: 1, max_batches: 2}
  - {kind: prune_pca, name: pca-scratch, mode: scratch, theta: 0.99, pca_images: 32, epochs: 1, max_batches: 2,
     ann_epochs: 1, calib_images: 32, calib_timesteps: 4}
  - {kind: temporal, schedule: [2, 1], tolerance: 1.0, epochs: 1, max_batches: 2, distill: 0.5}
  - {kind: quant_sweep, bits: [8, 4, 2], tolerance: 0.05}
measure: {robustness_images: 32, ops_images: 32, latency_repeats: 2, noise_sigmas: [0.0]}
"""


def test_stp_stages_run_in_a_recipe(tmp_path):
    """Both prune_pca modes (finetune, then scratch on the narrowed model), temporal, quant_sweep."""
    from snncompress.pipeline import run_recipe

    recipe = tmp_path / "stp.yaml"
    recipe.write_text(STP_RECIPE)
    report = run_recipe(recipe, tmp_path / "run")
    stages = {s["name"]: s["metrics"] for s in report["stages"]}
    first, second = stages["pca-finetune"], stages["pca-scratch"]
    assert first["mode"] == "finetune" and second["mode"] == "scratch"
    assert set(first["layer_k"]) == {"features.1", "classifier.1"}
    assert first["group_widths"] == {"features.0": first["layer_k"]["features.1"],
                                     "classifier.0": first["layer_k"]["classifier.1"]}
    assert second["group_sizes"] == first["group_widths"]          # scratch starts from the narrowed spec
    assert second["params"] <= first["params"] < stages["train_snn"]["params"]
    assert (tmp_path / "run" / first["variance_plot"]).is_file()
    assert stages["temporal"]["final_timesteps"] == 1 and stages["temporal"]["timesteps"] == 1
    sweep = stages["quant_sweep"]
    assert set(sweep["sweep"]) == {"8", "4", "2"} and sweep["bits"] in (8, 4, 2)
    final = load_checkpoint(tmp_path / "run" / report["final"]["checkpoint"])
    assert final.model.timesteps == 1 and final.model.spec["features"] == [second["group_widths"]["features.0"], "A"]
    assert {q.bits for q in get_quantizers(final.model).values()} == {sweep["bits"]}
    assert report["final"]["footprint_bytes"] < report["baseline"]["footprint_bytes"]
    assert json.loads((tmp_path / "run" / "report.json").read_text())["final"]["timesteps"] == 1


def test_bad_stp_option_is_one_clear_user_error(tmp_path):
    from snncompress.pipeline import run_recipe

    recipe = tmp_path / "bad.yaml"
    recipe.write_text(STP_RECIPE.replace("theta: 0.9,", "theta: 1.5,"))
    with pytest.raises(UserError, match=r"stages\[3\] \(prune_pca\): theta"):
        run_recipe(recipe, tmp_path / "run")


def _first_threshold(run_dir) -> float:
    model = load_checkpoint(run_dir / "stages" / "03-prune_pca" / "model.safetensors").model
    return next(lif for _, lif in model.spiking_layers()).threshold.item()


def test_finetune_recalibrate_sets_narrow_thresholds_from_calibration(tmp_path):
    """recalibrate: the first layer's threshold is calib_scale x its input percentile (layer 1 has no
    upstream thresholds, so halving the scale halves it exactly); without it the inherited one stays."""
    from snncompress.pipeline import run_recipe

    head = STP_RECIPE.split("  - {kind: prune_pca")[0]
    pca = "  - {kind: prune_pca, mode: finetune, theta: 0.9, pca_images: 32, epochs: 0%s}\n"
    tail = "measure: {robustness_images: 32, ops_images: 32, latency_repeats: 2, noise_sigmas: [0.0]}\n"
    thresholds = {}
    for label, extra in {"inherit": "", "s1": ", recalibrate: true, calib_images: 32, calib_timesteps: 4",
                         "s05": ", recalibrate: true, calib_images: 32, calib_timesteps: 4, calib_scale: 0.5"}.items():
        recipe = tmp_path / f"{label}.yaml"
        recipe.write_text(head + pca % extra + tail)
        run_recipe(recipe, tmp_path / label)
        thresholds[label] = _first_threshold(tmp_path / label)
    inherited = load_checkpoint(tmp_path / "inherit" / "stages" / "02-train_snn" / "model.safetensors").model
    assert thresholds["inherit"] == next(lif for _, lif in inherited.spiking_layers()).threshold.item()
    assert thresholds["s1"] != thresholds["inherit"]
    assert thresholds["s05"] == pytest.approx(0.5 * thresholds["s1"], rel=1e-6)


def test_finetune_distills_from_the_unpruned_model(tmp_path, monkeypatch):
    """distill: the narrow model's fine-tuning gets a Distillation callback whose teacher is the wide
    train_snn model (same parameter count), with the recipe's weight; without distill it gets none."""
    from snncompress.pipeline import run_recipe
    from snncompress.training import callbacks

    teachers = []
    original = callbacks.Distillation.__init__

    def record(self, teacher, weight, temperature=2.0):
        teachers.append((sum(p.numel() for p in teacher.parameters()), weight))
        original(self, teacher, weight, temperature)

    monkeypatch.setattr(callbacks.Distillation, "__init__", record)
    head = STP_RECIPE.split("  - {kind: prune_pca")[0]
    pca = "  - {kind: prune_pca, mode: finetune, theta: 0.9, pca_images: 32, epochs: 1, max_batches: 2%s}\n"
    tail = "measure: {robustness_images: 32, ops_images: 32, latency_repeats: 2, noise_sigmas: [0.0]}\n"
    for label, extra in {"plain": "", "distilled": ", distill: 0.25"}.items():
        (tmp_path / f"{label}.yaml").write_text(head + pca % extra + tail)
        report = run_recipe(tmp_path / f"{label}.yaml", tmp_path / label)
    stages = {s["name"]: s["metrics"] for s in report["stages"]}
    assert teachers == [(stages["train_snn"]["params"], 0.25)]
    assert stages["prune_pca"]["params"] < stages["train_snn"]["params"]


class _ReadForbidden:
    """A loader that fails the test when anything iterates it."""

    def __iter__(self):
        raise AssertionError("a stage read the test split")

    def __len__(self):
        raise AssertionError("a stage read the test split")


def test_selection_stages_never_read_the_test_split(tmp_path):
    """Every stage (PCA widths, temporal T, bit width) gets a test loader that raises; only the pipeline's
    reporting reads the test split, and the report still carries test and validation accuracy."""
    from snncompress.pipeline import Run

    class GuardedRun(Run):
        def context(self, model, stage_dir, previous=None, seed=None):
            ctx = super().context(model, stage_dir, previous, seed)
            if stage_dir != self.out:                       # a stage, not the final measurement
                ctx.test_loader = _ReadForbidden()
            return ctx

    recipe = tmp_path / "stp.yaml"
    recipe.write_text(STP_RECIPE)
    report = GuardedRun(recipe, tmp_path / "run").execute()
    for stage in report["stages"]:
        if stage["metrics"].get("checkpoint"):
            assert 0 <= stage["metrics"]["accuracy"] <= 1 and 0 <= stage["metrics"]["val_accuracy"] <= 1
    trials = {s["name"]: s["metrics"] for s in report["stages"]}["temporal"]["trials"]
    assert [t["timesteps"] for t in trials] == [2, 1] and all("val_accuracy" in t for t in trials)


def test_validation_split_is_seeded_stratified_and_disjoint_from_training():
    from snncompress.data import hold_out_validation, load_data

    train, _, _ = load_data("mnist-builtin", batch_size=64, train_subset=1000)
    kept, val = hold_out_validation(train, 0.1, seed=3, batch_size=128)
    kept_again, val_again = hold_out_validation(train, 0.1, seed=3, batch_size=128)
    assert len(val.labels) == 100 and len(kept.labels) == 900
    assert torch.equal(val.labels, val_again.labels) and torch.equal(val.images, val_again.images)
    assert torch.bincount(val.labels, minlength=10).tolist() == [10] * 10     # the subset is balanced: 100/class
    other = hold_out_validation(train, 0.1, seed=4, batch_size=128)[1]
    assert not torch.equal(val.images, other.images)
    flat = lambda x: {bytes(img.numpy()) for img in x}                          # noqa: E731
    assert not flat(val.images) & flat(kept.images)
    assert not val.shuffle and not val.augment and kept.shuffle
