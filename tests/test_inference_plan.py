"""The lean inference plan computes exactly the eager model's logits, and says where it does not apply."""

import os
import shutil

import pytest
import torch

from snncompress.kernels import cpu
from snncompress.deploy.plan import build_inference_plan
from snncompress.metrics.latency import inference_form, measure_latency
from snncompress.models import build_model

needs_cext = pytest.mark.skipif((shutil.which("cc") is None and shutil.which("gcc") is None)
                                or os.environ.get("SNNCOMPRESS_NO_CEXT", "") not in ("", "0"),
                                reason="no C compiler (or disabled)")


def _convnet(timesteps: int, *, per_channel: bool = False, reset: str = "soft", batchnorm: bool = False,
             dtype=torch.float32):
    torch.manual_seed(0)
    model = build_model("convnet", 10, (1, 12, 12), timesteps, batchnorm=batchnorm,
                        neuron={"per_channel": per_channel, "reset": reset, "threshold": 0.3, "leak": 0.9},
                        features=[6, "A", 8, "A"], classifier=[16])
    with torch.no_grad():
        for _, lif in model.spiking_layers():  # distinct per-channel values
            lif.threshold.mul_(torch.rand_like(lif.threshold) + 0.5)
        for layer in model.classifier:  # the DIET init (std 0.01) leaves a small net silent
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, 2.0 / layer.in_features ** 0.5)
    return model.to(dtype).eval()


@needs_cext
@pytest.mark.parametrize("timesteps,per_channel,reset,batchnorm,dtype", [
    (1, False, "soft", False, torch.float32),
    (4, False, "soft", False, torch.float32),
    (3, True, "hard", True, torch.float32),
    (2, True, "soft", False, torch.float64),
])
def test_plan_logits_equal_eager_logits(timesteps, per_channel, reset, batchnorm, dtype):
    model = _convnet(timesteps, per_channel=per_channel, reset=reset, batchnorm=batchnorm, dtype=dtype)
    images = torch.randn(5, 1, 12, 12, generator=torch.Generator().manual_seed(1)).to(dtype)
    plan = build_inference_plan(model, fold_batchnorm=False)
    assert plan is not None
    plan.train()  # inference only: stays in eval mode
    assert not plan.training and not model.training
    with torch.inference_mode():
        eager, lean = model(images), plan(images)
    assert eager.abs().sum() > 0 and eager.std() > 0, "the test net must spike for the comparison to mean anything"
    assert lean.shape == (5, 10) and lean.dtype == dtype
    assert torch.equal(eager, lean)


def _with_trained_batchnorm(model):
    """Running statistics and affine parameters far from the identity, as training leaves them."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            c = bn.num_features
            bn.running_mean.copy_(torch.randn(c, generator=generator) * 0.3)
            bn.running_var.copy_(torch.rand(c, generator=generator) * 2 + 0.2)
            bn.weight.copy_(torch.rand(c, generator=generator) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=generator) * 0.1)
    return model


@needs_cext
@pytest.mark.parametrize("timesteps,dtype", [(1, torch.float32), (4, torch.float32), (3, torch.float64)])
def test_folded_batchnorm_plan_matches_eager_logits(timesteps, dtype):
    """Folding removes every BatchNorm step and keeps the logits to float rounding (no spike flips on these
    images: a flip would move a logit by a whole weight); the unfolded plan is bit-identical."""
    model = _with_trained_batchnorm(_convnet(timesteps, per_channel=True, batchnorm=True, dtype=dtype))
    images = torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(1)).to(dtype)
    folded, exact = build_inference_plan(model), build_inference_plan(model, fold_batchnorm=False)
    batchnorms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert batchnorms == 2 and len(exact.steps) - len(folded.steps) == batchnorms
    with torch.inference_mode():
        eager, lean = model(images), folded(images)
        assert torch.equal(exact(images), eager)
    assert eager.abs().sum() > 0 and eager.std() > 0
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(lean, eager, rtol=0, atol=tolerance * eager.abs().max().item())
    assert torch.equal(lean.argmax(1), eager.argmax(1))


@needs_cext
def test_folded_plan_reads_the_weights_at_build_time():
    """The folded layer is a copy: a later weight change reaches the unfolded plan, not the folded one."""
    model = _with_trained_batchnorm(_convnet(2, batchnorm=True))
    images = torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    folded, exact = build_inference_plan(model), build_inference_plan(model, fold_batchnorm=False)
    with torch.inference_mode():
        before = folded(images)
        model.features[0].weight.mul_(3.0)
        assert torch.equal(folded(images), before)
        assert not torch.equal(exact(images), before)


@needs_cext
def test_plan_covers_a_model_trained_with_lean_memory():
    from snncompress.training.memory import lean_memory

    model = lean_memory(_convnet(2))
    plan = build_inference_plan(model)
    assert plan is not None
    images = torch.randn(3, 1, 12, 12)
    with torch.inference_mode():
        assert torch.equal(plan(images), model(images))


@needs_cext
def test_plan_sees_weight_updates_of_its_model():
    model = _convnet(2)
    plan = build_inference_plan(model)
    images = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        model.classifier[-1].weight.mul_(2.0)
        assert torch.equal(plan(images), model(images))


def test_plan_declines_what_it_does_not_cover():
    resnet = build_model("resnet20", 10, (3, 16, 16), 2)
    poisson = build_model("convnet", 10, (1, 12, 12), 2, encoding="poisson", features=[4, "A"], classifier=[8])
    ann = build_model("convnet", 10, (1, 12, 12), 2, features=[4, "A"], classifier=[8]).ann_twin()
    for model in (resnet, poisson, ann):
        assert build_inference_plan(model) is None
        assert inference_form(model, "plan", build_inference_plan)[1] == "eager"


@needs_cext
def test_latency_reports_the_form_it_timed():
    model = _convnet(1)
    images = torch.randn(1, 1, 12, 12)
    assert measure_latency(model, images, repeats=2, warmup=1, build_plan=build_inference_plan)["latency_form"] == "plan"
    assert measure_latency(model, images, repeats=2, warmup=1, form="eager", build_plan=build_inference_plan)["latency_form"] == "eager"
    with pytest.raises(ValueError, match="latency form"):
        measure_latency(model, images, repeats=1, form="fast", build_plan=build_inference_plan)
    assert cpu.cext_available()


def test_subnormal_values_are_flushed_for_deployment():
    from snncompress.compress.state import flush_subnormals_

    model = _convnet(2)
    with torch.no_grad():
        model.classifier[0].weight[:, :5] = 1e-40                    # subnormal in float32
        model.features[0].weight[0, 0, 0, 0] = -3e-39
    images = torch.randn(3, 1, 12, 12)
    with torch.inference_mode():
        before = model(images)
    assert flush_subnormals_(model) == 16 * 5 + 1
    assert torch.all(model.classifier[0].weight[:, :5] == 0) and model.features[0].weight[0, 0, 0, 0] == 0
    with torch.inference_mode():
        assert torch.allclose(model(images), before, atol=1e-30)
    assert flush_subnormals_(model) == 0


@needs_cext
def test_plan_runs_at_its_tuned_thread_count_and_restores_the_process_setting():
    model = _convnet(1)
    plan = build_inference_plan(model)
    images = torch.randn(1, 1, 12, 12)
    process = torch.get_num_threads()
    timings = plan.tune_threads(images, repeats=3)
    assert sorted(timings) == list(range(1, process + 1)) and plan.threads == min(timings, key=timings.get)
    with torch.inference_mode():
        assert torch.equal(plan(images), model(images))
    assert torch.get_num_threads() == process
    measured = measure_latency(model, images, repeats=2, warmup=1, build_plan=build_inference_plan)
    assert 1 <= measured["latency_threads"] <= measured["latency_threads_available"] == process
    assert measured["latency_subnormals_flushed"] == 0
