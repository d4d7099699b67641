"""Every registered LIF backend (snncompress.kernels) against the lif_step loop.

Spikes must match exactly; gradients of current, leak and threshold to
floating-point tolerance (the backward recurrence sums in another order than
autograd). Also: how the kernels register themselves; lean-memory packing, layer
checkpointing, the fast average pool and the inference preparation leave outputs
and gradients unchanged.
"""

from __future__ import annotations

import copy
import itertools
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from snncompress import build_model
from snncompress.deploy import prepare_for_inference
from snncompress.kernels import cpu, lif_cpu, lif_torch
from snncompress.training.memory import checkpoint_layers, lean_memory
from snncompress.neuron import (LIF, LIF_BACKENDS, SURROGATE_TABLE, SURROGATES, LIFState, Surrogate,
                                lif_multistep, lif_step, select_backend)

TOL = {torch.float32: 2e-5, torch.float64: 1e-11}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids barrier waits on a busy 2-core runner (the
    multi-threaded kernel path has its own test below)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _params(kind: str, channels: int, ndim: int, dtype):
    """Leak / threshold: scalar (0-dim) or per-channel shaped to broadcast over [B, C, ...]."""
    g = torch.Generator().manual_seed(1)
    if kind == "scalar":
        return torch.tensor(0.8, dtype=dtype), torch.tensor(1.1, dtype=dtype)
    shape = (channels,) + (1,) * (ndim - 2)
    leak = torch.rand(shape, generator=g, dtype=dtype) * 0.5 + 0.5
    thr = torch.rand(shape, generator=g, dtype=dtype) + 0.5
    if kind == "mixed":  # scalar leak, per-channel threshold
        leak = torch.tensor(0.9, dtype=dtype)
    return leak, thr


def lif_step_loop(current, leak, threshold, reset="soft", surrogate="linear", scale=None):
    """The reference every backend is held to: spikes ``[T, B, ...]`` of :func:`lif_step` over ``t``."""
    state, spikes = LIFState.initial(current[0]), []
    for t in range(current.shape[0]):
        o, state = lif_step(current[t], state, leak, threshold, reset, surrogate, scale)
        spikes.append(o)
    return torch.stack(spikes)


def _run(fn, current, leak, thr, reset, surrogate, scale=None):
    current = current.detach().clone().requires_grad_(True)
    leak = leak.detach().clone().requires_grad_(True)
    thr = thr.detach().clone().requires_grad_(True)
    out = fn(current, leak, thr, reset, surrogate, scale)
    weight = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    (out * weight).sum().backward()
    return out.detach(), current.grad, leak.grad, thr.grad


def _assert_match(ref, got, dtype):
    assert 0 < ref[0].sum() < ref[0].numel(), "degenerate case: no spikes or only spikes"
    assert torch.equal(ref[0], got[0]), "spikes differ from the reference"
    for name, a, b in zip(("current", "leak", "threshold"), ref[1:], got[1:]):
        assert a.shape == b.shape, name
        scale = a.abs().max().clamp_min(1e-12)
        err = ((a - b).abs().max() / scale).item()
        assert err <= TOL[dtype], f"grad {name}: relative error {err:.3g}"


def _current(steps, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((steps, *shape), generator=g, dtype=dtype) * 1.5


NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: Device each registered backend is tested on (Triton needs CUDA; the others run on CPU).
DEVICE = {"triton": "cuda"}

#: Every registered backend, by name; a backend added to the registry is tested here too.
BACKENDS = [pytest.param(name, id=name, marks=[NO_CUDA] if DEVICE.get(name) == "cuda" else [])
            for name in sorted(LIF_BACKENDS)]

#: The fused ones (everything but the reference itself).
FUSED = [p for p in BACKENDS if p.values[0] != "reference"]


def _backend(name: str):
    """The registered function and the device to test it on."""
    return LIF_BACKENDS[name], DEVICE.get(name, "cpu")


def test_backends_registered_and_auto_picks_cpu():
    assert set(LIF_BACKENDS) == {"reference", "cpu", "torch", "triton"}
    assert LIF_BACKENDS["cpu"] is lif_cpu and LIF_BACKENDS["torch"] is lif_torch
    assert LIF_BACKENDS["reference"] is lif_multistep
    x = torch.zeros(2, 1, 3)
    assert select_backend("auto", x) is lif_cpu
    assert select_backend("reference", x) is lif_multistep


def _python(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
def test_importing_neuron_registers_kernels_through_the_package():
    """neuron.py never imports the kernels; ``import snncompress.neuron`` still registers them
    (it runs ``snncompress/__init__.py`` first, which imports ``snncompress.kernels``)."""
    import ast

    import snncompress.neuron as neuron

    tree = ast.parse(open(neuron.__file__, encoding="utf-8").read())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert imported and not any("kernels" in m for m in imported)
    proc = _python("""
        import sys
        import snncompress.neuron as n
        assert "snncompress.kernels" in sys.modules
        print(sorted(n.LIF_BACKENDS))
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[0] == "['cpu', 'reference', 'torch', 'triton']"


@pytest.mark.slow
def test_broken_kernels_module_only_warns():
    proc = _python("""
        import sys, warnings
        class Broken:
            def find_spec(self, name, path=None, target=None):
                if name == "snncompress.kernels":
                    raise RuntimeError("kernels broken for the test")
        sys.meta_path.insert(0, Broken())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            from snncompress.neuron import LIF, LIF_BACKENDS
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert any("kernels broken for the test" in m for m in msgs), msgs
        assert sorted(LIF_BACKENDS) == ["reference"], LIF_BACKENDS
        out = LIF(threshold=0.5)(torch.ones(3, 2, 4))
        print(out[:, 0, 0].tolist())
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[1.0, 1.0, 1.0]"


@pytest.mark.skipif((shutil.which("cc") is None and shutil.which("gcc") is None)
                    or os.environ.get("SNNCOMPRESS_NO_CEXT", "") not in ("", "0"),
                    reason="no C compiler (or disabled)")
def test_c_kernel_builds():
    assert cpu.cext_available(), cpu.build_error()


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reset", ["soft", "hard"])
@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("params", ["scalar", "channel", "mixed"])
def test_conv_layer_matches_step_loop(name, dtype, reset, surrogate, params):
    fn, dev = _backend(name)
    for steps in (1, 3, 8):
        current = _current(steps, (3, 5, 4, 6), dtype, seed=steps).to(dev)
        leak, thr = (p.to(dev) for p in _params(params, 5, 4, dtype))
        ref = _run(lif_step_loop, current, leak, thr, reset, surrogate)
        _assert_match(ref, _run(fn, current, leak, thr, reset, surrogate), dtype)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("params", ["scalar", "channel"])
def test_linear_layer_and_custom_scale(name, params):
    fn, dev = _backend(name)
    current = _current(5, (4, 7), torch.float64).to(dev)
    leak, thr = (p.to(dev) for p in _params(params, 7, 2, torch.float64))
    for (surrogate, scale), reset in itertools.product(
            (("linear", 0.5), ("atan", 3.0), ("fast_sigmoid", 10.0)), ("soft", "hard")):
        ref = _run(lif_step_loop, current, leak, thr, reset, surrogate, scale)
        _assert_match(ref, _run(fn, current, leak, thr, reset, surrogate, scale), torch.float64)


def test_hand_computed_trace_for_every_backend():
    """Leak 0.5, thr 1, soft reset, inputs 0.6, 0.6, 0.9, 0.2: u = 0.6, 0.9, 1.35 (spike), 0.375.

    Linear surrogate sg = 0.3 * (1 - |u - 1|) = 0.18, 0.27, 0.195, 0.1125. For L = sum(o), with
    the spike detached in the reset: dL/du[t] = sg[t] + 0.5 * dL/du[t+1] = 0.3778125, 0.395625,
    0.25125, 0.1125 (= dL/dI); dL/dleak = sum_t dL/du[t] * u_hat[t-1] (u_hat = 0.6, 0.9, 0.35)
    = 0.502875; dL/dthr = -sum_t sg[t] * u[t] - 0.5 * dL/du[3] (the one reset) = -0.7126875.
    """
    for param in BACKENDS:
        name = param.values[0]
        fn, dev = _backend(name)
        if dev == "cuda" and not torch.cuda.is_available():
            continue
        current = torch.tensor([0.6, 0.6, 0.9, 0.2], dtype=torch.float64, device=dev).view(4, 1, 1)
        current.requires_grad_(True)
        leak = torch.tensor(0.5, dtype=torch.float64, device=dev, requires_grad=True)
        thr = torch.tensor(1.0, dtype=torch.float64, device=dev, requires_grad=True)
        out = fn(current, leak, thr, "soft", "linear")
        out.sum().backward()
        assert out.flatten().tolist() == [0.0, 0.0, 1.0, 0.0], name
        assert current.grad.flatten().tolist() == pytest.approx([0.3778125, 0.395625, 0.25125, 0.1125],
                                                                abs=1e-12), name
        assert leak.grad.item() == pytest.approx(0.502875, abs=1e-12), name
        assert thr.grad.item() == pytest.approx(-0.7126875, abs=1e-12), name


@pytest.mark.parametrize("name", FUSED)
def test_surrogate_without_kernel_formula_runs_the_reference(name, monkeypatch):
    """A surrogate added to the table but not to the C / Triton kernels must not run a wrong KIND."""
    monkeypatch.setitem(SURROGATE_TABLE, "box", Surrogate(lambda z, s: s * (z.abs() < 0.5).to(z.dtype), 0.4))
    assert "box" not in cpu.SURROGATE_IDS
    fn, dev = _backend(name)
    current = _current(4, (2, 3, 4), torch.float64).to(dev)
    leak, thr = (p.to(dev) for p in _params("channel", 3, 3, torch.float64))
    ref = _run(lif_step_loop, current, leak, thr, "soft", "box")
    got = _run(fn, current, leak, thr, "soft", "box")
    assert ref[1].abs().sum() > 0
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


def test_kernel_surrogate_ids_follow_the_table():
    assert list(cpu.SURROGATE_IDS) == list(SURROGATES[:cpu.KERNEL_SURROGATES])
    assert list(cpu.SURROGATE_IDS.values()) == list(range(cpu.KERNEL_SURROGATES))


@pytest.mark.parametrize("name", BACKENDS)
def test_time_broadcast_channels_last_and_strided_inputs(name):
    fn, dev = _backend(name)
    leak, thr = (p.to(dev) for p in _params("channel", 6, 4, torch.float32))
    # conv1 output broadcast over T (stride 0), as the models feed the first LIF
    base = torch.randn(3, 6, 5, 5, device=dev)
    expanded = base.unsqueeze(0).expand(4, *base.shape)
    _assert_match(_run(lif_step_loop, expanded, leak, thr, "hard", "atan"),
                  _run(fn, expanded, leak, thr, "hard", "atan"), torch.float32)
    leaf = base.clone().requires_grad_(True)
    out = fn(leaf.unsqueeze(0).expand(4, *leaf.shape), leak, thr)
    if fn is lif_cpu and cpu.cext_available():  # gradient summed over t inside the kernel
        assert type(out.grad_fn.next_functions[0][0]).__name__ == "AccumulateGrad"
    out.sum().backward()
    ref_leaf = base.clone().requires_grad_(True)
    lif_step_loop(ref_leaf.unsqueeze(0).expand(4, *leaf.shape), leak, thr).sum().backward()
    assert ref_leaf.grad.abs().sum() > 0
    assert torch.allclose(leaf.grad, ref_leaf.grad, rtol=1e-5, atol=1e-6)
    # channels_last timesteps (fold_time of a channels_last conv output)
    cl = torch.randn(12, 6, 5, 5, device=dev).contiguous(memory_format=torch.channels_last)
    cl = cl.view(4, 3, 6, 5, 5)
    _assert_match(_run(lif_step_loop, cl, leak, thr, "soft", "linear"),
                  _run(fn, cl, leak, thr, "soft", "linear"), torch.float32)
    # a non-dense view
    strided = torch.randn(4, 3, 5, 5, 6, device=dev).permute(0, 1, 4, 2, 3)
    _assert_match(_run(lif_step_loop, strided, leak, thr, "soft", "linear"),
                  _run(fn, strided, leak, thr, "soft", "linear"), torch.float32)


@pytest.mark.parametrize("params", ["scalar", "channel"])
def test_multithreaded_kernel_path(params):
    """Large enough for the OpenMP path (per-thread parameter-gradient accumulators)."""
    torch.set_num_threads(2)
    current = _current(3, (4, 16, 24, 24), torch.float32)  # 36864 neurons per step
    leak, thr = _params(params, 16, 4, torch.float32)
    for reset in ("soft", "hard"):
        _assert_match(_run(lif_step_loop, current, leak, thr, reset, "linear"),
                      _run(lif_cpu, current, leak, thr, reset, "linear"), torch.float32)


def test_buffers_inference_mode_and_fallbacks():
    current = _current(4, (2, 3, 4, 4), torch.float32)
    leak, thr = _params("channel", 3, 4, torch.float32)
    ref = lif_step_loop(current, leak, thr)
    # fixed (non-trainable) leak / threshold, grad only to the current
    x = current.clone().requires_grad_(True)
    out = lif_cpu(x, leak, thr)
    weights = torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).cos()
    (out * weights).sum().backward()
    x_ref = current.clone().requires_grad_(True)
    (lif_multistep(x_ref, leak, thr, "soft", "linear") * weights).sum().backward()
    assert torch.equal(out.detach(), ref)
    assert x.grad.abs().sum() > 0  # the surrogate passes gradient here, so the comparison below is not 0 == 0
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert leak.grad is None and thr.grad is None
    with torch.inference_mode():
        out = lif_cpu(current, leak.requires_grad_(), thr.requires_grad_())
    assert torch.equal(out, ref) and out.grad_fn is None
    # unsupported dtype / parameter shape / membrane output -> reference path, same results
    half = lif_cpu(current.to(torch.bfloat16), leak.to(torch.bfloat16), thr.to(torch.bfloat16))
    assert torch.equal(half, lif_step_loop(current.to(torch.bfloat16), leak.to(torch.bfloat16),
                                           thr.to(torch.bfloat16)))
    odd = torch.rand(4, 4) + 0.5  # broadcasts over H, W: not a per-channel layout
    assert torch.equal(lif_cpu(current, leak, odd), lif_step_loop(current, leak, odd))
    s, u = lif_cpu(current, leak, thr, return_membrane=True)
    assert torch.equal(s, ref)


def test_without_c_compiler_everything_falls_back(monkeypatch):
    monkeypatch.setattr(cpu, "load_library", lambda: None)
    current = _current(4, (2, 3, 4, 4), torch.float64)
    leak, thr = _params("channel", 3, 4, torch.float64)
    _assert_match(_run(lif_step_loop, current, leak, thr, "hard", "atan"),
                  _run(lif_cpu, current, leak, thr, "hard", "atan"), torch.float64)
    assert cpu.avg_pool_fast(torch.randn(1, 2, 4, 4), 2) is None
    assert cpu.pack_u8((torch.rand(20000) < 0.5).float()) is not None  # torch path


def test_lif_module_uses_fast_backend_and_matches():
    torch.manual_seed(0)
    for per_channel in (False, True):
        mods = [LIF(leak=0.9, threshold=0.7, per_channel=per_channel, num_channels=4, backend=b)
                for b in ("reference", "cpu")]
        x = torch.randn(5, 2, 4, 3, 3)
        grads = []
        for m in mods:
            xi = x.clone().requires_grad_(True)
            out = m(xi)
            (out * torch.arange(out.numel()).reshape(out.shape).cos()).sum().backward()
            grads.append((out.detach(), xi.grad, m.leak.grad, m.threshold.grad))
        _assert_match(grads[0], grads[1], torch.float32)


def test_pack_u8_is_exact_and_rejects_other_values():
    spikes = (torch.rand(70000) < 0.3).float()
    pooled = torch.nn.functional.avg_pool2d(spikes[:65536].view(1, 4, 128, 128), 2)
    for x in (spikes, pooled.contiguous()):
        q = cpu.pack_u8(x, 16.0)
        assert q is not None and q.dtype == torch.uint8
        assert torch.equal(q.float() / 16.0, x)
    assert cpu.pack_u8(torch.randn(70000), 16.0) is None
    assert cpu.pack_u8(-spikes, 16.0) is None


def _train_step(model, x, y, seed=1):
    torch.manual_seed(seed)
    out = model(x)
    torch.nn.functional.cross_entropy(out, y).backward()
    return (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()})


@pytest.mark.parametrize("arch,shape,opts", [
    ("vgg5", (3, 16, 16), {"features": [8, "A", 16, 16, "A"], "classifier": [32]}),
    ("convnet", (1, 12, 12), {"conv_dropout": 0.2}),
    ("resnet20", (3, 8, 8), {"batchnorm": True, "width_mult": 0.125}),
])
def test_lean_memory_and_checkpointing_give_identical_training(arch, shape, opts):
    torch.manual_seed(0)
    base = build_model(arch, 10, shape, 3, neuron={"threshold": 0.3, "per_channel": True}, **opts)
    x, y = torch.randn(4, *shape), torch.randint(0, 10, (4,))
    ref = _train_step(copy.deepcopy(base), x, y)
    for lean, ckpt in ((True, False), (False, True), (True, True)):
        model = copy.deepcopy(base)
        if lean:
            lean_memory(model)
        if ckpt:
            checkpoint_layers(model)
        got = _train_step(model, x, y)
        assert torch.equal(ref[0], got[0])
        for name in ref[1]:
            assert torch.equal(ref[1][name], got[1][name]), (lean, ckpt, name)
        for name in ref[2]:  # BatchNorm running stats are not updated twice by recompute
            assert torch.equal(ref[2][name], got[2][name]), (lean, ckpt, name)
        twin = model.ann_twin()  # settings survive deepcopy and work in ANN mode
        twin(x).sum().backward()
    lean_memory(model, False)
    checkpoint_layers(model, False)
    assert type(model.features[2]) is torch.nn.AvgPool2d if arch == "vgg5" else True


def test_lean_conv_chunked_backward(monkeypatch):
    from snncompress.training import memory as ck

    monkeypatch.setattr(ck, "CHUNK_MIN", 1)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, stride=2, bias=True)
    lean = copy.deepcopy(conv)
    lean.__class__ = ck.LeanConv2d
    for x in ((torch.rand(10, 4, 9, 9) < 0.3).float(), torch.randn(10, 4, 9, 9)):  # packed / not
        grads = []
        for m in (conv, lean):
            xi = x.clone().requires_grad_(True)
            y = m(xi)
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
            grads.append((y.detach(), xi.grad, m.weight.grad.clone(), m.bias.grad.clone()))
            m.zero_grad()
        assert torch.equal(grads[0][0], grads[1][0])
        for a, b in zip(grads[0][1:], grads[1][1:]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_lean_memory_actually_packs_spikes():
    model = lean_memory(build_model("vgg5", 10, (3, 16, 16), 2, neuron={"threshold": 0.3},
                                    features=[16, "A", 16, "A"], classifier=[32]))
    from snncompress.training import memory as ck

    packed = []
    orig = ck._pack

    def spy(t):
        r = orig(t)
        packed.append(r is not t)
        return r

    ck._pack = spy
    try:
        model(torch.randn(8, 3, 16, 16)).sum().backward()
    finally:
        ck._pack = orig
    assert any(packed)


def test_fast_avg_pool_bit_identical():
    for dtype in (torch.float32, torch.float64):
        for shape, k in (((2, 3, 9, 11), 2), ((2, 3, 7, 10), 3), ((4, 8, 8), 2)):
            x = torch.randn(*shape, dtype=dtype, requires_grad=True)
            y0 = torch.nn.functional.avg_pool2d(x, k)
            g = torch.randn_like(y0)
            (g0,) = torch.autograd.grad(y0, x, g)
            y1 = cpu.avg_pool_fast(x, k)
            if y1 is None:
                assert shutil.which("cc") is None and shutil.which("gcc") is None, "a C compiler exists but the kernel did not load"
                pytest.skip("no C compiler: the C kernel cannot be built")
            (g1,) = torch.autograd.grad(y1, x, g)
            assert torch.equal(y0, y1) and torch.equal(g0, g1)


def test_prepare_for_inference_keeps_outputs():
    torch.manual_seed(0)
    for arch, shape in (("convnet", (1, 12, 12)), ("resnet20", (3, 8, 8))):
        kw = {"width_mult": 0.125, "batchnorm": True} if arch == "resnet20" else {}
        model = build_model(arch, 10, shape, 3, neuron={"threshold": 0.3, "backend": "reference"}, **kw)
        model.eval()
        x = torch.randn(3, *shape)
        with torch.inference_mode():
            ref = model(x)
            fast = prepare_for_inference(copy.deepcopy(model))(x)
        assert torch.allclose(ref, fast, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- Triton
@NO_CUDA
def test_triton_is_auto_on_gpu_and_matches_in_lif():
    """The registered "triton" backend is tested in the backend tests above; here: "auto" picks it
    on CUDA tensors and a LIF layer on the GPU gives the reference layer's spikes and gradients."""
    import snncompress.kernels as kernels
    from snncompress.kernels.triton_lif import lif_triton

    assert select_backend("auto", torch.zeros(1, 1, device="cuda")) is LIF_BACKENDS["triton"]
    torch.manual_seed(0)
    for per_channel, reset in itertools.product((False, True), ("soft", "hard")):
        x = torch.randn(6, 2, 4, 3, 3, device="cuda")
        results = []
        for backend in ("reference", "auto"):
            m = LIF(leak=0.9, threshold=0.7, reset=reset, per_channel=per_channel, num_channels=4,
                    backend=backend).cuda()
            xi = x.clone().requires_grad_(True)
            out = m(xi)
            (out * torch.arange(out.numel(), device="cuda").reshape(out.shape).cos()).sum().backward()
            results.append([t.cpu() for t in (out.detach(), xi.grad, m.leak.grad, m.threshold.grad)])
        _assert_match(*results, torch.float32)
    assert kernels._triton_impl is lif_triton  # the Triton kernel ran, not the lif_torch fallback


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test covers Triton")
def test_triton_kernel_logic_in_interpreter():
    """Without a GPU, run the Triton kernels in Triton's CPU interpreter on a few cases."""
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import itertools, torch
        from snncompress.neuron import LIFState, lif_step, surrogate_scale
        from snncompress.kernels import triton_lif as tl_
        def step_loop(cur, lk, th, reset, surr):
            state, spikes = LIFState.initial(cur[0]), []
            for t in range(cur.shape[0]):
                o, state = lif_step(cur[t], state, lk, th, reset, surr)
                spikes.append(o)
            return torch.stack(spikes)
        def run(fn, cur, lk, th, reset, surr):
            cur, lk, th = (t.clone().requires_grad_(True) for t in (cur, lk, th))
            o = fn(cur, lk, th, reset, surr)
            (o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape)).sum().backward()
            return o.detach(), cur.grad, lk.grad, th.grad
        def tri(cur, lk, th, reset, surr):
            return tl_._LIFTriton.apply(cur, lk, th, reset == "hard", surr,
                                        surrogate_scale(surr), tl_.channel_layout(cur, lk, th))
        torch.manual_seed(0)
        for dt, reset, surr, pc in [(torch.float32, "soft", "linear", False),
                                    (torch.float64, "hard", "atan", True),
                                    (torch.float32, "hard", "fast_sigmoid", True)]:
            cur = torch.randn(4, 2, 3, 4, 5, dtype=dt) * 1.5
            lk = torch.rand(3, 1, 1, dtype=dt) * 0.5 + 0.5 if pc else torch.tensor(0.8, dtype=dt)
            th = torch.rand(3, 1, 1, dtype=dt) + 0.5 if pc else torch.tensor(1.1, dtype=dt)
            a, b = run(step_loop, cur, lk, th, reset, surr), run(tri, cur, lk, th, reset, surr)
            assert torch.equal(a[0], b[0])
            for x, y in zip(a[1:], b[1:]):
                assert ((x - y).abs().max() / x.abs().max().clamp_min(1e-12)) < 1e-5
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_lean_memory_covers_masked_and_quantized_convolutions():
    """Parametrized convs (a mask, a quantizer) take the lean path too, with the same gradients, and
    get their own class back afterwards."""
    from snncompress.compress import quantize_weights, set_mask

    torch.manual_seed(0)
    base = build_model("vgg5", 10, (3, 16, 16), 3, features=[8, "A", 16, 16, "A"], classifier=[32],
                       neuron={"threshold": 0.3})
    set_mask(base, "features.3.weight", torch.rand(16, 8, 3, 3) < 0.5)
    quantize_weights(base, 6, names=["features.5.weight"])
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    ref = _train_step(copy.deepcopy(base), x, y)
    model = copy.deepcopy(base)
    classes = {name: type(m) for name, m in model.named_modules()}
    lean_memory(model)
    assert all(isinstance(model.features[i], torch.nn.Conv2d) and type(model.features[i]).__name__.startswith("Lean")
               for i in (0, 3, 5))
    got = _train_step(model, x, y)
    assert torch.equal(ref[0], got[0])
    for name in ref[1]:
        assert torch.equal(ref[1][name], got[1][name]), name
    assert torch.all(got[1]["features.3.parametrizations.weight.original"][~model.features[3].parametrizations.weight[0].mask] == 0)
    lean_memory(model, False)
    assert {name: type(m) for name, m in model.named_modules()} == classes
