"""The C engine on imported graph networks (models/graph.py): a NIR graph written by hand with the nodes
other frameworks emit (conv bias, per-neuron LIF parameters with v_leak, a Scale node, an IF layer, sum and
average pooling, a spiking output layer) compiles to C that equals its numpy reference bit for bit and
PyTorch's spike counts; quantized and masked, it runs integer-only; graphs that are not a chain the engine
runs are refused with one line, exit 2, nothing written."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from snncompress.checkpoint import save_checkpoint
from snncompress.cli import main
from snncompress.compress import quantize_weights, set_mask
from snncompress.deploy.c import compile_engine
from snncompress.deploy.nir.graph import import_graph
from snncompress.deploy.nir.mapping import make_node
from snncompress.errors import UserError

from test_c_export import MEAN, STD, assert_bit_exact, needs_cc, random_images, torch_logits

nir = pytest.importorskip("nir", reason="nir is a test dependency (pyproject's test extra)")

DT = 1e-4
SHAPE = (1, 8, 8)


def _conv(cin, cout, seed, gain, kernel=3, **geometry):
    g = np.random.default_rng(seed)
    fields = {"stride": (1, 1), "padding": (kernel // 2, kernel // 2), "dilation": (1, 1), "groups": 1, **geometry}
    weight = (g.normal(size=(cout, cin, kernel, kernel)) * gain).astype(np.float32)
    return make_node(nir.Conv2d, input_shape=None, weight=weight,
                     bias=g.uniform(-0.2, 0.4, cout).astype(np.float32), **fields)


def _lif(shape, leak, threshold, v_leak=0.0, gain=1.0):
    """A NIR LIF whose Euler step at DT has the given per-channel ``leak`` and input ``gain`` (``dt r / tau``):
    per-neuron arrays, constant over each channel's positions."""
    leak = np.asarray(leak, np.float64).reshape(-1, *([1] * (len(shape) - 1)))
    tau = np.broadcast_to(DT / (1.0 - leak), shape).astype(np.float32)
    r = np.broadcast_to(gain / (1.0 - leak), shape).astype(np.float32)
    return make_node(nir.LIF, tau=tau, r=r, v_leak=np.full(shape, v_leak, np.float32),
                     v_threshold=np.full(shape, threshold, np.float32), v_reset=np.zeros(shape, np.float32))


def chain_graph(head=None, tail=None, conv2=None):
    """input [1, 8, 8] -> conv 1->4 (bias) -> LIF (per-channel leak, v_leak) -> SumPool 2 -> conv 4->6 (bias)
    -> Scale -> IF -> AvgPool 2 -> Flatten -> Affine 24->10 -> LIF -> output (spike counts).

    ``head`` / ``tail`` / ``conv2`` replace the first neuron, the output neuron, the second convolution."""
    g = np.random.default_rng(7)
    nodes = {
        "input": make_node(nir.Input, input_type={"input": np.array(SHAPE)}),
        "conv1": _conv(1, 4, 1, 0.9),
        "lif1": head or _lif((4, 8, 8), [0.6, 0.8, 0.9, 0.99], 0.5, v_leak=0.3, gain=1.5),
        "pool1": make_node(nir.SumPool2d, kernel_size=np.array([2, 2]), stride=np.array([2, 2]),
                           padding=np.array([0, 0])),
        "conv2": conv2 or _conv(4, 6, 2, 0.5),
        "scale": make_node(nir.Scale, scale=np.broadcast_to(g.uniform(0.5, 1.5, (6, 1, 1)), (6, 4, 4))
                           .astype(np.float32)),
        "if2": make_node(nir.IF, r=np.full((6, 4, 4), 1.0 / DT, np.float32),
                         v_threshold=np.full((6, 4, 4), 0.6, np.float32), v_reset=np.zeros((6, 4, 4), np.float32)),
        "pool2": make_node(nir.AvgPool2d, kernel_size=np.array([2, 2]), stride=np.array([2, 2]),
                           padding=np.array([0, 0])),
        "flat": make_node(nir.Flatten, input_type={"input": np.array([6, 2, 2])}, start_dim=0, end_dim=-1),
        "fc": make_node(nir.Affine, weight=(g.normal(size=(10, 24)) * 1.2).astype(np.float32),
                        bias=g.uniform(-0.1, 0.2, 10).astype(np.float32)),
        "out": tail or _lif((10,), np.linspace(0.7, 0.95, 10), 0.4),
        "output": make_node(nir.Output, output_type={"output": np.array([10])}),
    }
    names = list(nodes)
    return make_node(nir.NIRGraph, nodes=nodes, edges=list(zip(names[:-1], names[1:])), type_check=False)


def graph_model(timesteps=4, reset="zero", **parts):
    return import_graph(chain_graph(**parts), timesteps=timesteps, dt=DT, reset=reset)


def _counts(traced) -> np.ndarray:
    return np.stack([t[3] for t in traced])


@needs_cc
@pytest.mark.parametrize("timesteps,reset", [(1, "zero"), (4, "zero"), (6, "subtract")])
def test_float_graph_chain_runs_bit_exact_and_counts_pytorchs_output_spikes(tmp_path, timesteps, reset):
    model = graph_model(timesteps, reset)
    images = random_images(8, SHAPE, seed=timesteps)
    engine, traced = assert_bit_exact(tmp_path, model, images)
    assert [layer.kind for layer in engine.layers] == ["input_conv", "conv", "linear"]
    assert [layer.pool for layer in engine.layers] == [2, 2, 1] and engine.layers[-1].spiking
    assert engine.layers[0].border_bias is not None and engine.layers[1].bias is not None  # conv bias, v_leak
    counts = _counts(traced)
    assert counts.sum() > 0 and counts.max() <= timesteps
    # the logits are output spike counts: folding gains and the normalisation reorders float roundings, yet on
    # these images every count matches PyTorch's
    np.testing.assert_array_equal(counts, torch_logits(model, images).numpy())


@needs_cc
def test_quantized_masked_graph_chain_runs_integer_only_and_bit_exact(tmp_path):
    model = graph_model(4)
    generator = torch.Generator().manual_seed(3)
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            set_mask(model, f"{name}.weight", torch.rand(module.weight.shape, generator=generator) > 0.75)
    quantize_weights(model, 5)
    images = random_images(8, SHAPE, seed=11)
    engine, traced = assert_bit_exact(tmp_path, model, images)
    assert engine.integer and engine.logit_scale == 1.0 and engine.weight_bits == 5
    assert not engine.layers[-1].dense  # three quarters of the weights masked: stored sparse
    counts = _counts(traced)
    expected = torch_logits(model, images).numpy()
    # integer thresholds and biases are rounded to the membrane's unit: counts within one spike of PyTorch's
    assert counts.sum() > 0 and np.abs(counts - expected).max() <= 1
    assert (counts.argmax(1) == expected.argmax(1)).mean() >= 0.75


def _refused(model) -> str:
    with pytest.raises(UserError) as err:
        compile_engine(model, MEAN, STD)
    return str(err.value)


def test_graphs_the_engine_does_not_run_are_refused_naming_the_node():
    li = make_node(nir.LI, tau=np.full(10, 1e-3, np.float32), r=np.ones(10, np.float32), v_leak=np.zeros(10, np.float32))
    assert "node 'out' is li" in _refused(graph_model(tail=li))
    cuba = make_node(nir.CubaLIF, tau_syn=np.full((4, 8, 8), 2e-4, np.float32), tau_mem=np.full((4, 8, 8), 1e-3, np.float32),
                     r=np.ones((4, 8, 8), np.float32), v_leak=np.zeros((4, 8, 8), np.float32),
                     v_threshold=np.ones((4, 8, 8), np.float32), v_reset=np.zeros((4, 8, 8), np.float32))
    assert "synaptic current" in _refused(graph_model(head=cuba))
    varying = _lif((4, 8, 8), [0.5] * 4, 0.5)
    varying.v_threshold[0, 0, 0] = 0.7
    assert "differ within a channel" in _refused(graph_model(head=varying))
    assert "runs 3x3 convolutions" in _refused(graph_model(conv2=_conv(4, 6, 2, 0.5, kernel=1)))


def test_cli_refuses_an_li_readout_in_one_line_exit_2_nothing_written(tmp_path, capsys):
    li = make_node(nir.LI, tau=np.full(10, 1e-3, np.float32), r=np.ones(10, np.float32), v_leak=np.zeros(10, np.float32))
    ckpt = tmp_path / "graph.safetensors"
    save_checkpoint(ckpt, graph_model(tail=li), info={"dataset": "mnist"})
    out = tmp_path / "c"
    assert main(["export", str(ckpt), "--format", "c", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "li" in err and not out.exists()


@needs_cc
def test_cli_exports_a_graph_checkpoint_to_c(tmp_path, capsys):
    model = graph_model(3)
    ckpt = tmp_path / "graph.safetensors"
    save_checkpoint(ckpt, model, info={"dataset": "fashion-mnist"})
    out = tmp_path / "c"
    assert main(["export", str(ckpt), "--format", "c", "--out", str(out)]) == 0
    assert "3 layers" in capsys.readouterr().out
    subprocess.run(f"cc -O2 -o {tmp_path / 'snn'} {out}/*.c", shell=True, check=True)
    images = random_images(4, SHAPE, seed=2)
    lines = subprocess.run([str(tmp_path / "snn")], input=images.tobytes(), capture_output=True,
                           check=True).stdout.decode().splitlines()
    counts = np.array([[float(v) for v in line.split()[1:]] for line in lines])
    np.testing.assert_array_equal(counts, torch_logits(model, images).numpy())
