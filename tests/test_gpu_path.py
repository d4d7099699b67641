"""The GPU training path run on CPU tensors: device-held data, bf16, channels_last, compile, time budget."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from snncompress.data import TensorBatchLoader
from snncompress.models import build_model
from snncompress.neuron import LIF
from snncompress.training import TrainConfig, seed_everything, train
from snncompress.training import loop, speed


def rgb_loader(n=64, batch=16, seed=5) -> TensorBatchLoader:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=gen)
    labels = (images.float().mean((1, 2, 3)) > 127.5).long()
    return TensorBatchLoader(images, labels, [0.5] * 3, [0.25] * 3, batch, shuffle=True, augment=True, seed=seed)


def small_model():
    seed_everything(0)
    return build_model("convnet", 2, (3, 8, 8), 2, features=[4, "A", 8], classifier=[8],
                       neuron={"threshold": 0.3}).set_spiking(True)


def trained(cfg: TrainConfig, loader=None):
    model, loader = small_model(), loader or rgb_loader()
    history = train(model, loader, loader, cfg)
    return model, history


def test_a_loader_moved_to_the_device_yields_the_same_batches_there():
    held, moved = rgb_loader(), rgb_loader().to(torch.device("cpu"))
    for epoch in range(2):
        for (a, la), (b, lb) in zip(held, moved):
            assert torch.equal(a, b) and torch.equal(la, lb)
    assert moved.epoch == held.epoch == 2
    assert moved.images.dtype == torch.uint8  # held as bytes; normalised per batch


def test_the_lif_integrates_a_bf16_current_in_float32():
    lif = LIF(reset="soft", threshold=0.5)
    current = (torch.randn(4, 3, 16) * 0.7).to(torch.bfloat16)
    spikes = lif(current)
    assert spikes.dtype == torch.float32
    assert torch.equal(spikes, LIF(reset="soft", threshold=0.5)(current.float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model = small_model()
        out = model(rgb_loader().first_images(4))
    assert out.dtype == torch.bfloat16  # the classifier ran in bf16; the LIFs inside did not


def test_bf16_training_learns_and_keeps_float32_parameters_and_optimizer_state():
    fp32, hist32 = trained(TrainConfig(epochs=3, lr=1e-2))
    bf16, hist16 = trained(TrainConfig(epochs=3, lr=1e-2, precision="bf16"))
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    assert hist16[-1]["train_loss"] < hist16[0]["train_loss"]
    assert hist16[-1]["train_loss"] == pytest.approx(hist32[-1]["train_loss"], abs=0.05)
    weight32 = fp32.state_dict()["features.0.weight"]
    weight16 = bf16.state_dict()["features.0.weight"]
    assert 0 < (weight16 - weight32).abs().max() < 0.05  # bf16 changes rounding, not the course


def test_channels_last_trains_the_same_weights_and_hands_back_the_default_layout():
    plain, _ = trained(TrainConfig(epochs=2, lr=1e-2))
    nhwc, _ = trained(TrainConfig(epochs=2, lr=1e-2, channels_last=True))
    for (name, a), b in zip(plain.state_dict().items(), nhwc.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name
        assert b.is_contiguous(), name


@pytest.mark.slow
def test_compile_switch_gives_the_eager_weights(monkeypatch):
    # a backend that records each graph dynamo hands it and each call of the compiled code (no C++ build);
    # CompiledForward signals a fallback by a RuntimeWarning and by dropping its compiled callable (None)
    graphs, calls, forwards = [], [], []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            calls.append(len(graphs))
            return gm.forward(*args)
        return run

    class Recorded(speed.CompiledForward):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            forwards.append(self)

    torch._dynamo.reset()  # no graph cached by an earlier test stands in for this compile
    monkeypatch.setattr(speed, "COMPILE_BACKEND", counting_backend)
    monkeypatch.setattr(loop, "CompiledForward", Recorded)
    eager, _ = trained(TrainConfig(epochs=1, lr=1e-2))
    assert not forwards and not graphs                       # the switch off compiles nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)        # a fallback would warn: fail on it
        compiled, _ = trained(TrainConfig(epochs=1, lr=1e-2, compile=True))
    assert len(forwards) == 1 and forwards[0].compiled is not None   # no fallback recorded
    # dynamo captured the forward (conv layers included) and the 4 training batches ran the captured code
    assert graphs and any("conv2d" in str(g.graph) for g in graphs)
    assert len(calls) >= 4
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_a_compile_failure_falls_back_to_eager_once_with_a_warning(monkeypatch):
    calls = []

    def broken_compile(module, backend=None):
        def run(*args):
            calls.append(1)
            raise RuntimeError("no C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager, _ = trained(TrainConfig(epochs=1, lr=1e-2))
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed \(RuntimeError: no C\+\+ compiler found\)"):
        fallen, _ = trained(TrainConfig(epochs=1, lr=1e-2, compile=True))
    assert calls == [1]
    for a, b in zip(eager.state_dict().values(), fallen.state_dict().values()):
        assert torch.equal(a, b)


def fake_clock(step_s: float):
    ticks = itertools.count()
    return staticmethod(lambda: next(ticks) * step_s)


def test_a_time_budget_stops_cleanly_and_says_so(monkeypatch, capsys):
    monkeypatch.setattr(loop._Run, "clock", fake_clock(1.0))
    _, history = trained(TrainConfig(epochs=5, lr=1e-2, time_budget_s=2.5))
    assert len(history) == 1
    assert history[-1]["stopped"] == "time budget of 2.5 s reached at epoch 1, batch 1"
    assert "time budget of 2.5 s reached at epoch 1, batch 1: training stops here" in capsys.readouterr().out


def test_a_time_budget_shortens_the_cosine_schedule_to_the_epochs_that_fit(monkeypatch, capsys):
    # the fake clock: an epoch spans 9 reads (its start, then 2 per batch for 4 batches) of 0.1 s
    monkeypatch.setattr(loop._Run, "clock", fake_clock(0.1))
    _, history = trained(TrainConfig(epochs=10, lr=1e-2, time_budget_s=3.5))
    out = capsys.readouterr().out
    assert "time budget of 3.5 s fits 3 of 10 epochs (0.9 s each): the schedule now ends after epoch 3" in out
    assert len(history) == 3 and "stopped" not in history[-1]
    assert history[-1]["lr"] == pytest.approx(loop.cosine_lr(11, 12, 1e-2))  # the last step of a 12-step cosine


def test_a_load_stage_naming_a_missing_or_foreign_file_stops_before_writing(tmp_path, capsys):
    from snncompress import cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {dataset: mnist-builtin}\nstages: [{kind: load, checkpoint: nowhere.safetensors},"
                      " {kind: evaluate}]\n")
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == ("snncompress: error: recipe r.yaml: stages[0] (load): checkpoint: "
                                               "checkpoint not found: nowhere.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x80\x04junk")
    recipe.write_text(recipe.read_text().replace("nowhere", str(tmp_path / "bad")))
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "pickles are never loaded" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
