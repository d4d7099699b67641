"""NIR export and import (issue 16): the round trip is exact, the NIR fields hold the model, the discrete
mapping onto NIR's LIF ODE holds, snnTorch's own NIR importer fires the same spikes per layer, refusals are clear."""

from __future__ import annotations

import copy
import pickle
import sys

import numpy as np
import pytest
import torch

import nir  # a test dependency (pyproject's test extra)

from snncompress import build_model, load_checkpoint, save_checkpoint  # noqa: E402
from snncompress.cli import main  # noqa: E402
from snncompress.compress import (FixedPointQuantizer, attach_quantizer, get_masks, get_quantizers,  # noqa: E402
                                  quantize_weights, set_mask)
from snncompress.compress.quantizers import UniformQuantizer  # noqa: E402
from snncompress.compress.state import stored_tensors  # noqa: E402
from snncompress.compress.structure import channel_groups, narrow_model  # noqa: E402
from snncompress.deploy.nir import (DEFAULT_DT, export_nir, import_nir, layer_spike_counts, load_nir,  # noqa: E402
                                    snntorch_spike_counts, write_nir)
from snncompress.errors import UserError  # noqa: E402
from snncompress.neuron import lif_multistep  # noqa: E402
from snncompress.stages.base import Chain, StageContext  # noqa: E402
from snncompress.stages.export import ExportOptions, export  # noqa: E402

T = 3


def _excite(model, seed: int, leaks=(1.0, 0.8, 0.9, 0.7), per_channel_spread: bool = False):
    """Give every spiking layer spikes: set its leak, and its threshold (layer by layer, in order) to the 95th
    percentile of its input current on random images (times a random factor per channel when per channel).

    The first LIF keeps leak 1 (an IF node), the others leak below 1 (LIF nodes).
    """
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(4, *model.spec["in_shape"], generator=g)
    model.eval()
    with torch.no_grad():
        for i, (_, lif) in enumerate(model.spiking_layers()):
            leak = torch.full_like(lif.leak, leaks[i % len(leaks)])
            if per_channel_spread and lif.per_channel and i > 0:
                leak = 0.5 + 0.45 * torch.rand(leak.shape, generator=g)
            lif.leak.copy_(leak)
            seen = []
            hook = lif.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
            model(images)
            hook.remove()
            thr = torch.full_like(lif.threshold, float(torch.quantile(seen[0].flatten()[:100000], 0.95)))
            if per_channel_spread and lif.per_channel:
                thr = thr * (0.7 + 0.6 * torch.rand(thr.shape, generator=g))
            lif.threshold.copy_(thr.clamp(min=1e-2))
    return model


def _convnet(reset="soft", per_channel=False, seed=0, **options):
    torch.manual_seed(seed)
    model = build_model("convnet", 10, (1, 16, 16), T, features=[8, "A", 12, "A"], classifier=[16],
                        neuron={"reset": reset, "per_channel": per_channel}, **options)
    return _excite(model, seed, per_channel_spread=per_channel)


def _vgg(reset="soft", per_channel=False, seed=0, **options):
    torch.manual_seed(seed)
    model = build_model("vgg5", 10, (3, 16, 16), T, classifier=[48, 32],
                        neuron={"reset": reset, "per_channel": per_channel}, **options)
    return _excite(model, seed, per_channel_spread=per_channel)


MODELS = {"convnet": (_convnet, (1, 16, 16)), "vgg5": (_vgg, (3, 16, 16))}


def _images(shape, n=4, seed=1):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def _prune(model, seed=2):
    """Physically narrow every group to its even channels, mask half of classifier.0, quantize every weight
    to 5 bits and one threshold to Q(2.6): the compressed forms a checkpoint holds."""
    groups = channel_groups(model)
    narrow = narrow_model(model, {g.name: torch.arange(0, g.size, 2) for g in groups}, groups).eval()
    shape = narrow.classifier[0].weight.shape
    keep = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    set_mask(narrow, "classifier.0.weight", keep)
    _excite(narrow, seed, per_channel_spread=narrow.features[1].per_channel)  # thresholds for the narrow currents
    quantize_weights(narrow, 5)
    attach_quantizer(narrow, "features.1.threshold", FixedPointQuantizer(2, 6))
    return narrow.eval()


def _stored(model) -> dict:
    return {t.name: t.values for t in stored_tensors(model)}


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("arch", ["convnet", "vgg5"])
@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
@pytest.mark.parametrize("reset", ["soft", "hard"])
def test_round_trip_through_a_nir_file_gives_identical_outputs(tmp_path, arch, pruned, reset):
    build, shape = MODELS[arch]
    model = build(reset)
    if pruned:
        model = _prune(model)
    images = _images(shape)
    path = tmp_path / "model.nir"
    write_nir(model, path)
    back = load_nir(path)
    counts, logits = layer_spike_counts(model, images)
    counts_back, logits_back = layer_spike_counts(back, images)
    assert torch.equal(logits, logits_back)                       # bit for bit
    assert counts == counts_back
    assert all(c > 0 for c in counts.values()), counts             # every layer fires: the check is not vacuous
    assert back.spec == model.spec
    save_checkpoint(tmp_path / "model.safetensors", model)          # what the checkpoint stores, the file holds
    stored, stored_back = _stored(load_checkpoint(tmp_path / "model.safetensors").model), _stored(back)
    assert stored.keys() == stored_back.keys() and all(torch.equal(stored[k], stored_back[k]) for k in stored)
    assert get_masks(back).keys() == get_masks(model).keys()
    assert all(torch.equal(get_masks(back)[k], v) for k, v in get_masks(model).items())
    q, q_back = get_quantizers(model), get_quantizers(back)
    assert q.keys() == q_back.keys() and all(q[k].config() == q_back[k].config() and
                                             torch.equal(q[k].scale, q_back[k].scale) for k in q)
    graph = nir.read(str(path))
    first = graph.nodes["features.0"].weight.shape[0]
    full = 64 if arch == "vgg5" else 8
    assert first == (full // 2 if pruned else full)                  # narrowed shapes in the file
    assert graph.nodes["features.1"].metadata["reset"] == ("subtract" if reset == "soft" else "zero")


def test_nir_fields_hold_the_models_values():
    model = _prune(_convnet("hard"))
    graph = export_nir(model)
    dt = DEFAULT_DT
    assert [type(graph.nodes[n]).__name__ for n in graph.nodes] == [
        "Input", "Conv2d", "IF", "AvgPool2d", "Conv2d", "LIF", "AvgPool2d", "Flatten", "Linear", "LIF", "Linear",
        "Output"]
    assert graph.edges == list(zip(list(graph.nodes)[:-1], list(graph.nodes)[1:]))
    assert graph.metadata["dt"] == dt and graph.metadata["timesteps"] == T
    first = graph.nodes["features.1"]                                        # leak 1: IF, r = 1/dt
    np.testing.assert_allclose(first.r, 1 / dt, rtol=1e-7)
    assert first.r.shape == (4, 16, 16) and np.all(first.v_reset == 0)
    thr = float(model.features[1].threshold.detach())                                 # on the Q(2.6) grid: k / 64
    code = round(thr * 64)
    assert thr == code / 64 and np.all(first.v_threshold == np.float32(thr))
    assert first.metadata["threshold.codes"].tolist() == [code] and first.metadata["threshold.bits"] == 9
    lif = graph.nodes["features.4"]                                          # leak 0.8: tau = dt / 0.2, r = 5
    np.testing.assert_allclose(lif.tau, dt / (1 - np.float32(0.8)), rtol=1e-6)
    np.testing.assert_allclose(lif.r, 1 / (1 - np.float32(0.8)), rtol=1e-6)
    np.testing.assert_allclose(1 - dt / lif.tau.astype(np.float64), 0.8, atol=1e-6)
    assert np.all(lif.v_leak == 0) and np.all(lif.v_threshold == model.features[4].threshold.detach().numpy())
    assert lif.metadata["leak"].tolist() == [np.float32(0.8)]
    linear = graph.nodes["classifier.0"]                                     # masked + 5-bit weights
    weight = model.classifier[0].weight.detach().numpy()
    assert np.array_equal(linear.weight, weight)
    mask = linear.metadata["weight.mask"].astype(bool)
    assert np.all(linear.weight[~mask] == 0) and mask.sum() == get_masks(model)["classifier.0.weight"].sum()
    codes, scale = linear.metadata["weight.codes"], linear.metadata["weight.scale"]
    assert linear.metadata["weight.bits"] == 5 and np.abs(codes).max() == 15 and codes.dtype == np.int8
    assert np.array_equal(codes.astype(np.float32) * np.float32(scale), linear.weight)
    assert np.all(graph.nodes["features.0"].bias == 0)


def _euler(node, currents: np.ndarray, dt: float) -> np.ndarray:
    """NIR's neuron ODE, forward Euler with step dt, hard reset to v_reset; spike at v > v_threshold."""
    v = np.zeros(currents.shape[1:])
    spikes = []
    for current in currents:
        if isinstance(node, nir.IF):
            v = v + dt * node.r * current
        else:
            v = v + dt / node.tau.astype(np.float64) * (node.v_leak - v + node.r.astype(np.float64) * current)
        z = v > node.v_threshold
        v = np.where(z, node.v_reset, v)
        spikes.append(z)
    return np.stack(spikes).astype(np.float64)


@pytest.mark.parametrize("dt", [1e-4, 1e-3, 1.0])
def test_forward_euler_of_the_nir_nodes_reproduces_the_discrete_lif(dt):
    """The mapping tau = dt/(1-leak), r = 1/(1-leak) (IF: r = 1/dt) holds for any dt the consumer is told."""
    model = _convnet("hard", per_channel=True)
    graph = export_nir(model, dt=dt)
    g = torch.Generator().manual_seed(3)
    for name in ("features.1", "features.4", "classifier.1"):
        node, lif = graph.nodes[name], model.get_submodule(name)
        currents = 0.8 * torch.rand(20, *node.v_threshold.shape, generator=g, dtype=torch.float64)
        shape = (-1,) + (1,) * (currents.dim() - 2)
        ours = lif_multistep(currents.unsqueeze(1), lif.leak.detach().double().view(shape),
                             lif.threshold.detach().double().view(shape), reset="hard").squeeze(1)
        theirs = _euler(node, currents.numpy(), dt)
        assert ours.sum() > 10
        assert np.array_equal(ours.numpy(), theirs), name


def test_batchnorm_becomes_a_diagonal_conv_and_per_channel_parameters_round_trip(tmp_path):
    model = _vgg("soft", per_channel=True, batchnorm=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    write_nir(model, tmp_path / "bn.nir")
    back = load_nir(tmp_path / "bn.nir")
    images = _images((3, 16, 16))
    counts, logits = layer_spike_counts(model, images)
    assert torch.equal(logits, layer_spike_counts(back, images)[1]) and min(counts.values()) > 0
    graph = nir.read(str(tmp_path / "bn.nir"))
    node, bn = graph.nodes["features.1"], model.features[1]
    assert isinstance(node, nir.Conv2d) and node.weight.shape == (64, 64, 1, 1)
    assert np.count_nonzero(node.weight) == 64                               # diagonal
    conv = torch.nn.Conv2d(64, 64, 1)
    conv.weight.data, conv.bias.data = torch.from_numpy(node.weight), torch.from_numpy(node.bias)
    x = torch.randn(2, 64, 16, 16)
    torch.testing.assert_close(conv(x), bn(x), rtol=1e-5, atol=1e-5)      # the same affine map
    thr = graph.nodes["features.6"].v_threshold                              # per channel: one value per channel
    assert np.unique(thr).size == 128 and np.all(thr == thr[:, :1, :1])


# ----------------------------------------------------------------------------- another framework


def test_snntorch_nir_importer_fires_the_same_spikes_per_layer():
    """Load the exported graph with snnTorch's own NIR importer (snntorch.import_nir) and compare spikes per layer.

    Differences, each documented in the README ("Export to NIR") and checked here:
    - hard reset, leaks below 1 (scalar or per channel), one threshold per layer: every layer's spike count is
      equal, logits agree to float rounding (snnTorch runs conv1 at every step, batch 1, conv biases of zero);
    - soft reset: snnTorch's importer builds snn.Leaky(reset_mechanism="zero") (NIR's LIF resets to v_reset),
      so its counts differ; they equal this package's model with the reset switched to hard, layer by layer;
    - leak 1 exported as NIR IF (the default): snnTorch 1.0's importer asserts r == 1 and would use beta 0.9;
      leak_one="lif" (tau = 1e8 dt) runs exactly;
    - per-channel thresholds: snnTorch's importer takes one threshold per layer and refuses them.
    """
    pytest.importorskip("snntorch")
    images = _images((1, 16, 16), n=6)
    model = _convnet("hard")
    ours, logits = layer_spike_counts(model, images)
    theirs, logits_snntorch = snntorch_spike_counts(export_nir(model, leak_one="lif"), images, T)
    assert theirs == ours and min(ours.values()) > 0
    torch.testing.assert_close(logits_snntorch, logits, rtol=1e-5, atol=1e-5)

    with pytest.raises(AssertionError, match="r != 1"):                      # the default IF form
        snntorch_spike_counts(export_nir(model), images[:1], T)

    leaky = _convnet("hard", per_channel=True, seed=3)                       # per-channel leaks, one threshold
    with torch.no_grad():
        for _, lif in leaky.spiking_layers():
            lif.threshold.fill_(float(lif.threshold.mean()))
    ours, _ = layer_spike_counts(leaky, images)
    assert snntorch_spike_counts(export_nir(leaky, leak_one="lif"), images, T)[0] == ours

    soft = _convnet("soft")
    ours_soft, _ = layer_spike_counts(soft, images)
    theirs_soft, logits_soft = snntorch_spike_counts(export_nir(soft, leak_one="lif"), images, T)
    hard_twin = copy.deepcopy(soft)
    for _, lif in hard_twin.spiking_layers():
        lif.reset = "hard"
    ours_hard, logits_hard = layer_spike_counts(hard_twin, images)
    assert theirs_soft != ours_soft                                          # the reset differs ...
    assert theirs_soft == ours_hard                                          # ... and explains every difference
    torch.testing.assert_close(logits_soft, logits_hard, rtol=1e-5, atol=1e-5)

    with pytest.raises(AssertionError, match="v_threshold must be same for all neurons"):
        snntorch_spike_counts(export_nir(_convnet("hard", per_channel=True), leak_one="lif"), images[:1], T)


# ----------------------------------------------------------------------------- refusals


def test_what_nir_cannot_express_is_refused_with_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="resnet20 is not supported"):
        export_nir(build_model("resnet20", 10, (3, 16, 16), 2))
    with pytest.raises(UserError, match="ANN mode"):
        export_nir(_convnet().ann_twin())
    stateful = _convnet()
    stateful.features[1].state_quantizer = UniformQuantizer(8)
    with pytest.raises(UserError, match="membrane-state quantizer"):
        export_nir(stateful)
    with pytest.raises(UserError, match="soft reset"):
        export_nir(_convnet("soft"), soft_reset="refuse")
    export_nir(_convnet("hard"), soft_reset="refuse")                          # hard reset is exact
    mixed = _convnet("hard", per_channel=True)
    with torch.no_grad():
        mixed.features[4].leak[:3] = 1.0
    with pytest.raises(UserError, match="mix 1"):
        export_nir(mixed)
    write_nir(mixed, tmp_path / "mixed.nir", leak_one="lif")                   # tau = 1e8 dt: exact in float32
    images = _images((1, 16, 16))
    assert torch.equal(mixed(images), load_nir(tmp_path / "mixed.nir")(images))
    with pytest.raises(UserError, match="dt must be a positive"):
        export_nir(_convnet(), dt=0.0)


def test_foreign_damaged_or_edited_files_are_refused(tmp_path):
    foreign = nir.NIRGraph.from_list(nir.Linear(weight=np.ones((3, 4), np.float32)),
                                     nir.LIF(tau=np.ones(3, np.float32), r=np.ones(3, np.float32),
                                             v_leak=np.zeros(3, np.float32), v_threshold=np.ones(3, np.float32)))
    nir.write(str(tmp_path / "foreign.nir"), foreign)
    with pytest.raises(UserError, match="give --timesteps"):  # a foreign graph is imported as a graph network
        load_nir(tmp_path / "foreign.nir")
    assert load_nir(tmp_path / "foreign.nir", timesteps=2, dt=1.0, input_shape=(4,)).spec["family"] == "graph"
    (tmp_path / "evil.nir").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UserError, match="not a NIR file"):
        load_nir(tmp_path / "evil.nir")
    (tmp_path / "cut.nir").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(UserError, match="not a readable NIR graph"):
        load_nir(tmp_path / "cut.nir")
    with pytest.raises(UserError, match="not found"):
        load_nir(tmp_path / "missing.nir")
    graph = export_nir(_convnet())
    graph.nodes["features.0"].weight = graph.nodes["features.0"].weight[:4, :, :, :2]
    with pytest.raises(UserError, match="features.0"):
        import_nir(graph)
    graph = export_nir(_convnet())
    graph.nodes["features.4"].r = graph.nodes["features.4"].r * 2
    with pytest.raises(UserError, match="r != tau/dt"):
        import_nir(graph)
    graph = export_nir(_prune(_convnet()))
    graph.nodes["classifier.0"].weight = graph.nodes["classifier.0"].weight * 1.5
    with pytest.raises(UserError, match="codes"):
        import_nir(graph)


def test_missing_nir_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "nir", None)
    with pytest.raises(UserError, match="pip install"):
        export_nir(_convnet())


# ----------------------------------------------------------------------------- command and stage


def _one_line_error(capsys, args, fragment):
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("snncompress: error:") and fragment in err, err


def test_export_command_writes_nir_and_imports_it_back(tmp_path, capsys):
    model = _prune(_convnet("hard"))
    save_checkpoint(tmp_path / "model.safetensors", model)
    assert main(["export", str(tmp_path / "model.safetensors"), "--format", "nir",
                 "--out", str(tmp_path / "out" / "model.nir")]) == 0
    out = capsys.readouterr().out
    assert "NIR graph of convnet (2 Conv2d, 1 IF, 2 AvgPool2d, 2 LIF, 1 Flatten, 2 Linear), dt 0.0001, T 3" in out
    assert main(["export", str(tmp_path / "out" / "model.nir"), "--format", "safetensors",
                 "--out", str(tmp_path / "back.safetensors")]) == 0
    images = _images((1, 16, 16))
    assert torch.equal(load_checkpoint(tmp_path / "back.safetensors").model(images), model(images))
    before = sorted(p.name for p in tmp_path.iterdir())
    _one_line_error(capsys, ["export", tmp_path / "missing.safetensors", "--out", tmp_path / "x.nir"], "not found")
    _one_line_error(capsys, ["export", tmp_path / "model.safetensors", "--out", tmp_path / "out"], "is a folder")
    _one_line_error(capsys, ["export", tmp_path / "model.safetensors", "--out", tmp_path / "x.nir", "--dt", "-1"],
                    "dt must be a positive")
    save_checkpoint(tmp_path / "resnet.safetensors", build_model("resnet20", 10, (3, 8, 8), 2))
    _one_line_error(capsys, ["export", tmp_path / "resnet.safetensors", "--out", tmp_path / "r.nir"],
                    "not supported")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["resnet.safetensors"])


def test_export_stage_writes_model_nir_and_checks_its_round_trip(tmp_path):
    model = _convnet("soft")
    images = _images((1, 16, 16), n=8)
    stage_dir = tmp_path / "stages" / "03-export"
    ctx = StageContext(recipe=None, run_dir=tmp_path, stage_dir=stage_dir, device=torch.device("cpu"),
                       train_loader=None, val_loader=[(images, torch.zeros(8, dtype=torch.long))], test_loader=None,
                       info=None, model=model)
    result = export(ctx, ExportOptions(name="export"))
    assert result.model is None                                              # no new checkpoint
    assert result.metrics["nir_file"] == "stages/03-export/model.nir"
    assert result.metrics["nir_roundtrip_identical"] is True and result.metrics["nir_roundtrip_images"] == 8
    assert sorted(p.name for p in stage_dir.iterdir()) == ["model.nir"]
    assert torch.equal(load_nir(stage_dir / "model.nir")(images), model(images))
    assert ExportOptions(kind="export", name="export").follow(Chain(mode="snn")) == Chain(
        mode="snn", earlier=(("export", "snn"),))  # the model passes through unchanged
    with pytest.raises(ValueError, match="needs a spiking model"):
        ExportOptions(kind="export").follow(Chain(mode="ann", source="train_ann"))


def test_snncompress_load_opens_an_exported_nir_file_like_a_checkpoint(tmp_path):
    from snncompress import load

    model = _convnet(reset="hard")
    write_nir(model, tmp_path / "m.nir")
    images = _images(model.spec["in_shape"])
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "m.nir")(images), model.eval()(images))
