"""The C engine (snncompress.deploy.c): the compiled C equals its numpy reference bit for bit
(spikes per layer per timestep, membranes, logits) on small random models of every supported
kind; the float engine's logits agree with PyTorch's; the CLI's driver contract end to end;
one-line refusals for what the engine does not run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from snncompress.checkpoint import save_checkpoint
from snncompress.cli import main
from snncompress.compress.masks import set_mask
from snncompress.compress.quantizers import (FixedPointQuantizer, UniformQuantizer, attach_quantizer,
                                             quantize_weights, weight_names)
from snncompress.deploy.c import EXPORT_FILES, c_sources, compile_engine, run_reference
from snncompress.models import build_model

CC = shutil.which("cc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler (cc) on PATH: the C engine cannot be built")
MEAN, STD = (0.2860,), (0.3530,)


def make_model(seed=0, timesteps=3, features=(4, "A", 6, "A"), classifier=(12,), batchnorm=False,
               reset="soft", per_channel=False, in_shape=(1, 8, 8), gain=3.0, threshold=0.3):
    """A small random spiking VGG whose layers all spike on random images."""
    torch.manual_seed(seed)
    model = build_model("convnet", 10, in_shape, timesteps, features=list(features), classifier=list(classifier),
                        batchnorm=batchnorm, neuron={"threshold": threshold, "reset": reset,
                                                     "per_channel": per_channel})
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(gain)
        for _, lif in model.spiking_layers():
            if per_channel:
                lif.leak.copy_(torch.rand_like(lif.leak) * 0.5 + 0.5)
                lif.threshold.copy_(torch.rand_like(lif.threshold) * 0.4 + 0.1)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(-1.5, 1.5)  # negative gains too: the integer engine folds their sign
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def random_images(n, shape=(1, 8, 8), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def build(folder: Path, engine, *defines, pack_weights: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in c_sources(engine, "test", pack_weights).items():
        (folder / name).write_text(text)
    binary = folder / "snn"
    sources = [str(folder / name) for name in EXPORT_FILES if name.endswith(".c")]
    subprocess.run([CC, "-O2", "-std=c99", "-Wall", "-Werror", *defines, "-o", str(binary), *sources], check=True)
    return binary


def parse_trace(text: str, integer: bool):
    """Per image: (spikes {(t, l): indices}, membranes {(t, l): values}, prediction, logits)."""
    images, spikes, mems = [], {}, {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split()
        if parts[0] == "S":
            spikes[(int(parts[1]), int(parts[2]))] = [int(v) for v in parts[3:]]
        elif parts[0] == "M":
            raw = parts[3:]
            mems[(int(parts[1]), int(parts[2]))] = (np.array([int(v) for v in raw], dtype=np.int64) if integer else
                                                    np.array([int(v, 16) for v in raw], dtype=np.uint32).view(np.float32))
        else:
            logits = np.array([int(v) for v in parts[1:]], dtype=np.int64) if integer else \
                np.array([float(v) for v in parts[1:]], dtype=np.float32)
            images.append((spikes, mems, int(parts[0]), logits))
            spikes, mems = {}, {}
    return images


def assert_bit_exact(tmp_path, model, images, name="m", pack_weights=False):
    engine = compile_engine(model, MEAN, STD)
    binary = build(tmp_path / name, engine, "-DSNN_TRACE", pack_weights=pack_weights)
    out = subprocess.run([str(binary)], input=images.tobytes(), capture_output=True, check=True).stdout.decode()
    traced = parse_trace(out, engine.integer)
    assert len(traced) == len(images)
    spiking_layers = [i for i, l in enumerate(engine.layers) if l.spiking]
    total_spikes = 0
    for image, (spikes, mems, predicted, logits) in zip(images, traced):
        ref = run_reference(engine, image)
        for t in range(engine.timesteps):
            for j, l in enumerate(spiking_layers):
                assert spikes[(t, l)] == ref.spikes[t][j].tolist(), (t, l)
                np.testing.assert_array_equal(mems[(t, l)], ref.membranes[t][j])
                total_spikes += len(spikes[(t, l)])
        np.testing.assert_array_equal(logits, ref.logits)
        assert predicted == ref.prediction
    assert total_spikes > 0
    return engine, traced


def torch_logits(model, images):
    x = (torch.from_numpy(images).float() / 255 - MEAN[0]) / STD[0]
    with torch.no_grad():
        return model(x)


# ----------------------------------------------------------------------------- float engine


@needs_cc
@pytest.mark.parametrize("timesteps,reset,per_channel,batchnorm", [
    (1, "soft", False, False), (3, "hard", True, False), (5, "soft", True, True), (8, "hard", False, True),
])
def test_float_engine_bit_exact_and_close_to_torch(tmp_path, timesteps, reset, per_channel, batchnorm):
    model = make_model(timesteps=timesteps, reset=reset, per_channel=per_channel, batchnorm=batchnorm)
    images = random_images(6)
    engine, traced = assert_bit_exact(tmp_path, model, images)
    assert not engine.integer
    c_logits = torch.tensor(np.stack([t[3] for t in traced]))
    # folding the normalisation and BatchNorm reorders float roundings: close, not equal
    torch.testing.assert_close(c_logits, torch_logits(model, images), rtol=1e-4, atol=1e-5)


@needs_cc
def test_masked_model_is_stored_sparse_and_bit_exact(tmp_path):
    model = make_model(timesteps=4, classifier=(16,))
    generator = torch.Generator().manual_seed(1)
    for name in weight_names(model):
        weight = dict(model.named_parameters())[name]
        set_mask(model, name, torch.rand(weight.shape, generator=generator) > 0.6)
    images = random_images(5, seed=3)
    engine, traced = assert_bit_exact(tmp_path, model, images)
    event_layers = engine.layers[1:]
    assert all(not layer.dense for layer in event_layers)
    kept = sum(int(layer.weights.size) for layer in event_layers)
    stored = sum(int((getattr(m, "weight") != 0).sum()) for m in model.modules()
                 if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert kept == stored - int((model.features[0].weight != 0).sum())
    torch.testing.assert_close(torch.tensor(np.stack([t[3] for t in traced])), torch_logits(model, images),
                               rtol=1e-4, atol=1e-5)


@needs_cc
def test_narrow_vgg_with_two_pools_and_two_hidden_layers(tmp_path):
    # a channel-pruned (narrowed) VGG: odd widths, a double pooling, two hidden linear layers
    model = make_model(timesteps=2, features=(3, 5, "A", "A", 7), classifier=(9, 11), in_shape=(3, 8, 8),
                       batchnorm=True)
    images = random_images(4, shape=(3, 8, 8), seed=5)
    engine = compile_engine(model, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    binary = build(tmp_path / "vgg", engine, "-DSNN_TRACE")
    out = subprocess.run([str(binary)], input=images.tobytes(), capture_output=True, check=True).stdout.decode()
    for image, (spikes, mems, predicted, logits) in zip(images, parse_trace(out, False)):
        ref = run_reference(engine, image)
        np.testing.assert_array_equal(logits, ref.logits)
        assert [spikes[(t, l)] for t in range(2) for l in range(4)] == \
            [ref.spikes[t][l].tolist() for t in range(2) for l in range(4)]
    assert engine.layers[1].pool == 4 and engine.layers[2].in_shape == (5, 2, 2)


# ----------------------------------------------------------------------------- integer engine


@needs_cc
@pytest.mark.parametrize("bits,timesteps,reset,per_channel,batchnorm", [
    (8, 1, "soft", False, False), (6, 4, "hard", True, False), (4, 3, "soft", False, True), (3, 8, "soft", True, True),
])
def test_uniform_quantized_engine_is_integer_and_bit_exact(tmp_path, bits, timesteps, reset, per_channel, batchnorm):
    model = make_model(timesteps=timesteps, reset=reset, per_channel=per_channel, batchnorm=batchnorm)
    quantize_weights(model, bits)
    images = random_images(6, seed=bits)
    engine, traced = assert_bit_exact(tmp_path, model, images)
    assert engine.integer and engine.layers[1].weights.dtype == np.int32
    assert np.abs(engine.layers[1].weights).max() <= 2 ** (bits - 1) - 1
    # integer logits times their scale approximate PyTorch's float logits
    real = np.stack([t[3] for t in traced]) * engine.logit_scale
    expected = torch_logits(model, images).numpy()
    assert np.abs(real - expected).max() <= 0.05 * np.abs(expected).max() + 1e-6


@needs_cc
def test_fixed_point_and_per_channel_weights_with_quantized_membrane(tmp_path):
    model = make_model(timesteps=4, per_channel=True)
    names = weight_names(model)
    attach_quantizer(model, names[0], FixedPointQuantizer(2, 5))
    attach_quantizer(model, names[1], UniformQuantizer(5, channels=6))
    attach_quantizer(model, names[2], FixedPointQuantizer(1, 6))
    attach_quantizer(model, names[3], UniformQuantizer(7, channels=10))  # per-class logit units
    for i, (_, lif) in enumerate(model.spiking_layers()):
        state = UniformQuantizer(8)
        state.scale.fill_(0.01 * (i + 1))
        lif.state_quantizer = state
    images = random_images(6, seed=11)
    engine, _ = assert_bit_exact(tmp_path, model, images)
    assert engine.integer and engine.layers[1].state_mul is not None
    assert len(set(engine.logit_mul.tolist())) > 1


@needs_cc
def test_float_model_with_quantized_membrane(tmp_path):
    model = make_model(timesteps=3)
    for _, lif in model.spiking_layers():
        lif.state_quantizer = UniformQuantizer(6)
        lif.state_quantizer.scale.fill_(0.05)
    assert_bit_exact(tmp_path, model, random_images(4, seed=2))


@needs_cc
@pytest.mark.parametrize("bits", [{"weights": 5, "neurons": 6, "state": 8}, {"weights": 4, "neurons": 4}])
def test_tiny_snn_candidates_run_integer_and_bit_exact(tmp_path, bits):
    """What the tinySNN exploration picks (fixed-point weights per channel, power-of-two thresholds and leaks,
    a quantized membrane) compiles to the integer engine unchanged."""
    from snncompress.compress.exploration import Candidate, QuantSpace, quantize_model

    space = QuantSpace({group: [width] for group, width in bits.items()}, per_channel=True)
    model = quantize_model(make_model(timesteps=4, per_channel=True), Candidate.of(bits, "nearest"), space)
    engine, _ = assert_bit_exact(tmp_path, model, random_images(6, seed=3))
    assert engine.integer
    assert (engine.layers[1].state_mul is not None) == ("state" in bits)


@needs_cc
def test_a_channel_whose_weights_decayed_to_nothing_is_silenced_not_refused(tmp_path):
    """A hidden channel with weights of ~1e-38 gets a power-of-two scale of ~2^-127: its threshold would need
    more than an int32 membrane. It can never fire, so the engine zeroes its codes and runs as PyTorch does."""
    from snncompress.compress.exploration import Candidate, QuantSpace, quantize_model

    model = make_model(timesteps=4, per_channel=True)
    with torch.no_grad():
        model.classifier[0].weight[3] *= 1e-38
    quantized = quantize_model(model, Candidate.of({"weights": 5}, "nearest"),
                               QuantSpace({"weights": [5]}, per_channel=True))
    images = random_images(6, seed=5)
    engine, traced = assert_bit_exact(tmp_path, quantized, images)
    hidden = engine.layers[2]
    assert hidden.name == "classifier.0" and hidden.dense  # fan-out layout: [inputs, outputs]
    assert not np.any(hidden.weights.reshape(-1, hidden.out_shape[0])[:, 3]) and np.any(hidden.weights)
    assert hidden.frac_bits > 0
    assert [t[2] for t in traced] == torch_logits(quantized, images).argmax(1).tolist()


def test_pack_codes_round_trips_by_hand():
    from snncompress.deploy.c.emit import pack_codes, signed_bits

    assert [signed_bits(*r) for r in ((0, 0), (-1, 0), (-2, 1), (-63, 63), (-64, 63), (-64, 64), (-128, 127))] == \
        [1, 1, 2, 7, 7, 8, 8]
    # 3-bit codes -1, 3, -4, 2 -> fields 0b111, 0b011, 0b100, 0b010 -> bits (LSB first) 111 110 001 010
    assert pack_codes(np.array([-1, 3, -4, 2]), 3).tolist() == [0b00011111, 0b0101, 0]


@needs_cc
@pytest.mark.parametrize("bits", [3, 5, 7])
def test_packed_weights_are_bit_exact_and_take_their_width_in_flash(tmp_path, bits):
    """Dense and masked (sparse) layers with b-bit codes, stored as a b-bit stream: same spikes, membranes
    and logits as the reference, and the weight arrays hold ceil(n * b / 8) + 1 bytes per layer."""
    from snncompress.deploy.c.emit import pack_codes

    model = make_model(timesteps=3, per_channel=True, features=(4, "A", 16, "A"), classifier=(32,))
    names = weight_names(model)
    for name in names[1:3]:  # the hidden conv and linear layers keep 15%: stored sparse
        weight = dict(model.named_parameters())[name]
        set_mask(model, name, torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) < 0.15)
    for name in names:
        attach_quantizer(model, name, UniformQuantizer(bits, channels=None))
    engine, _ = assert_bit_exact(tmp_path, model, random_images(5, seed=4), pack_weights=True)
    assert engine.integer and [l.dense for l in engine.layers] == [True, False, False, True]
    source = (tmp_path / "m" / "snn_model.c").read_text()
    assert f"#define SNN_PACKED_BITS {bits}" in (tmp_path / "m" / "snn_model.h").read_text()
    for i, l in enumerate(engine.layers):
        assert f"static const uint8_t w{i}[{len(pack_codes(l.weights, bits))}]" in source
        assert len(pack_codes(l.weights, bits)) == -(-l.weights.size * bits // 8) + 1


# ----------------------------------------------------------------------------- CLI and driver contract


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snncompress.cli", *map(str, args)], capture_output=True, text=True)


@needs_cc
def test_cli_export_compile_and_driver_contract(tmp_path):
    model = make_model(timesteps=3, in_shape=(1, 28, 28), features=(4, "A", 6, "A"), classifier=(10,))
    ckpt = tmp_path / "model.safetensors"
    save_checkpoint(ckpt, model, info={"dataset": "fashion-mnist"})
    out = tmp_path / "c"
    result = _cli("export", ckpt, "--format", "c", "--out", out)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPORT_FILES)
    subprocess.run(f"{CC} -O2 -o {tmp_path / 'snn'} {out}/*.c", shell=True, check=True)
    images = random_images(5, shape=(1, 28, 28), seed=7)
    run = subprocess.run([str(tmp_path / "snn"), "--spikes"], input=images.tobytes(), capture_output=True, check=True)
    lines = run.stdout.decode().splitlines()
    assert len(lines) == 5
    engine = compile_engine(model, MEAN, STD)
    for image, line in zip(images, lines):
        head, spikes = line.split(" | ")
        fields = head.split()
        ref = run_reference(engine, image)
        assert int(fields[0]) == ref.prediction
        np.testing.assert_array_equal(np.array(fields[1:], dtype=np.float32), ref.logits)
        assert [int(v) for v in spikes.split()] == [sum(len(ref.spikes[t][l]) for t in range(3)) for l in range(3)]
    partial = subprocess.run([str(tmp_path / "snn")], input=images.tobytes()[:-1], capture_output=True)
    assert partial.returncode == 1 and len(partial.stdout.decode().splitlines()) == 4


@pytest.mark.parametrize("arch,options,message", [
    ("resnet20", {}, "ResNets"),
    ("convnet", {"encoding": "poisson"}, "poisson"),
    ("diehl_cook", {}, "Diehl & Cook"),
])
def test_refusals_one_line_exit_2_nothing_written(tmp_path, capsys, arch, options, message):
    shape = (1, 28, 28) if arch != "resnet20" else (3, 32, 32)
    model = build_model(arch, 10, shape, 2, **options)
    ckpt = tmp_path / "model.safetensors"
    save_checkpoint(ckpt, model, info={"dataset": "fashion-mnist"})
    out = tmp_path / "c"
    assert main(["export", str(ckpt), "--format", "c", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not out.exists()


def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    ckpt = tmp_path / "model.safetensors"
    save_checkpoint(ckpt, make_model(), info={"dataset": "fashion-mnist"})
    target = tmp_path / "file"
    target.write_text("keep")
    assert main(["export", str(ckpt), "--format", "c", "--out", str(target)]) == 2
    assert "not a folder" in capsys.readouterr().err and target.read_text() == "keep"


def test_export_stage_format_c_writes_the_folder_and_checks_predictions(tmp_path):
    from types import SimpleNamespace

    from snncompress.stages.base import StageContext
    from snncompress.stages.export import ExportOptions, export

    model = make_model(timesteps=3)
    pixels = torch.from_numpy(random_images(8, seed=4))
    images = (pixels.float() / 255 - MEAN[0]) / STD[0]
    stage_dir = tmp_path / "stages" / "04-export"
    ctx = StageContext(recipe=None, run_dir=tmp_path, stage_dir=stage_dir, device=torch.device("cpu"),
                       train_loader=None, val_loader=[(images, torch.zeros(8, dtype=torch.long))], test_loader=None,
                       info=SimpleNamespace(mean=MEAN, std=STD), model=model)
    result = export(ctx, ExportOptions(name="export", format="c"))
    assert result.model is None
    assert sorted(p.name for p in (stage_dir / "c").iterdir()) == sorted(EXPORT_FILES)
    assert result.metrics["c_verify_images"] == 8 and result.metrics["c_integer"] is False
    expected = torch_logits(model, pixels.numpy()).argmax(1)
    engine = compile_engine(model, MEAN, STD)
    agree = sum(run_reference(engine, p).prediction == int(e) for p, e in zip(pixels.numpy(), expected))
    assert result.metrics["c_agreeing_predictions"] == agree >= 7


def test_firing_point_is_exactly_pytorchs_spike_test():
    from snncompress.deploy.c.engine import firing_point

    rng = np.random.default_rng(0)
    for thr in [np.float32(v) for v in (0.3, 1.0, 0.818, 2.2, 1e-3, 7.77)] + list(rng.random(200, dtype=np.float32) + 1e-3):
        u = firing_point(thr)
        below = np.nextafter(u, np.float32(0))
        assert u / thr - np.float32(1) >= 0 and below / thr - np.float32(1) < 0
        near = np.float32(thr) + np.arange(-8, 9, dtype=np.float32) * np.spacing(thr)
        assert np.array_equal(near >= u, near / thr - np.float32(1) >= 0)


@needs_cc
@pytest.mark.parametrize("quantized,adds,muls", [
    # float: 4 positions x 4 in-image taps (add + multiply each); 4 spikes: 4 soft-reset subtractions
    # and 4 x 2 output additions; 2 logit additions
    (False, 16 + 4 + 8 + 2, 16),
    # integer: the same 16 tap products, then per position one input-scale multiply-add and two
    # additions (rounding, border bias); resets, output and logits as above
    (True, 16 + 4 + 8 + 4 + 8 + 2, 16 + 4),
])
def test_counting_build_matches_a_hand_count(tmp_path, quantized, adds, muls):
    model = build_model("convnet", 2, (1, 2, 2), 1, features=[1], classifier=[], neuron={"threshold": 0.01})
    with torch.no_grad():
        model.features[0].weight.fill_(1.0)
        model.classifier[0].weight.fill_(0.5)
    if quantized:
        quantize_weights(model, 8)
    engine = compile_engine(model.eval(), MEAN, STD)
    binary = build(tmp_path / "count", engine, "-DSNN_COUNT_OPS")
    image = np.full((1, 1, 2, 2), 255, dtype=np.uint8)
    line = subprocess.run([str(binary), "--spikes"], input=image.tobytes(), capture_output=True,
                          check=True).stdout.decode().split(" | ")
    assert line[1].split() == ["4"]                     # every neuron fired once
    assert [int(v) for v in line[2].split()] == [adds, muls]


def test_checkpoint_without_dataset_needs_dataset_option(tmp_path, capsys):
    ckpt = tmp_path / "model.safetensors"
    save_checkpoint(ckpt, make_model(), info={})
    out = tmp_path / "c"
    assert main(["export", str(ckpt), "--format", "c", "--out", str(out)]) == 2
    assert "does not record its dataset" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(ckpt), "--format", "c", "--out", str(out), "--dataset", "mnist"]) == 0
    model_c = (out / "snn_model.c").read_text()
    mnist = compile_engine(make_model(), (0.1307,), (0.3081,))
    assert f"{float(mnist.layers[0].border_bias[0, 0]):.9g}f" in model_c  # MNIST's normalisation folded in
