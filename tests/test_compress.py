"""Compression core: masks and quantizers on the module, storage equal to the footprint, the training loop."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file

from snncompress.checkpoint import (load_checkpoint, pack_signed, pack_uint, save_checkpoint, stored_bytes,
                                    unpack_signed, unpack_uint)
from snncompress.compress import (FixedPointQuantizer, UniformQuantizer, attach_quantizer, get_mask, get_masks,
                                  get_quantizers, quantize_weights, remove_masks, set_mask)
from snncompress.compress.quantizers import round_codes
from snncompress.compress.structure import channel_groups, narrow_model
from snncompress.metrics import footprint
from snncompress.models import build_model
from snncompress.training import QuantizeAfterStep, TrainConfig, train


def _convnet(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("convnet", 10, (1, 8, 8), 2, features=[6, "A"], classifier=[12], dropout=0.0)


def _half_mask(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.5


# ----------------------------------------------------------------------------- masks


def test_mask_lives_on_the_module_and_survives_to_state_dict_and_deepcopy():
    model = _convnet()
    mask = _half_mask(model.classifier[0].weight.shape)
    set_mask(model, "classifier.0.weight", mask)
    assert torch.equal(model.classifier[0].weight == 0, ~mask | (model.classifier[0].weight == 0))
    assert torch.all(model.classifier[0].weight[~mask] == 0)
    moved = copy.deepcopy(model).to(torch.float64)
    assert get_mask(moved, "classifier.0.weight").dtype == torch.bool          # .to(dtype) keeps it a mask
    assert torch.equal(get_mask(moved, "classifier.0.weight"), mask)
    state = model.state_dict()
    assert torch.equal(state["classifier.0.parametrizations.weight.0.mask"], mask)
    fresh = _convnet(seed=1)
    set_mask(fresh, "classifier.0.weight", torch.ones_like(mask))
    fresh.load_state_dict(state)
    assert torch.equal(get_mask(fresh, "classifier.0.weight"), mask)
    assert torch.equal(fresh.classifier[0].weight, model.classifier[0].weight)
    remove_masks(model)
    assert get_masks(model) == {} and torch.all(model.classifier[0].weight[~mask] == 0)


def test_masked_weight_stays_exactly_zero_and_gets_zero_gradient():
    model = _convnet()
    mask = _half_mask(model.features[0].weight.shape, seed=3)
    set_mask(model, "features.0.weight", mask)
    images, labels = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    grad = model.features[0].parametrizations.weight.original.grad
    assert torch.all(grad[~mask] == 0) and torch.count_nonzero(grad[mask]) > 0
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(3)]
    before = model.features[0].weight.detach().clone()
    train(model, batches, batches[:1], TrainConfig(epochs=2, lr=1e-2, weight_decay=0.1))
    after = model.features[0].weight.detach()
    assert torch.all(after[~mask] == 0)                                         # forward sees zeros
    assert torch.all(model.features[0].parametrizations.weight.original[~mask] == 0)  # storage too (weight decay)
    assert not torch.equal(after[mask], before[mask])                           # the kept weights trained


def test_masks_follow_their_channels_through_surgery():
    model = _convnet().eval()
    mask = _half_mask(model.classifier[0].weight.shape, seed=5)                # [12, 6*4*4]
    set_mask(model, "classifier.0.weight", mask)
    groups = channel_groups(model)
    keep = {g.name: torch.arange(0, g.size, 2) for g in groups}                 # every other channel
    narrow = narrow_model(model, keep, groups)
    columns = (keep["features.0"][:, None] * 16 + torch.arange(16)).flatten()
    expected = mask.index_select(0, keep["classifier.0"]).index_select(1, columns)
    assert torch.equal(get_mask(narrow, "classifier.0.weight"), expected)
    assert torch.all(narrow.classifier[0].weight[~expected] == 0)


# ----------------------------------------------------------------------------- quantizers


def test_rounding_modes_on_hand_values():
    r = torch.tensor([-1.5, -0.4, 0.5, 1.2, 2.7, 3.0 - 1e-6], dtype=torch.float64)
    assert round_codes(r, "nearest", False).tolist() == [-2.0, -0.0, 0.0, 1.0, 3.0, 3.0]     # ties to even
    assert round_codes(r, "half_up", False).tolist() == [-1.0, -0.0, 1.0, 1.0, 3.0, 3.0]
    assert round_codes(r, "truncate", False).tolist() == [-2.0, -1.0, 0.0, 1.0, 2.0, 3.0]    # on-grid 3 stays 3
    # stochastic: up w.p. the fraction, per value; 40000 seeded draws each, SE = sqrt(p (1 - p) / 40000)
    # (0.0022 at p = 0.25), bound 3.5 SE; a bias of 0.01 in the up-probability is off by 4.5 SE or more
    r = torch.tensor([0.25, -1.5, 2.9, -0.1, 7.6], dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    draws = round_codes(r[:, None].expand(-1, 40000), "stochastic", True, gen)
    low, p = torch.floor(r), r - torch.floor(r)
    assert ((draws == low[:, None]) | (draws == low[:, None] + 1)).all()
    se = (p * (1 - p) / 40000).sqrt()
    assert ((draws.mean(1) - r).abs() < 3.5 * se).all(), (draws.mean(1) - r) / se
    again = round_codes(r[:, None].expand(-1, 40000), "stochastic", True, torch.Generator().manual_seed(3))
    assert torch.equal(again, draws)                                                         # seeded


def test_uniform_quantizer_scale_codes_and_straight_through_gradient():
    w = torch.tensor([-1.0, -0.26, 0.0, 0.24, 0.55], requires_grad=True)
    q = UniformQuantizer(3).eval()                                              # q_max 3
    q.update_scale(w)
    assert q.scale.item() == pytest.approx(1 / 3)
    codes, scale = q.export(w)
    assert codes.tolist() == [-3, -1, 0, 1, 2] and scale.item() == pytest.approx(1 / 3)
    out = q(w)
    assert torch.equal(out, codes.float() * q.scale)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones(5))


def test_fixed_point_quantizer_saturates_at_its_range():
    q = FixedPointQuantizer(int_bits=1, frac_bits=2).eval()                     # Q(1.2): step 0.25, 4 bits
    assert q.bits == 4 and q.scale.item() == 0.25 and q.q_max == 7
    w = torch.tensor([0.3, -0.13, 5.0, -5.0])
    assert q(w).tolist() == [0.25, -0.25, 1.75, -1.75]


@pytest.mark.parametrize("rounding", ["nearest", "truncate", "half_up"])
def test_quantizer_export_and_reload_are_bit_exact(tmp_path, rounding):
    model = _convnet().eval()
    quantize_weights(model, 5, rounding)
    attach_quantizer(model, "features.1.threshold", FixedPointQuantizer(3, 6, rounding))
    path = tmp_path / "q.safetensors"
    save_checkpoint(path, model)
    loaded = load_checkpoint(path).model
    images = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    for name, q in get_quantizers(model).items():
        reloaded = get_quantizers(loaded)[name]
        assert torch.equal(reloaded.scale, q.scale) and reloaded.config() == q.config()
        codes, _ = q.export(q(getattr(*_owner(model, name))))
        again, _ = reloaded.export(getattr(*_owner(loaded, name)))
        assert torch.equal(codes, again)


def _owner(model, name):
    module, _, attr = name.rpartition(".")
    return model.get_submodule(module), attr


def test_quantize_after_step_keeps_stored_weights_on_the_grid():
    model = _convnet()
    quantize_weights(model, 4)
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    train(model, batches, batches[:1], TrainConfig(epochs=1, lr=1e-2), callbacks=[QuantizeAfterStep()])
    for name, q in get_quantizers(model).items():
        stored = _owner(model, name)[0].parametrizations[name.rpartition(".")[2]].original.detach()
        assert torch.equal(q.dequantize(q.codes(stored)), stored)


def test_per_channel_weight_scales_keep_a_row_that_one_scale_per_layer_rounds_to_zero():
    """Row 0 of a linear weight 100x larger than the rest: at 4 bits (codes -7..7) one scale per tensor is
    max|row 0| / 7, more than twice every other row's largest value, so those rows round to zero; one scale per
    row quantizes each row within half its own step."""
    weights = {}
    for per_channel in (False, True):
        model = _convnet()
        with torch.no_grad():
            model.classifier[0].weight[0] *= 100.0
        quantize_weights(model, 4, per_channel=per_channel, names=["classifier.0.weight"])
        weights[per_channel] = model.classifier[0].weight.detach().clone()
    w = _convnet().classifier[0].weight.detach().clone()
    w[0] *= 100.0
    assert torch.count_nonzero(weights[False][1:]) == 0
    assert torch.count_nonzero(weights[False][0]) > 0
    half_step = w.abs().amax(1, keepdim=True) / 7 / 2
    assert torch.all((weights[True] - w).abs() <= half_step * (1 + 1e-6))
    assert torch.count_nonzero(weights[True][1:]) > w[1:].numel() // 2


# ----------------------------------------------------------------------------- storage


def test_bit_packing_round_trips():
    values = torch.tensor([0, 1, 5, 7, 3, 6, 2])
    assert pack_uint(values, 3).numel() == math.ceil(7 * 3 / 8)
    assert torch.equal(unpack_uint(pack_uint(values, 3), 3, 7), values)
    codes = torch.tensor([-2048, -1, 0, 1, 2047, -7])
    assert torch.equal(unpack_signed(pack_signed(codes, 12), 12, 6), codes)


def _storage_case(case: str):
    model = _convnet().eval()
    if case == "bits5_per_channel":
        quantize_weights(model, 5, per_channel=True)
    elif case.startswith("bits"):
        quantize_weights(model, int(case[4:]))
    elif case == "masked":
        set_mask(model, "classifier.0.weight", _half_mask(model.classifier[0].weight.shape, seed=7))  # bitmap
        set_mask(model, "classifier.3.weight", torch.rand(10, 12) < 0.05)                         # csr
    elif case == "masked_bits5":
        set_mask(model, "classifier.0.weight", _half_mask(model.classifier[0].weight.shape, seed=8))
        quantize_weights(model, 5)
    return model


@pytest.mark.parametrize("case", ["dense", "bits3", "bits5", "bits7", "bits12", "bits5_per_channel", "masked",
                                  "masked_bits5"])
def test_checkpoint_bytes_equal_the_footprint(tmp_path, case):
    """Tensor bytes in the file == footprint bytes, up to < 1 byte per packed array (3 arrays per tensor at most)."""
    model = _storage_case(case)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model)
    fp = footprint(model)
    arrays = load_file(str(path))
    slack = len(arrays)                                  # each packed array rounds up to whole bytes
    assert fp["bytes"] <= stored_bytes(path) <= fp["bytes"] + slack
    if case != "dense":
        assert fp["bytes"] < footprint(_convnet())["bytes"]
    formats = {v["format"] for k, v in fp["tensors"].items()}
    if case == "masked":
        assert formats == {"dense", "bitmap", "csr"}
    loaded = load_checkpoint(path).model
    images = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    assert footprint(loaded)["bytes"] == fp["bytes"]
    assert {k: torch.equal(v, get_masks(model)[k]) for k, v in get_masks(loaded).items()} == \
        {k: True for k in get_masks(model)}


def test_dense_quantized_weights_cost_their_bits_plus_one_scale():
    model = _storage_case("bits5")
    fp = footprint(model)
    weights = sum(model.get_submodule(n.rpartition(".")[0]).weight.numel() for n in get_quantizers(model))
    assert fp["by_kind"]["weight"] == weights * 5 + 3 * 32


def test_state_quantizer_survives_a_checkpoint_and_is_not_a_stored_tensor(tmp_path):
    model = _convnet().eval()
    lif = dict(model.spiking_layers())["features.1"]
    lif.state_quantizer = FixedPointQuantizer(2, 4)
    path = tmp_path / "s.safetensors"
    save_checkpoint(path, model)
    assert not any("state_quantizer" in k for k in load_file(str(path)))
    loaded = load_checkpoint(path).model
    reloaded = dict(loaded.spiking_layers())["features.1"].state_quantizer
    assert reloaded.config() == lif.state_quantizer.config() and reloaded.scale.item() == 2.0 ** -4
    images = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_stochastic_rounding_is_drawn_once_and_the_quantized_model_is_fixed(tmp_path):
    torch.manual_seed(2)
    model = _convnet().eval()
    quantize_weights(model, 3, "stochastic")
    q = get_quantizers(model)["classifier.0.weight"]
    stored = model.classifier[0].parametrizations.weight.original.detach()
    assert torch.equal(q.dequantize(q.codes(stored, stochastic=False)), stored)   # already on the grid
    images = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        first, second = model(images), model(images)
    assert torch.equal(first, second)
    path = tmp_path / "s.safetensors"
    save_checkpoint(path, model)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(path).model(images), first)
    plain = _convnet().eval()
    quantize_weights(plain, 3, "nearest")
    assert not torch.equal(plain.classifier[0].weight, model.classifier[0].weight)  # draws differ from nearest


def test_a_copy_and_its_original_do_not_share_parametrizations():
    """torch keeps a parametrized module's class in a deep copy; changing the copy must not break the original."""
    from snncompress.compress import remove_quantizer
    from snncompress.compress.state import frozen

    model = _convnet().eval()
    set_mask(model, "classifier.0.weight", _half_mask(model.classifier[0].weight.shape))
    quantize_weights(model, 4)
    images = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        expected = model(images)
        copied = copy.deepcopy(model)
        remove_masks(copied)
        remove_quantizer(copied, "features.0.weight")
        attach_quantizer(copied, "features.0.bias" if copied.features[0].bias is not None else "classifier.3.weight",
                         UniformQuantizer(3))
        plain = frozen(model)
        assert torch.equal(plain(images), expected)            # burned in: same logits, no parametrizations
        assert not any(hasattr(m, "parametrizations") for m in plain.modules())
        assert torch.equal(model(images), expected)            # the original still computes what it did
    assert sorted(get_quantizers(model)) == ["classifier.0.weight", "classifier.3.weight", "features.0.weight"]
    assert list(get_masks(model)) == ["classifier.0.weight"]
