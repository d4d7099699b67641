"""Networks: shapes, twin parameter names, encoding reuse, checkpoint round trips."""

import pytest
import torch

from snncompress import UserError, build_from_spec, build_model, load, load_checkpoint, save_checkpoint
from snncompress.compress import set_mask
from snncompress.models import MODEL_NAMES


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_runs_as_snn_and_ann(name):
    shape = (1, 28, 28) if name == "convnet" else (3, 32, 32)
    model = build_model(name, 10, shape, 2)
    images = torch.randn(2, *shape)
    assert model(images).shape == (2, 10)
    twin = model.ann_twin()
    assert twin(images).shape == (2, 10)
    assert [n for n, _ in twin.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert model.spiking and not twin.spiking


def test_snn_logits_are_sums_over_timesteps():
    """Sequential T-step evaluation of the classifier equals the summed logits."""
    torch.manual_seed(0)
    model = build_model("convnet", 10, (1, 28, 28), 3, features=[4, "A"], classifier=[])
    model.eval()
    images = torch.randn(2, 1, 28, 28)
    captured = []
    model.classifier[-1].register_forward_hook(lambda m, i, o: captured.append(o))
    logits = model(images)
    per_step = captured[0].reshape(3, 2, 10)
    assert torch.allclose(logits, per_step.sum(0), atol=1e-6)


def test_conv1_runs_once_per_image_with_direct_input():
    model = build_model("convnet", 10, (1, 28, 28), 5)
    shapes = []
    model.features[0].register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    model(torch.randn(3, 1, 28, 28))
    assert shapes == [(3, 1, 28, 28)]            # not T*B = 15


def test_poisson_encoding_changes_with_time_and_runs():
    model = build_model("convnet", 10, (1, 28, 28), 4, encoding="poisson")
    inputs = []
    model.features[0].register_forward_hook(lambda m, i, o: inputs.append(i[0]))
    images = torch.rand(3, 1, 28, 28) * 2 - 1
    model(images)
    assert [tuple(x.shape) for x in inputs] == [(12, 1, 28, 28)]
    frames = inputs[0].reshape(4, 3, 1, 28, 28)
    assert set(frames.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert (frames * images.sign() >= 0).all()                       # a spike carries its pixel's sign
    for t in range(1, 4):
        assert not torch.equal(frames[t], frames[0]), t               # a fresh draw every step


def test_poisson_encoding_is_a_signed_spike_train_at_rate_abs_x():
    from snncompress.encoding import encode

    x = torch.tensor([[0.0, 0.1, 0.5, 0.9, 1.0, -0.3, -0.8, -1.0]])
    spikes = encode(x, 20000, "poisson", torch.Generator().manual_seed(4))
    assert spikes.shape == (20000, 1, 8)
    assert set(spikes.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert torch.equal(spikes[:, 0, 0], torch.zeros(20000))           # x = 0: never fires
    assert torch.equal(spikes[:, 0, 4], torch.ones(20000)) and torch.equal(spikes[:, 0, 7], -torch.ones(20000))
    assert (spikes[:, 0, 1:5] >= 0).all() and (spikes[:, 0, 5:] <= 0).all()  # the sign of x, every step
    # rate per pixel = |x|: 20000 steps, SE = sqrt(|x| (1 - |x|) / 20000) <= 0.0036; bound 3.5 SE
    rate, p = spikes.abs().mean(0)[0], x.abs()[0]
    se = (p * (1 - p) / 20000).sqrt()
    assert ((rate - p).abs() <= 3.5 * se).all(), (rate - p) / se
    # frames differ over t and the draws are independent from step to step: P(spike at t and t+1) = x^2
    assert (spikes[1:] != spikes[:-1]).any(0)[0, 1:4].all()
    # (overlapping pairs: variance per pair p^2 (1 - p^2) + 2 p^3 (1 - p) = 0.3125 at p = 0.5, SE 0.0040)
    both = (spikes[1:, 0, 2] != 0) & (spikes[:-1, 0, 2] != 0)
    assert abs(both.double().mean().item() - 0.25) < 3.5 * (0.3125 / 19999) ** 0.5
    again = encode(x, 20000, "poisson", torch.Generator().manual_seed(4))
    assert torch.equal(again, spikes)                                 # seeded


def test_dropout_mask_is_fixed_over_time():
    from snncompress.models.base import TimeDropout

    drop = TimeDropout(0.5).train()
    x = torch.ones(4, 8, 16)
    y = drop(x, has_time=True)
    assert torch.equal(y[0], y[3]) and (y[0] == 0).any() and (y[0] == 2).any()


def _complex_model():
    torch.manual_seed(1)
    model = build_model("resnet19", 10, (3, 16, 16), 2, width_mult=0.125, batchnorm=True,
                        neuron={"per_channel": True})
    with torch.no_grad():
        for _, lif in model.spiking_layers():
            lif.threshold.uniform_(0.2, 0.8)
            lif.leak.uniform_(0.5, 1.0)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_checkpoint_round_trip_reproduces_outputs_exactly(tmp_path):
    model = _complex_model()
    weight = "blocks.0.conv1.weight"
    mask = torch.rand_like(dict(model.named_parameters())[weight]) > 0.5
    set_mask(model, weight, mask)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, info={"dataset": "cifar10"})
    images = torch.randn(4, 3, 16, 16)
    loaded = load_checkpoint(path)
    assert torch.equal(model(images), loaded.model(images))
    assert torch.equal(loaded.masks[weight], mask)
    assert loaded.info["dataset"] == "cifar10"
    assert loaded.model.spec == model.spec


def test_format1_checkpoint_with_integer_weights_still_loads(tmp_path):
    """Checkpoints written before format 2 (dense state dict, int8 weights + scale, uint8 masks) still load."""
    import json

    from safetensors.torch import save_file

    from snncompress.checkpoint import META_KEY

    model = build_model("convnet", 10, (1, 28, 28), 2, features=[4, "A"], classifier=[8]).eval()
    name = "features.0.weight"
    w = dict(model.named_parameters())[name]
    scale = (w.abs().max() / 7).reshape(())
    ints = torch.round(w / scale).clamp(-7, 7)
    with torch.no_grad():
        w.copy_(ints * scale)
    mask = torch.rand(8, 4 * 14 * 14) < 0.5
    with torch.no_grad():
        model.classifier[0].weight.mul_(mask)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors[name] = ints.to(torch.int8)
    tensors[f"{name}@scale"] = scale.to(torch.float32)
    tensors["classifier.0.weight@mask"] = mask.to(torch.uint8)
    meta = {"format": 1, "spec": model.spec, "quant": {name: {"bits": 4}}, "masks": ["classifier.0.weight"],
            "info": {}}
    path = tmp_path / "old.safetensors"
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})
    loaded = load_checkpoint(path)
    assert loaded.quantizers[name].bits == 4 and torch.equal(loaded.masks["classifier.0.weight"], mask)
    images = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(images), loaded.model(images))


def test_ann_mode_survives_a_checkpoint(tmp_path):
    model = build_model("convnet", 10, (1, 28, 28), 2).set_spiking(False)
    save_checkpoint(tmp_path / "a.safetensors", model)
    assert load(tmp_path / "a.safetensors").spiking is False


def test_incompatible_checkpoint_is_a_user_error(tmp_path):
    model = build_model("convnet", 10, (1, 28, 28), 2)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="not a snncompress checkpoint"):
        load(bad)
    # a spec that disagrees with the stored tensors
    other = build_model("convnet", 10, (1, 28, 28), 2, features=[8, "A"])
    from snncompress.checkpoint import META_KEY
    from safetensors.torch import load_file, save_file
    import json
    tensors = load_file(str(path))
    meta = {"format": 1, "spec": other.spec, "quant": {}, "masks": [], "info": {}}
    save_file(tensors, str(bad), metadata={META_KEY: json.dumps(meta)})
    with pytest.raises(UserError, match="does not match"):
        load(bad)


def test_unknown_model_and_bad_spec_are_user_errors():
    with pytest.raises(UserError, match="unknown model"):
        build_model("vgg99", 10, (3, 32, 32), 4)
    with pytest.raises(UserError, match="timesteps"):
        build_from_spec({**build_model("convnet", 10, (1, 28, 28), 2).spec, "timesteps": 0})
