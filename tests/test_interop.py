"""Bring your own SNN (issue 26): NIR graphs from snnTorch, Norse, Sinabs and Rockpool become graph networks
that fire the framework's own spikes per layer and timestep (or a stated, tested difference), survive the
checkpoint, and go back compressed to the framework with the same predictions."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch

import nir  # a test dependency (pyproject's test extra)

from snncompress import load_checkpoint, save_checkpoint
from snncompress.cli import main
from snncompress.compress import quantize_weights, set_mask
from snncompress.deploy.nir import export_nir, load_nir, write_nir
from snncompress.deploy.nir.graph import import_graph
from snncompress.deploy.nir.mapping import make_node
from snncompress.errors import UserError
from snncompress.models import GraphNetwork

T = 6


def graph_spikes(model: GraphNetwork, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``({graph node name: spikes [T, B, ...]}, logits [B, K])`` of ``model`` on the sequence ``x`` [T, B, ...]."""
    names = model.node_names()
    found, hooks = {}, []
    for qualified, module in model.named_modules():
        if qualified in names and type(module).__name__ == "NeuronLIF":
            hooks.append(module.register_forward_hook(
                lambda m, i, o, n=names[qualified]: found.__setitem__(n, o.detach().clone())))
    try:
        with torch.no_grad():
            logits = model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return found, logits


def assert_same_spikes(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """The same spiking layers, each firing (and not everywhere), with equal spikes at every step."""
    assert set(ours) == set(theirs)
    for name in theirs:
        assert ours[name].sum() > 0 and (ours[name] == 0).any(), name
        assert torch.equal(ours[name], theirs[name]), name


def _compress(model: GraphNetwork, bits: int = 4) -> GraphNetwork:
    """Narrow every channel group by its last channel (channel surgery), prune half of every conv/linear weight
    by magnitude (masks) and quantize the weights to ``bits``."""
    from snncompress.compress.structure import narrow_model

    groups = model.channel_groups()
    model = narrow_model(model, {g.name: torch.arange(g.size - 1) for g in groups}, groups) if groups else \
        copy.deepcopy(model)
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
            w = module.weight.detach()
            set_mask(model, f"{name}.weight", w.abs() >= w.abs().flatten().median())
    quantize_weights(model, bits)
    return model.eval()


# ----------------------------------------------------------------------------- snnTorch

def _snn():
    """snnTorch, or a skip saying it is not installed."""
    return pytest.importorskip("snntorch", reason="snnTorch is not installed (pip install snntorch)")


def _snntorch_conv(reset: str = "zero"):
    """A small conv network in snnTorch: conv 1->4 (3x3, pad 1), Leaky, 2x2 avg pool, flatten, linear 64->10,
    Leaky. snnTorch 1.0's exporter needs per-neuron beta and threshold (scalars fail its type inference), an
    unbatched sample and ``Flatten(0)``."""
    snn = _snn()
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(1, 4, 3, padding=1)
    fc = torch.nn.Linear(64, 10)
    with torch.no_grad():
        conv.weight.mul_(2.0)
        fc.weight.mul_(3.0)
    beta1 = 0.5 + 0.45 * torch.rand(4, 1, 1).expand(4, 8, 8).contiguous()  # one leak per channel
    net = torch.nn.Sequential(
        conv, snn.Leaky(beta=beta1, threshold=torch.full((4, 8, 8), 0.6), init_hidden=True, reset_mechanism=reset),
        torch.nn.AvgPool2d(2), torch.nn.Flatten(0), fc,
        snn.Leaky(beta=torch.full((10,), 0.8), threshold=torch.full((10,), 0.5), init_hidden=True,
                  reset_mechanism=reset))
    return net.eval(), (1, 8, 8)


def _snntorch_fc(reset: str = "zero"):
    """A small fully connected network in snnTorch: 20 -> 12 (Leaky) -> 5 (Leaky), set weights."""
    snn = _snn()
    torch.manual_seed(2)
    fc1, fc2 = torch.nn.Linear(20, 12), torch.nn.Linear(12, 5, bias=False)
    with torch.no_grad():
        fc1.weight.mul_(2.0)
        fc2.weight.mul_(2.5)
    net = torch.nn.Sequential(
        fc1, snn.Leaky(beta=torch.linspace(0.6, 0.95, 12), threshold=torch.full((12,), 0.4), init_hidden=True,
                       reset_mechanism=reset),
        fc2, snn.Leaky(beta=torch.full((5,), 0.9), threshold=torch.full((5,), 0.3), init_hidden=True,
                       reset_mechanism=reset))
    return net.eval(), (20,)


def _snntorch_export(net, shape):
    _snn()
    from snntorch.export_nir import export_to_nir

    return export_to_nir(net, torch.rand(*shape))


def _snntorch_run(net, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """snnTorch's own simulation of ``net`` on ``x`` [T, B, ...], one sample at a time (``Flatten(0)`` merges a
    batch): ``({module index: spikes [T, B, ...]}, output spikes summed over T [B, K])``."""
    leaky = {str(i): m for i, m in enumerate(net) if isinstance(m, _snn().Leaky)}
    per_sample = []
    with torch.no_grad():
        for b in range(x.shape[1]):
            for m in leaky.values():
                m.mem = torch.zeros(0)  # fresh state: Leaky re-creates zeros of the input's shape
            steps = {name: [] for name in leaky}
            hooks = [m.register_forward_hook(lambda mod, i, o, n=n: steps[n].append(o.detach().clone()))
                     for n, m in leaky.items()]
            try:
                for t in range(x.shape[0]):
                    net(x[t, b])
            finally:
                for h in hooks:
                    h.remove()
            per_sample.append({n: torch.stack(v) for n, v in steps.items()})
    spikes = {n: torch.stack([s[n] for s in per_sample], 1) for n in leaky}
    last = list(leaky)[-1]
    return spikes, spikes[last].sum(0)


def _snntorch_reload_counts(path, x: torch.Tensor) -> torch.Tensor:
    """The NIR file at ``path`` loaded by snnTorch's ``import_from_nir`` and run on ``x`` [T, B, ...] one sample at a
    time (fresh membranes each): its output summed over T, ``[B, K]``."""
    from snntorch.import_nir import import_from_nir

    with contextlib.redirect_stdout(io.StringIO()):
        back = import_from_nir(nir.read(str(path)))
    leaky = [m for m in back.modules() if isinstance(m, _snn().Leaky)]
    counts = []
    with torch.no_grad():
        for b in range(x.shape[1]):
            for m in leaky:
                m.mem = torch.zeros(0)
            total = 0
            for t in range(x.shape[0]):
                out = back(x[t, b])
                total = total + (out[0] if isinstance(out, tuple) else out)
            counts.append(total.reshape(-1))
    return torch.stack(counts)


def _inputs(shape, seed=0, batch=4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(T, batch, *shape, generator=g) * 1.5


@pytest.mark.parametrize("build", [_snntorch_conv, _snntorch_fc], ids=["conv", "fc"])
def test_snntorch_import_fires_snntorchs_spikes(build):
    net, shape = build("zero")
    graph = _snntorch_export(net, shape)
    model = import_graph(graph, timesteps=T, dt=1e-4)
    x = _inputs(shape)
    ours, logits = graph_spikes(model, x)
    theirs, counts = _snntorch_run(net, x)
    assert_same_spikes(ours, theirs)
    assert torch.equal(logits, counts)


@pytest.mark.parametrize("build", [_snntorch_conv, _snntorch_fc], ids=["conv", "fc"])
def test_snntorch_subtract_reset_is_imported_as_zero_reset(build):
    """The stated difference: snnTorch's exporter writes every Leaky as a NIR LIF with v_reset = 0, whatever its
    reset_mechanism; the import therefore equals the network with reset_mechanism='zero', not 'subtract'."""
    net, shape = build("subtract")
    model = import_graph(_snntorch_export(net, shape), timesteps=T, dt=1e-4)
    x = _inputs(shape, seed=3)
    ours, _ = graph_spikes(model, x)
    subtract, _ = _snntorch_run(net, x)
    zero, _ = _snntorch_run(build("zero")[0], x)
    for name in zero:
        assert torch.equal(ours[name], zero[name]), name
    assert any(not torch.equal(ours[n], subtract[n]) for n in zero)
    assert all(n["reset"] == "hard" for n in model.spec["graph"]["nodes"] if n["kind"] == "lif")


@pytest.mark.parametrize("build", [_snntorch_conv, _snntorch_fc], ids=["conv", "fc"])
def test_snntorch_compressed_model_goes_back_with_the_same_predictions(build, tmp_path):
    _snn()
    net, shape = build("zero")
    model = import_graph(_snntorch_export(net, shape), timesteps=T, dt=1e-4)
    small = _compress(model)
    path = tmp_path / "back.nir"
    write_nir(small, path)
    x = _inputs(shape, seed=5, batch=8)
    ours, logits = graph_spikes(small, x)
    theirs = _snntorch_reload_counts(path, x)
    assert torch.equal(theirs, logits)  # spike counts of the output layer, every image
    assert torch.equal(theirs.argmax(1), logits.argmax(1))
    # the compressed model is what went out: one channel fewer per hidden layer, half the weights zero, 4-bit values
    weights = [np.asarray(n.weight) for n in nir.read(str(path)).nodes.values() if hasattr(n, "weight")]
    assert weights[0].shape[0] == {"_snntorch_conv": 3, "_snntorch_fc": 11}[build.__name__]
    assert all((w == 0).mean() >= 0.45 for w in weights)
    assert all(np.unique(w).size <= 16 for w in weights)
    # and it reloads here as the compressed model (masks, quantizers), same logits
    again = load_nir(path)
    assert torch.equal(graph_spikes(again, x)[1], logits)


def test_narrowed_snntorch_network_computes_the_same_and_goes_back_to_snntorch(tmp_path):
    """Channel surgery on an imported snnTorch conv network (conv 1->4, Leaky, pool, flatten, linear 64->10,
    Leaky): a channel whose conv weights and bias are zero never spikes, so dropping it changes no output spike;
    the narrowed graph (conv 1->3, Leaky [3, 8, 8], flatten of [3, 4, 4], linear 48->10) goes back to snnTorch
    with the same output spikes."""
    _snn()
    from snncompress.compress.structure import narrow_model

    net, shape = _snntorch_conv("zero")
    model = import_graph(_snntorch_export(net, shape), timesteps=T, dt=1e-4)
    (group,) = model.channel_groups()  # the output layer's channels are the classes: one group
    conv = model.get_submodule(group.outputs[0])
    with torch.no_grad():
        conv.weight[2] = 0
        conv.bias[2] = 0
    narrow = narrow_model(model, {group.name: torch.tensor([0, 1, 3])})
    nodes = {n["name"]: n for n in narrow.spec["graph"]["nodes"]}
    assert (nodes["0"]["out_channels"], nodes["1"]["shape"], nodes["3"]["input_shape"], nodes["4"]["in_features"]) \
        == (3, [3, 8, 8], [3, 4, 4], 48)
    x = _inputs(shape, seed=4, batch=8)
    wide_spikes, wide_logits = graph_spikes(model, x)
    narrow_spikes, narrow_logits = graph_spikes(narrow, x)
    assert wide_logits.sum() > 0 and torch.equal(narrow_logits, wide_logits)
    assert torch.equal(narrow_spikes["1"], wide_spikes["1"][:, :, [0, 1, 3]])
    path = tmp_path / "narrow.nir"
    write_nir(narrow, path)
    assert torch.equal(_snntorch_reload_counts(path, x), narrow_logits)


def test_prune_pca_narrows_an_imported_conv_network_in_a_recipe(tmp_path, capsys):
    """The STP stage on an snnTorch conv network for MNIST, imported from NIR: PCA keeps fewer conv channels, the
    narrow model fine-tunes, and its NIR export reloads here with the narrowed shapes."""
    snn = _snn()
    torch.manual_seed(3)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 3, padding=1),
        snn.Leaky(beta=torch.full((6, 28, 28), 0.9), threshold=torch.ones(6, 28, 28), init_hidden=True,
                  reset_mechanism="zero"),
        torch.nn.AvgPool2d(4), torch.nn.Flatten(0), torch.nn.Linear(6 * 7 * 7, 10),
        snn.Leaky(beta=torch.full((10,), 0.9), threshold=torch.ones(10), init_hidden=True, reset_mechanism="zero"))
    with torch.no_grad():
        net[0].weight[3:] *= 0.05  # three weak channels: PCA's variance sits in the first three
    nir.write(str(tmp_path / "conv.nir"), _snntorch_export(net.eval(), (1, 28, 28)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data: {{dataset: mnist-builtin, batch_size: 64}}\nstages:\n"
                      f"  - {{kind: load, checkpoint: {(tmp_path / 'conv.nir').as_posix()}, timesteps: 2, dt: 1.0e-4}}\n"
                      f"  - {{kind: prune_pca, mode: finetune, theta: 0.9, pca_images: 64, epochs: 1, max_batches: 3}}\n"
                      f"measure: {{noise_sigmas: [0.0], robustness_images: 50, ops_images: 32, latency_repeats: 2}}\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "run" / "stages" / "01-prune_pca" / "metrics.json").read_text())["metrics"]
    (width,) = metrics["group_widths"].values()
    assert 1 <= width < 6 and metrics["group_sizes"] == {"nodes.n0": 6}
    narrow = load_checkpoint(tmp_path / "run" / "stages" / "01-prune_pca" / "model.safetensors").model
    assert narrow.node_module("0").out_channels == width and narrow.node_module("4").in_features == width * 49
    write_nir(narrow, tmp_path / "narrow.nir")
    again = load_nir(tmp_path / "narrow.nir")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), narrow.eval()(x))


# ----------------------------------------------------------------------------- the checkpoint, stages, refusals


def test_graph_model_checkpoint_round_trip(tmp_path):
    net, shape = _snntorch_conv()
    model = _compress(import_graph(_snntorch_export(net, shape), timesteps=T, dt=1e-4))
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model)
    raw = path.read_bytes()
    assert b"pickle" not in raw[:200]
    loaded = load_checkpoint(path).model
    assert isinstance(loaded, GraphNetwork)
    x = _inputs(shape, seed=7)
    assert torch.equal(graph_spikes(loaded, x)[1], graph_spikes(model, x)[1])
    images = torch.rand(3, *shape)
    assert torch.equal(loaded(images), model(images))  # direct input: the image at every one of T steps


def test_checkpoint_layers_refuses_a_graph_network_it_cannot_segment():
    """A graph network runs its own layers, not run_sequence: wrapping run_sequence would do nothing silently."""
    from snncompress.training.memory import checkpoint_layers, is_checkpointed

    net, shape = _snntorch_fc()
    model = import_graph(_snntorch_export(net, shape), timesteps=T, dt=1e-4)
    assert checkpoint_layers(model, False) is model and not is_checkpointed(model)
    with pytest.raises(TypeError, match="does not know how to segment GraphNetwork"):
        checkpoint_layers(model, True)


def _small_graph(*middle, edges=None):
    """Input [4] -> Linear 4->3 -> middle nodes ... -> Output, as a NIR graph."""
    nodes = {"input": nir.Input(input_type={"input": np.array([4])}),
             "fc": nir.Linear(weight=np.ones((3, 4), np.float32))}
    nodes.update({f"m{i}": node for i, node in enumerate(middle)})
    nodes["output"] = nir.Output(output_type={"output": np.array([3])})
    names = list(nodes)
    return make_node(nir.NIRGraph, nodes=nodes, edges=edges or list(zip(names[:-1], names[1:])), type_check=False)


def test_scale_and_li_readout_follow_the_euler_steps_of_nirs_equations():
    """Input [4] -> Linear(ones) -> Scale [1, 2, 3] -> LI (tau 1 ms, r 2, v_leak 0.5) at dt 0.1 ms, T = 3.

    NIR's LI is tau dv/dt = (v_leak - v) + r I; Euler with dt/tau = 0.1 from v = 0 and I = 4, 8, 12:
    v1 = 0.1 (0.5 + 2 I), v2 = 0.9 v1 + v1, v3 = 0.9 v2 + v1; the logits are v1 + v2 + v3 = 4.7685, 9.2565, 13.7445.
    """
    li = make_node(nir.LI, tau=np.full(3, 1e-3, np.float32), r=np.full(3, 2.0, np.float32),
                   v_leak=np.full(3, 0.5, np.float32))
    model = import_graph(_small_graph(nir.Scale(scale=np.array([1, 2, 3], np.float32)), li), timesteps=3, dt=1e-4)
    assert model(torch.ones(1, 4))[0].tolist() == pytest.approx([4.7685, 9.2565, 13.7445], abs=1e-4)


def test_conv1d_is_a_cross_correlation_with_its_padding():
    """Conv1d kernel [1, 0, -1], padding 1 on 1..5 gives x[i-1] - x[i+1] = -2, -2, -2, -2, 4 per step; no neuron,
    so the network integrates it over T = 2."""
    nodes = {"input": nir.Input(input_type={"input": np.array([1, 5])}),
             "conv": make_node(nir.Conv1d, input_shape=5, weight=np.array([[[1.0, 0.0, -1.0]]], np.float32), stride=1,
                               padding=1, dilation=1, groups=1, bias=np.zeros(1, np.float32)),
             "flat": make_node(nir.Flatten, input_type={"input": np.array([1, 5])}, start_dim=0, end_dim=-1),
             "output": nir.Output(output_type={"output": np.array([5])})}
    names = list(nodes)
    graph = make_node(nir.NIRGraph, nodes=nodes, edges=list(zip(names[:-1], names[1:])), type_check=False)
    model = import_graph(graph, timesteps=2, dt=1e-4)
    assert model(torch.tensor([[[1.0, 2.0, 3.0, 4.0, 5.0]]])).tolist() == [[-4.0, -4.0, -4.0, -4.0, 8.0]]


def _lif(n=3, v_reset=0.0):
    return make_node(nir.LIF, tau=np.full(n, 1e-3, np.float32), r=np.full(n, 10.0, np.float32),
                     v_leak=np.zeros(n, np.float32), v_threshold=np.ones(n, np.float32),
                     v_reset=np.full(n, v_reset, np.float32))


def _refused(capsys, tmp_path, source, fragment):
    out = tmp_path / "out.safetensors"
    assert main(["import", str(source), "--out", str(out), "--timesteps", "2", "--dt", "1e-4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))


def test_import_refusals_are_one_line_exit_2_nothing_written(tmp_path, capsys):
    delay = nir.Delay(delay=np.ones(3, np.float32))
    nir.write(str(tmp_path / "delay.nir"), _small_graph(delay))
    _refused(capsys, tmp_path, tmp_path / "delay.nir", "node m0 is a NIR Delay, which snncompress cannot import")
    cyclic = _small_graph(_lif(), nir.Linear(weight=np.eye(3, dtype=np.float32)),
                          edges=[("input", "fc"), ("fc", "m0"), ("m0", "m1"), ("m1", "m0"), ("m0", "output")])
    nir.write(str(tmp_path / "cycle.nir"), cyclic)
    _refused(capsys, tmp_path, tmp_path / "cycle.nir", "the graph has a cycle through 'm0', 'm1', 'output'")
    newer = tmp_path / "newer.nir"
    nir.write(str(newer), _small_graph(_lif()))
    import h5py

    with h5py.File(newer, "r+") as f:
        del f["version"]
        f.create_dataset("version", data="2.0.0", dtype=h5py.string_dtype())
    _refused(capsys, tmp_path, newer, "was written by NIR 2.0.0, a newer major version")
    (tmp_path / "notes.nir").write_text("not a graph\n")
    _refused(capsys, tmp_path, tmp_path / "notes.nir", "is not a NIR file (HDF5)")
    nir.write(str(tmp_path / "nodt.nir"), _small_graph(_lif()))
    out = tmp_path / "out.safetensors"
    assert main(["import", str(tmp_path / "nodt.nir"), "--out", str(out), "--timesteps", "2"]) == 2
    assert "give --dt" in capsys.readouterr().err and not out.exists()


def test_a_nonzero_v_reset_is_refused(tmp_path, capsys):
    if "v_reset" not in nir.LIF.__dataclass_fields__:
        pytest.skip(f"nir {nir.version} has no v_reset (nir 1.0.8 has it)")
    nir.write(str(tmp_path / "reset.nir"), _small_graph(_lif(v_reset=0.2)))
    _refused(capsys, tmp_path, tmp_path / "reset.nir", "node m0: v_reset != 0 is not supported")


def test_import_command_writes_a_checkpoint_that_evaluates_and_exports(tmp_path, capsys):
    net, shape = _snntorch_conv()
    nir.write(str(tmp_path / "snn.nir"), _snntorch_export(net, shape))
    ckpt = tmp_path / "model.safetensors"
    assert main(["import", str(tmp_path / "snn.nir"), "--out", str(ckpt), "--timesteps", str(T),
                 "--dt", "1e-4"]) == 0
    line = capsys.readouterr().out
    assert "1 conv2d, 2 lif, 1 avgpool2d, 1 flatten, 1 affine; input [1, 8, 8], 10 outputs, T 6, dt 0.0001" in line
    model = load_checkpoint(ckpt).model
    x = _inputs(shape, seed=9)
    theirs, _ = _snntorch_run(net, x)
    ours, _ = graph_spikes(model, x)
    assert all(torch.equal(ours[n], theirs[n]) for n in theirs)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "back.nir")]) == 0
    assert "NIR graph of graph" in capsys.readouterr().out
    spec = json.loads(nir.read(str(tmp_path / "back.nir")).metadata["snncompress_spec"])
    assert spec["family"] == "graph" and spec["dt"] == 1e-4


# ----------------------------------------------------------------------------- Norse

NORSE_DT = 1e-3  # Norse's default step (its cells' dt and to_nir's)


def _norse():
    return pytest.importorskip("norse.torch", reason="Norse is not installed (pip install norse)")


def _norse_fc():
    """20 -> 12 (LIFBoxCell: a NIR LIF) -> 5 (IAFCell: a NIR IF), set weights."""
    norse = _norse()
    torch.manual_seed(3)
    net = norse.SequentialState(torch.nn.Linear(20, 12), norse.LIFBoxCell(), torch.nn.Linear(12, 5), norse.IAFCell())
    with torch.no_grad():
        net[0].weight.mul_(30.0)
        net[2].weight.mul_(3.0)
    return net.eval(), (20,)


def _norse_conv():
    """conv 1->4 (3x3, pad 1), LIFBoxCell, conv 4->2 (3x3, stride 2, pad 1), LIFCell (a NIR CubaLIF). Norse 1.1's
    to_nir has no pooling or flatten (it writes empty nodes), so the network is convolutions only."""
    norse = _norse()
    torch.manual_seed(4)
    net = norse.SequentialState(torch.nn.Conv2d(1, 4, 3, padding=1), norse.LIFBoxCell(),
                                torch.nn.Conv2d(4, 2, 3, stride=2, padding=1), norse.LIFCell())
    with torch.no_grad():
        net[0].weight.mul_(20.0)
        net[2].weight.mul_(12.0)
    return net.eval(), (1, 8, 8)


def _norse_run(net, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Norse's own simulation on ``x`` [T, B, ...] (its batch layout: one step at a time, batch first):
    ``{module index: spikes [T, B, ...]}``."""
    norse = _norse()
    cells = {str(i): m for i, m in enumerate(net) if isinstance(m, (norse.LIFBoxCell, norse.LIFCell, norse.IAFCell))}
    found = {n: [] for n in cells}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: found[n].append(o[0].detach().clone()))
             for n, m in cells.items()]
    state = None
    try:
        with torch.no_grad():
            for t in range(x.shape[0]):
                _, state = net(x[t], state)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.stack(v) for n, v in found.items()}


def _norse_export(net, shape):
    _norse()
    from norse.torch.utils.export_nir import to_nir

    return to_nir(net, torch.rand(1, *shape), dt=NORSE_DT)


@pytest.mark.parametrize("build", [_norse_conv, _norse_fc], ids=["conv", "fc"])
def test_norse_import_fires_norses_spikes(build):
    """The stated differences: (1) Norse 1.1's to_nir writes tau = dt / tau_inv = dt * tau (its time constants
    times its dt), so the graph runs as Norse ran it with dt = NORSE_DT ** 2; (2) Norse's IAFCell and LIFCell add
    their input as it is (integration="jump"), where NIR's ODE under forward Euler would scale it by dt r and
    dt w_in / tau_syn. With both, every spike of every layer and step is Norse's."""
    net, shape = build()
    graph = _norse_export(net, shape)
    model = import_graph(graph, timesteps=T, dt=NORSE_DT ** 2, integration="jump")
    assert model.spec["in_shape"] == list(shape)  # Norse traces with a batch of one; the import drops it
    x = _inputs(shape, seed=11)
    ours, _ = graph_spikes(model, x)
    theirs = _norse_run(net, x)
    assert_same_spikes(ours, theirs)
    with pytest.raises(UserError, match="dt / tau outside"):  # Norse's own dt against its written tau
        import_graph(graph, timesteps=T, dt=NORSE_DT, integration="jump")


@pytest.mark.parametrize("build", [_norse_conv, _norse_fc], ids=["conv", "fc"])
def test_norse_compressed_model_goes_back_with_the_same_predictions(build, tmp_path):
    """Norse's from_nir reads tau as the time constant (1 / tau_inv), the inverse of what its to_nir writes; given
    the same dt as the import (NORSE_DT ** 2) it runs the exported compressed model as this package does."""
    _norse()
    from norse.torch import from_nir

    net, shape = build()
    model = import_graph(_norse_export(net, shape), timesteps=T, dt=NORSE_DT ** 2, integration="jump")
    small = _compress(model)
    path = tmp_path / "back.nir"
    write_nir(small, path)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        back = from_nir(nir.read(str(path)), dt=NORSE_DT ** 2, ignore_warnings=True)
    x = _inputs(shape, seed=13, batch=8)
    _, logits = graph_spikes(small, x)
    state, total = None, 0
    with torch.no_grad():
        for t in range(T):
            out, state = back(x[t], state)
            total = total + out.flatten(1)
    assert torch.equal(total, logits)
    assert torch.equal(total.argmax(1), logits.argmax(1))
    again = load_nir(path)
    assert torch.equal(graph_spikes(again, x)[1], logits)


# ----------------------------------------------------------------------------- Sinabs

SINABS_BATCH = 4


def _sinabs():
    sinabs = pytest.importorskip("sinabs", reason="Sinabs is not installed (pip install --no-deps sinabs pbr: its "
                                                  "metadata asks for nir<=1.0.4 and the closed samna)")
    import sinabs.layers  # noqa: F401
    import sinabs.activation  # noqa: F401

    return sinabs


def _sinabs_reset(net) -> None:
    for m in net.modules():
        if hasattr(m, "reset_states"):
            m.reset_states()


def _sinabs_conv(nir_semantics: bool = True):
    """conv 1->4 (3x3, pad 1), IAFSqueeze, 2x2 SumPool2d, flatten, linear 64->10, IAFSqueeze. With
    ``nir_semantics`` the neurons fire one spike per step and reset to 0 (SingleSpike, MembraneReset), what the
    NIR IF node they are exported as says; else Sinabs' defaults (MultiSpike, MembraneSubtract)."""
    sinabs = _sinabs()
    sl, act = sinabs.layers, sinabs.activation
    torch.manual_seed(5)
    kw = ({"spike_fn": act.SingleSpike, "reset_fn": act.MembraneReset()} if nir_semantics else {})
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1, bias=False),
        sl.IAFSqueeze(batch_size=SINABS_BATCH, spike_threshold=torch.tensor(0.8), **kw),
        sl.SumPool2d(2), torch.nn.Flatten(), torch.nn.Linear(64, 10, bias=False),
        sl.IAFSqueeze(batch_size=SINABS_BATCH, spike_threshold=torch.tensor(0.5), **kw))
    with torch.no_grad():
        net[0].weight.mul_(2.0)
    return net.eval(), (1, 8, 8)


def _sinabs_fc(nir_semantics: bool = True):
    """20 -> 12 (IAFSqueeze) -> 5 (IAFSqueeze), set weights; neurons as in :func:`_sinabs_conv`."""
    sinabs = _sinabs()
    sl, act = sinabs.layers, sinabs.activation
    torch.manual_seed(6)
    kw = ({"spike_fn": act.SingleSpike, "reset_fn": act.MembraneReset()} if nir_semantics else {})
    net = torch.nn.Sequential(
        torch.nn.Linear(20, 12), sl.IAFSqueeze(batch_size=SINABS_BATCH, spike_threshold=torch.tensor(0.7), **kw),
        torch.nn.Linear(12, 5), sl.IAFSqueeze(batch_size=SINABS_BATCH, spike_threshold=torch.tensor(0.4), **kw))
    with torch.no_grad():
        net[0].weight.mul_(2.0)
        net[2].weight.mul_(2.0)
    return net.eval(), (20,)


def _sinabs_export(net, shape):
    graph = _sinabs().to_nir(net, torch.rand(SINABS_BATCH * T, *shape))
    _sinabs_reset(net)  # to_nir ran the sample through the network: its membranes hold that run
    return graph


def _sinabs_run(net, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sinabs' own simulation of ``x`` [T, B, ...]: its layout is batch-major time folded into the batch,
    ``[B*T, ...]``; returns ``{module index: spikes [T, B, ...]}``."""
    sl = _sinabs().layers
    _sinabs_reset(net)
    steps, batch = x.shape[:2]
    found = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=str(k): found.__setitem__(n, o.detach().clone()))
             for k, m in enumerate(net) if isinstance(m, sl.IAFSqueeze)]
    try:
        with torch.no_grad():
            net(x.transpose(0, 1).reshape(batch * steps, *x.shape[2:]))
    finally:
        for h in hooks:
            h.remove()
    return {n: o.reshape(batch, steps, *o.shape[1:]).transpose(0, 1) for n, o in found.items()}


@pytest.mark.parametrize("build", [_sinabs_conv, _sinabs_fc], ids=["conv", "fc"])
def test_sinabs_import_fires_sinabs_spikes(build):
    """Sinabs writes its IAF as a NIR IF with r = 1 and v_reset = 0, and adds inputs as they are (no dt):
    integration="jump". With SingleSpike and MembraneReset every spike is Sinabs'. The stated difference:
    Sinabs' defaults (MultiSpike: several spikes per step; MembraneSubtract) cannot be said in NIR, and the
    import (one spike, reset to 0) equals the SingleSpike/MembraneReset network, not the default one."""
    net, shape = build(True)
    graph = _sinabs_export(net, shape)
    model = import_graph(graph, timesteps=T, integration="jump")
    x = _inputs(shape, seed=17, batch=SINABS_BATCH)
    ours, _ = graph_spikes(model, x)
    theirs = _sinabs_run(net, x)
    assert_same_spikes(ours, theirs)
    default, _ = build(False)
    assert import_graph(_sinabs_export(default, shape), timesteps=T, integration="jump").spec == model.spec
    assert any(not torch.equal(ours[n], s) for n, s in _sinabs_run(default, x).items())


@pytest.mark.parametrize("build", [_sinabs_conv, _sinabs_fc], ids=["conv", "fc"])
def test_sinabs_compressed_model_goes_back_with_the_same_predictions(build, tmp_path):
    """Sinabs' from_nir builds IAFSqueeze layers with MultiSpike, MembraneSubtract and min_v_mem = -v_threshold
    whatever the graph says; with those set to what the NIR IF node means (SingleSpike, MembraneReset, no floor)
    the exported compressed model gives this package's outputs in Sinabs."""
    sinabs = _sinabs()
    sl, act = sinabs.layers, sinabs.activation
    net, shape = build(True)
    small = _compress(import_graph(_sinabs_export(net, shape), timesteps=T, integration="jump"))
    path = tmp_path / "back.nir"
    write_nir(small, path)
    back = sinabs.from_nir(nir.read(str(path)), batch_size=SINABS_BATCH)
    neurons = [m for m in back.modules() if isinstance(m, sl.IAFSqueeze)]
    assert neurons and all(m.spike_fn is act.MultiSpike and m.min_v_mem is not None for m in neurons)
    for m in neurons:
        m.spike_fn, m.reset_fn, m.min_v_mem = act.SingleSpike, act.MembraneReset(), None
    x = _inputs(shape, seed=19, batch=SINABS_BATCH)
    _, logits = graph_spikes(small, x)
    _sinabs_reset(back)
    with torch.no_grad():
        out = back(x.transpose(0, 1).reshape(SINABS_BATCH * T, *shape))
    out = out[0] if isinstance(out, tuple) else out  # nirtorch's executor returns (output, state)
    theirs = out.reshape(SINABS_BATCH, T, -1).sum(1)
    assert torch.equal(theirs, logits)
    assert torch.equal(theirs.argmax(1), logits.argmax(1))
    assert torch.equal(graph_spikes(load_nir(path), x)[1], logits)


# ----------------------------------------------------------------------------- Rockpool

ROCKPOOL_DT = 1e-3


def _rockpool():
    pytest.importorskip("rockpool", reason="Rockpool is not installed (pip install rockpool)")
    from rockpool.nn import combinators, modules

    return combinators, modules


def _rockpool_fc(max_spikes: float = 1.0):
    """20 -> 12 (LIFTorch: a NIR CubaLIF) -> 5 (LIFTorch), set weights. ``max_spikes`` per step: 1 is what a NIR
    neuron can fire; Rockpool's default is 2**16."""
    combinators, modules = _rockpool()
    torch.manual_seed(7)
    net = combinators.Sequential(
        modules.LinearTorch((20, 12)),
        modules.LIFTorch(12, tau_mem=0.02, tau_syn=0.01, threshold=1.0, dt=ROCKPOOL_DT, max_spikes_per_dt=max_spikes),
        modules.LinearTorch((12, 5)),
        modules.LIFTorch(5, tau_mem=0.03, tau_syn=0.005, threshold=0.5, dt=ROCKPOOL_DT, max_spikes_per_dt=max_spikes))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, modules.LinearTorch):
                m.weight.mul_(3.0)
    return net, (20,)


def _rockpool_reset(net) -> None:
    """Rockpool modules keep their state between calls: back to rest (a Rockpool network resets its own children;
    the GraphExecutor of from_nir is not one, so its children are reset one by one)."""
    if hasattr(net, "reset_state"):
        net.reset_state()
        return
    for m in net.children():
        if hasattr(m, "reset_state"):
            m.reset_state()


def _rockpool_run(net, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rockpool's own simulation of ``x`` [T, B, ...]; its layout is [B, T, ...]. ``{module name: spikes
    [T, B, ...]}``."""
    _, modules = _rockpool()
    _rockpool_reset(net)
    found = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: found.__setitem__(n, o.detach().clone()))
             for n, m in net.named_modules() if isinstance(m, modules.LIFTorch)]
    try:
        with torch.no_grad():
            net(x.transpose(0, 1).contiguous())
    finally:
        for h in hooks:
            h.remove()
    return {n: o.transpose(0, 1) for n, o in found.items()}


def _rockpool_export(net, shape):
    _rockpool()
    from rockpool.nn.modules.torch.nir import to_nir

    graph = to_nir(net, torch.rand(1, T, *shape))
    _rockpool_reset(net)
    return graph


def test_rockpool_import_fires_rockpools_spikes():
    """Rockpool writes LIFTorch as a NIR CubaLIF but runs its own discretisation: decays exp(-dt/tau), input into
    the synaptic current before its decay, membrane gain 1 (integration="rockpool"), and a subtractive reset that its
    export writes as v_reset = 0 (reset="subtract"). With max_spikes_per_dt = 1 every spike is Rockpool's. The stated
    difference: Rockpool's default fires up to 2**16 spikes per step, which a NIR neuron cannot."""
    net, shape = _rockpool_fc()
    graph = _rockpool_export(net, shape)
    model = import_graph(graph, timesteps=T, dt=ROCKPOOL_DT, integration="rockpool", reset="subtract")
    assert model.spec["in_shape"] == [20]  # Rockpool's Input type is the [batch, time, 20] sample's
    x = _inputs(shape, seed=23)
    ours, _ = graph_spikes(model, x)
    theirs = _rockpool_run(net, x)
    assert_same_spikes(ours, theirs)
    multi, _ = _rockpool_fc(max_spikes=2.0 ** 16)  # Rockpool's default: the same graph, more spikes per step
    assert import_graph(_rockpool_export(multi, shape), timesteps=T, dt=ROCKPOOL_DT, integration="rockpool",
                        reset="subtract").spec == model.spec
    ours_strong, _ = graph_spikes(model, x * 4)
    many = _rockpool_run(multi, x * 4)
    assert max(float(s.max()) for s in many.values()) > 1  # several spikes in one step: not a NIR neuron's output
    assert any(not torch.equal(ours_strong[n], many[n]) for n in many)


def test_rockpool_compressed_model_goes_back_with_the_same_predictions(tmp_path):
    """Rockpool's from_nir builds LIFTorch with its default 2**16 spikes per step and takes dt = tau_mem / (1 + r);
    the export writes r = tau / dt - 1, and with max_spikes_per_dt = 1 set again Rockpool gives this package's
    outputs."""
    _, modules = _rockpool()
    from rockpool.nn.modules.torch.nir import from_nir

    net, shape = _rockpool_fc()
    small = _compress(import_graph(_rockpool_export(net, shape), timesteps=T, dt=ROCKPOOL_DT,
                                   integration="rockpool", reset="subtract"))
    path = tmp_path / "back.nir"
    write_nir(small, path)
    back = from_nir(nir.read(str(path)))
    for m in back.modules():
        if isinstance(m, modules.LIFTorch):
            m.max_spikes_per_dt = torch.tensor(1.0)
    _rockpool_reset(back)
    x = _inputs(shape, seed=29, batch=8)
    _, logits = graph_spikes(small, x)
    with torch.no_grad():
        out = back(x.transpose(0, 1))
    theirs = (out[0] if isinstance(out, tuple) else out).sum(1)
    assert torch.equal(theirs, logits)
    assert torch.equal(theirs.argmax(1), logits.argmax(1))
    assert torch.equal(graph_spikes(load_nir(path), x)[1], logits)


def test_rockpool_has_no_convolution_in_nir():
    """The conv case cannot be made in Rockpool: its from_nir (and to_nir) know Linear, Affine, LIF, CubaLIF and LI
    only, so a graph with a Conv2d is refused by Rockpool itself."""
    _rockpool()
    from rockpool.nn.modules.torch.nir import from_nir

    net, shape = _snntorch_conv()
    graph = export_nir(import_graph(_snntorch_export(net, shape), timesteps=T, dt=1e-4))
    with pytest.raises(NotImplementedError, match="Conv2d"):
        from_nir(graph)


def test_a_recipe_loading_a_bad_nir_file_is_refused_before_anything_is_written(tmp_path, capsys):
    nir.write(str(tmp_path / "delay.nir"), _small_graph(nir.Delay(delay=np.ones(3, np.float32))))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data: {{dataset: mnist-builtin}}\nstages:\n  - {{kind: load, checkpoint: "
                      f"{(tmp_path / 'delay.nir').as_posix()}, timesteps: 2}}\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "node m0 is a NIR Delay" in err, err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ this package's own export, four importers


def test_own_vgg_export_against_snntorch_norse_rockpool():
    """What each framework's importer does with this package's default NIR export of a convnet (leak 1: IF nodes,
    2x2 average pooling): snnTorch 1.0 refuses IF nodes (r != 1) and loads the --leak-one lif form; Norse 1.1 has no
    AvgPool2d node (its importer drops it and fails), Rockpool 3.1 has no Conv2d. docs/interop.md states this
    table; networks imported from a framework go back in the node kinds it wrote (tests above)."""
    _snn()
    _norse()
    _rockpool()
    default, lif_form = _own_convnet_exports()
    from snntorch.import_nir import import_from_nir

    with contextlib.redirect_stdout(io.StringIO()):
        with pytest.raises(AssertionError, match="r != 1 not supported"):
            import_from_nir(copy.deepcopy(default))
        assert import_from_nir(copy.deepcopy(lif_form)) is not None
    from norse.torch import from_nir as norse_from_nir

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        with pytest.raises(KeyError, match="features_2"):  # features.2 is the first AvgPool2d
            norse_from_nir(copy.deepcopy(default))
    from rockpool.nn.modules.torch.nir import from_nir as rockpool_from_nir

    with pytest.raises(NotImplementedError, match="Conv2d"):
        rockpool_from_nir(copy.deepcopy(default))


def _own_convnet_exports():
    """This package's NIR export of a convnet (leak 1, hard reset): the default form and the --leak-one lif form."""
    from snncompress import build_model

    torch.manual_seed(0)
    model = build_model("convnet", 10, (1, 28, 28), 2, neuron={"reset": "hard"}).eval()
    return export_nir(model), export_nir(model, leak_one="lif")


def test_own_vgg_export_against_sinabs():
    """Sinabs 3.1's importer has no AvgPool2d (nor Linear) node: the convnet export does not load there."""
    sinabs = _sinabs()
    default, _ = _own_convnet_exports()
    with pytest.raises(KeyError, match="features_2"):
        sinabs.from_nir(copy.deepcopy(default), batch_size=1)


def _joined_graph():
    """Input [4] -> two Linear 4->3 whose sum drives one LIF -> Output: not one path (no channel surgery)."""
    nodes = {"input": nir.Input(input_type={"input": np.array([4])}),
             "fc": nir.Linear(weight=np.ones((3, 4), np.float32)),
             "fc2": nir.Linear(weight=-np.ones((3, 4), np.float32)),
             "lif": _lif(), "output": nir.Output(output_type={"output": np.array([3])})}
    edges = [("input", "fc"), ("input", "fc2"), ("fc", "lif"), ("fc2", "lif"), ("lif", "output")]
    return make_node(nir.NIRGraph, nodes=nodes, edges=edges, type_check=False)


@pytest.mark.parametrize("stage, message", [
    ("{kind: prune_pca}", "prune_pca narrows channels, which this imported graph network does not allow (channel "
                          "surgery: node 'input' (input) joins or splits the graph"),
    ("{kind: train_snn, checkpoint_layers: true}", "checkpoint_layers: an imported graph network runs its own layers"),
])
def test_what_a_graph_network_cannot_do_is_refused_at_recipe_load(tmp_path, capsys, stage, message):
    nir.write(str(tmp_path / "fc.nir"), _joined_graph())
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data: {{dataset: mnist-builtin}}\nstages:\n  - {{kind: load, checkpoint: "
                      f"{(tmp_path / 'fc.nir').as_posix()}, timesteps: 2, dt: 1.0e-4}}\n  - {stage}\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def _write_snntorch_mnist_nir(path, seed: int) -> None:
    """An snnTorch network for 28x28 MNIST (Linear 784 -> 10, Leaky beta 0.9, reset to zero), seeded, as NIR."""
    snn = _snn()
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(0), torch.nn.Linear(784, 10),
                              snn.Leaky(beta=torch.full((10,), 0.9), threshold=torch.ones(10), init_hidden=True,
                                        reset_mechanism="zero"))
    nir.write(str(path), _snntorch_export(net, (1, 28, 28)))


def test_evaluate_measures_an_imported_graph_network(tmp_path, capsys):
    """`snncompress evaluate` on the checkpoint of an imported snnTorch network: accuracy, SynOps, footprint."""
    _write_snntorch_mnist_nir(tmp_path / "mnist.nir", seed=8)
    ckpt = tmp_path / "model.safetensors"
    assert main(["import", str(tmp_path / "mnist.nir"), "--out", str(ckpt), "--timesteps", "2", "--dt", "1e-4"]) == 0
    assert main(["evaluate", str(ckpt), "--out", str(tmp_path / "eval"), "--dataset", "mnist-builtin",
                 "--set", "robustness_images=50", "--set", "noise_sigmas=[0.0]", "--set", "ops_images=64",
                 "--set", "latency_repeats=2"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    final = report["final"]
    assert final["timesteps"] == 2 and final["params"] == 784 * 10 + 10 + 2  # weights, bias, one leak, one threshold
    assert final["footprint_bytes"] == 4 * final["params"]                   # float32, dense
    assert final["synops"] == {"ac": 0.0, "mac": 7840.0, "dense": 7840.0}    # the image enters the linear once
    from snncompress.data import load_data

    _, test_loader, _ = load_data("mnist-builtin", batch_size=500)
    model = load_checkpoint(ckpt).model
    with torch.no_grad():
        correct = sum(int((model(images).argmax(1) == labels).sum()) for images, labels in test_loader)
    assert final["accuracy"] == correct / 2000


def test_per_neuron_parameters_run_the_euler_steps_exactly():
    """A LIF node whose tau and threshold vary inside a channel keeps one value per neuron and computes
    v[t] = (1 - dt/tau) v[t-1] + (dt r / tau) x[t], spike at v >= v_threshold, v <- 0 after a spike, whatever
    backend the network is set to."""
    g = torch.Generator().manual_seed(31)
    shape = (2, 3, 3)
    tau = (1e-3 * (1 + torch.rand(shape, generator=g))).numpy()
    thr = (0.5 + torch.rand(shape, generator=g)).numpy()
    r = (tau / 1e-4).astype(np.float32)  # gain dt r / tau = 1 at dt = 1e-4
    nodes = {"input": nir.Input(input_type={"input": np.array(shape)}),
             "lif": make_node(nir.LIF, tau=tau, r=r, v_leak=np.zeros(shape, np.float32), v_threshold=thr,
                              v_reset=np.zeros(shape, np.float32)),
             "output": nir.Output(output_type={"output": np.array(shape)})}
    graph = make_node(nir.NIRGraph, nodes=nodes, edges=[("input", "lif"), ("lif", "output")], type_check=False)
    model = import_graph(graph, timesteps=T, dt=1e-4)
    assert model.spec["graph"]["nodes"][1]["layout"] == "neuron"
    model.set_lif_backend("auto")
    x = torch.rand(T, 3, *shape, generator=g)
    ours, _ = graph_spikes(model, x)
    leak = torch.tensor(1 - 1e-4 / tau.astype(np.float64), dtype=torch.float32)
    v, expected = torch.zeros(3, *shape), []
    for t in range(T):
        v = leak * v + x[t]
        spikes = (v / torch.tensor(thr) - 1 >= 0).float()
        expected.append(spikes)
        v = v * (1 - spikes)
    assert torch.equal(ours["lif"], torch.stack(expected)) and 0 < ours["lif"].mean() < 1


def test_training_pruning_and_quantization_stages_run_on_a_loaded_nir_graph(tmp_path):
    """A recipe that loads an snnTorch graph, trains it (train_snn), prunes it by magnitude (prune_imp) and sweeps
    weight bit widths (quant_sweep) on the validation split; the final checkpoint is a masked, quantized graph
    network that exports to NIR and comes back the same."""
    _write_snntorch_mnist_nir(tmp_path / "mnist.nir", seed=9)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
seed: 0
device: cpu
data: {{dataset: mnist-builtin, batch_size: 64, train_subset: 512, test_subset: 128}}
stages:
  - {{kind: load, checkpoint: {(tmp_path / 'mnist.nir').as_posix()}, timesteps: 2, dt: 1.0e-4}}
  - {{kind: train_snn, epochs: 1, lr: 1.0e-3, max_batches: 3}}
  - {{kind: prune_imp, final_sparsity: 0.5, rate: 0.5, epochs: 1, finetune_epochs: 1, max_batches: 2}}
  - {{kind: quant_sweep, bits: [8, 4], tolerance: 0.05, max_batches: 2}}
measure: {{robustness_images: 16, ops_images: 16, latency_repeats: 2, noise_sigmas: [0.0]}}
""")
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [s["kind"] for s in report["stages"]] == ["load", "train_snn", "prune_imp", "quant_sweep"]
    final = load_checkpoint(tmp_path / "run" / report["final"]["checkpoint"]).model
    assert isinstance(final, GraphNetwork)
    from snncompress.compress import get_masks, get_quantizers

    masks, quantizers = get_masks(final), get_quantizers(final)
    weight = final.node_module("1").weight
    assert set(masks) == {"nodes.n1.weight"} and float(masks["nodes.n1.weight"].float().mean()) == 0.5
    assert "nodes.n1.weight" in quantizers and quantizers["nodes.n1.weight"].bits in (8, 4)
    assert float((weight == 0).float().mean()) >= 0.5
    assert report["final"]["footprint_bytes"] < report["baseline"]["footprint_bytes"] / 4
    write_nir(final, tmp_path / "final.nir")
    images = torch.rand(4, 1, 28, 28)
    again = load_nir(tmp_path / "final.nir")
    assert torch.equal(again(images), final.eval()(images))
    assert set(get_masks(again)) == {"nodes.n1.weight"}


# ----------------------------------------------------------------------------- the C engine on imported networks

def _imported_conv(framework: str) -> GraphNetwork:
    if framework == "snntorch":
        return import_graph(_snntorch_export(*_snntorch_conv()), timesteps=T, dt=1e-4)
    if framework == "sinabs":
        return import_graph(_sinabs_export(*_sinabs_conv()), timesteps=T, integration="jump")
    return import_graph(_norse_export(*_norse_conv()), timesteps=T, dt=1e-6, integration="jump")


@pytest.mark.parametrize("framework", ["snntorch", "sinabs"])
def test_imported_conv_networks_run_in_the_c_engine(framework, tmp_path):
    """snnTorch's (LIF, average pooling) and Sinabs' (IF, sum pooling) conv networks, imported, run in C: the
    float build counts PyTorch's output spikes exactly; compressed (narrowed, masked, 4-bit) it runs integer-only,
    bit for bit its numpy reference."""
    import shutil

    from test_c_export import assert_bit_exact, random_images, torch_logits

    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc) on PATH: the C engine cannot be built")
    model = _imported_conv(framework)
    images = random_images(8, tuple(model.spec["in_shape"]), seed=3)
    engine, traced = assert_bit_exact(tmp_path, model, images, name="float")
    counts = np.stack([t[3] for t in traced])
    assert not engine.integer and counts.sum() > 0
    np.testing.assert_array_equal(counts, torch_logits(model, images).numpy())
    small = _compress(model)
    engine, traced = assert_bit_exact(tmp_path, small, images, name="int")
    assert engine.integer and engine.layers[0].out_shape[0] == 3 and engine.layers[-1].in_shape == (3, 4, 4)
    assert (engine.layers[-1].weights == 0).mean() >= 0.45  # half the weights masked (dense storage is smaller)


def test_norse_conv_network_is_refused_by_the_c_engine_naming_its_cubalif():
    """Norse's LIFCell exports as CubaLIF (a synaptic current per neuron), which the C engine does not keep."""
    from snncompress.deploy.c import compile_engine

    _norse()
    with pytest.raises(UserError, match="is cubalif"):
        compile_engine(_imported_conv("norse"), (0.2,), (0.3,))
