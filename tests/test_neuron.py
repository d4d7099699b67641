"""LIF equations against hand-computed traces, surrogate gradients and finite differences;
the lif_step loop against lif_multistep; the membrane-state quantizer slot of LIF."""

import pytest
import torch
from torch import nn

from snncompress import LIF, LIFState, lif_multistep, lif_step
from snncompress.kernels.membrane import record_membranes
from snncompress.neuron import (LIF_BACKENDS, SURROGATE_DEFAULT_SCALE, SURROGATE_TABLE, SURROGATES,
                                Surrogate, surrogate_grad, surrogate_scale)

INPUTS = [0.6, 0.6, 0.9, 0.2]


def run(leak, reset, threshold=1.0, inputs=INPUTS):
    current = torch.tensor(inputs, dtype=torch.float64).view(-1, 1)
    spikes, membrane = lif_multistep(current, torch.tensor(leak, dtype=torch.float64),
                                     torch.tensor(threshold, dtype=torch.float64), reset,
                                     return_membrane=True)
    return spikes.flatten().tolist(), membrane.flatten().tolist()


@pytest.mark.parametrize("leak,reset,spikes,membrane", [
    # u[t] = leak * u_hat[t-1] + I[t]; soft: u_hat = u - thr*o; hard: u_hat = u*(1-o)
    (1.0, "soft", [0, 1, 1, 0], [0.6, 1.2, 1.1, 0.3]),
    (0.5, "soft", [0, 0, 1, 0], [0.6, 0.9, 1.35, 0.375]),
    (1.0, "hard", [0, 1, 0, 1], [0.6, 1.2, 0.9, 1.1]),
    (0.5, "hard", [0, 0, 1, 0], [0.6, 0.9, 1.35, 0.2]),
])
def test_lif_trace_matches_hand_computation(leak, reset, spikes, membrane):
    got_spikes, got_membrane = run(leak, reset)
    assert got_spikes == spikes
    assert got_membrane == pytest.approx(membrane, abs=1e-12)


def test_threshold_scales_firing():
    # threshold 0.5, soft reset, leak 1: 0.6 -> spike (0.1), 0.7 -> spike (0.2), 1.1 -> spike (0.6), 0.8 -> spike
    assert run(1.0, "soft", threshold=0.5)[0] == [1, 1, 1, 1]
    assert run(1.0, "soft", threshold=2.0)[0] == [0, 0, 1, 0]


def test_linear_surrogate_gradient_hand_values():
    # one step, I = 0.8, thr = 1: z = -0.2, dspike/dz = 0.3 * (1 - 0.2) = 0.24
    current = torch.tensor([[0.8]], requires_grad=True)
    leak = torch.tensor(1.0, requires_grad=True)
    thr = torch.tensor(1.0, requires_grad=True)
    lif_multistep(current, leak, thr).sum().backward()
    assert current.grad.item() == pytest.approx(0.24)          # dz/dI = 1/thr
    assert thr.grad.item() == pytest.approx(0.24 * -0.8)      # dz/dthr = -I/thr^2
    assert leak.grad.item() == 0.0                             # no history at t = 0


@pytest.mark.parametrize("kind,z,expected", [
    ("linear", 0.5, 0.15), ("linear", -1.5, 0.0),
    ("atan", 0.0, 1.0), ("atan", 0.5, 1.0 / (1 + (torch.pi / 2) ** 2)),
    ("fast_sigmoid", 0.0, 1.0), ("fast_sigmoid", 0.04, 0.25),
])
def test_surrogate_values(kind, z, expected):
    assert surrogate_grad(torch.tensor(z, dtype=torch.float64), kind).item() == pytest.approx(expected)


@pytest.mark.parametrize("reset", ["soft", "hard"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_membrane_gradients_match_finite_differences(reset, per_channel):
    """Between spikes the membrane trace is smooth in I, leak and thr: gradcheck it in float64."""
    torch.manual_seed(0)
    current = (torch.rand(6, 2, 3, dtype=torch.float64) * 0.9).requires_grad_()
    shape = (3,) if per_channel else ()
    leak = torch.full(shape, 0.8, dtype=torch.float64, requires_grad=True)
    thr = torch.full(shape, 0.7, dtype=torch.float64, requires_grad=True)

    def membrane(i, lk, th):
        return lif_multistep(i, lk, th, reset, return_membrane=True)[1]

    spikes, u = lif_multistep(current, leak, thr, reset, return_membrane=True)
    assert 0 < spikes.sum() < spikes.numel()            # the check crosses real spikes and resets
    assert (u / thr - 1).abs().min() > 1e-3              # no spike flips under the finite-difference step
    assert torch.autograd.gradcheck(membrane, (current, leak, thr), eps=1e-7, atol=1e-6)


def test_lif_module_per_channel_and_clamp():
    lif = LIF(leak=0.9, threshold=0.5, per_channel=True, num_channels=2)
    current = torch.tensor([0.6, 0.4]).view(1, 1, 2, 1, 1).repeat(3, 1, 1, 1, 1)
    with torch.no_grad():
        lif.threshold.copy_(torch.tensor([0.5, 2.0]))
    out = lif(current)
    assert out[:, 0, 0].flatten().tolist() == [1.0, 1.0, 1.0]
    assert out[:, 0, 1].flatten().tolist() == [0.0, 0.0, 0.0]
    with torch.no_grad():
        lif.leak.copy_(torch.tensor([1.4, -0.2]))
        lif.threshold.copy_(torch.tensor([-1.0, 3.0]))
    lif.clamp_()
    assert lif.leak.tolist() == [1.0, 0.0]
    assert lif.threshold.tolist() == pytest.approx([LIF.THRESHOLD_FLOOR, 3.0])


def test_fixed_leak_and_threshold_are_buffers():
    lif = LIF(leak=0.25, learn_leak=False, learn_threshold=False, reset="hard", surrogate="atan")
    assert [n for n, _ in lif.named_parameters()] == []
    assert set(dict(lif.named_buffers())) == {"leak", "threshold"}


def test_lif_step_hand_trace_and_state():
    # leak 0.5, soft reset, thr 1: u = 0.6, 0.9, 1.35 (spike, u_hat = 0.35), 0.375
    leak, thr = torch.tensor(0.5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    state = LIFState.initial(torch.zeros(1, dtype=torch.float64))
    assert state.u_hat.tolist() == [0.0] and state.u.tolist() == [0.0]
    trace = []
    for i in INPUTS:
        o, state = lif_step(torch.tensor([i], dtype=torch.float64), state, leak, thr, "soft")
        assert isinstance(state, LIFState)
        trace += [o.item(), state.u.item(), state.u_hat.item()]
    assert trace == pytest.approx([0, 0.6, 0.6, 0, 0.9, 0.9, 1, 1.35, 0.35, 0, 0.375, 0.375])
    with pytest.raises(ValueError, match="reset"):
        lif_step(torch.ones(1), state, leak, thr, "sideways")


def lif_step_loop(current, leak, thr, reset, surrogate, scale=None, quantizer=None):
    """Spikes and pre-reset potentials ``[T, B, ...]`` of lif_step run by hand over t."""
    state, spikes, membrane = LIFState.initial(current[0]), [], []
    for t in range(current.shape[0]):
        o, state = lif_step(current[t], state, leak, thr, reset, surrogate, scale, quantizer)
        spikes.append(o)
        membrane.append(state.u)
    return torch.stack(spikes), torch.stack(membrane)


@pytest.mark.parametrize("reset", ["soft", "hard"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("surrogate", SURROGATES)
def test_lif_step_loop_equals_lif_multistep_exactly(reset, per_channel, surrogate):
    g = torch.Generator().manual_seed(3)
    current = torch.randn(7, 2, 3, 4, generator=g) * 1.5
    shape = (3, 1) if per_channel else ()
    leak0 = torch.rand(shape, generator=g) * 0.5 + 0.5
    thr0 = torch.rand(shape, generator=g) + 0.5
    weight = torch.linspace(-1, 1, current.numel()).reshape(current.shape)
    results = []
    for fn in (lif_multistep, lambda *a: lif_step_loop(*a)):
        i, lk, th = (t.clone().requires_grad_(True) for t in (current, leak0, thr0))
        if fn is lif_multistep:
            spikes, u = fn(i, lk, th, reset, surrogate, None, True)
        else:
            spikes, u = fn(i, lk, th, reset, surrogate)
        ((spikes * weight).sum() + (u * weight).sum()).backward()
        results.append((spikes.detach(), u.detach(), i.grad, lk.grad, th.grad))
    assert 0 < results[0][0].sum() < results[0][0].numel()
    assert results[0][3].abs().sum() > 0 and results[0][4].abs().sum() > 0
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_surrogate_table_is_the_one_list():
    assert SURROGATES == tuple(SURROGATE_TABLE) == ("linear", "atan", "fast_sigmoid")
    assert SURROGATE_DEFAULT_SCALE == {"linear": 0.3, "atan": 2.0, "fast_sigmoid": 25.0}
    assert all(isinstance(s, Surrogate) for s in SURROGATE_TABLE.values())
    z = torch.tensor([-0.3, 0.0, 0.2], dtype=torch.float64)
    for name, (derivative, default) in SURROGATE_TABLE.items():
        assert torch.equal(surrogate_grad(z, name), derivative(z, default))
        assert torch.equal(surrogate_grad(z, name, 7.0), derivative(z, 7.0))
        assert surrogate_scale(name) == default and surrogate_scale(name, 7) == 7.0
    with pytest.raises(ValueError, match="unknown surrogate"):
        surrogate_grad(z, "nope")
    with pytest.raises(ValueError, match="unknown surrogate"):
        surrogate_scale("nope")


def test_spike_backward_uses_the_table(monkeypatch):
    """A surrogate added to the table is used by the spike's backward, with its default scale."""
    monkeypatch.setitem(SURROGATE_TABLE, "box", Surrogate(lambda z, s: s * (z.abs() < 0.5).to(z.dtype), 0.75))
    current = torch.tensor([[0.8], [0.1]], dtype=torch.float64, requires_grad=True)
    one = torch.tensor(1.0, dtype=torch.float64)
    lif_multistep(current, one, one, "soft", "box").sum().backward()
    # u = 0.8, 0.9 (no spike): z = -0.2, -0.1, both inside the box, derivative 0.75 each;
    # dL/dI[1] = 0.75, dL/dI[0] = 0.75 + leak * dL/du[1] = 1.5
    assert current.grad.flatten().tolist() == [1.5, 0.75]


class Quarter(nn.Module):
    """Fake quantizer: round to multiples of ``step`` (a buffer) with a straight-through gradient."""

    def __init__(self, step: float = 0.25):
        super().__init__()
        self.register_buffer("step", torch.tensor(step))

    def forward(self, x):
        return x + (torch.round(x / self.step) * self.step - x).detach()


# leak 1, thr 1, soft reset, inputs 0.6, 0.45, 0.3, 0.2 with u_hat rounded to multiples of 1/4:
#   t  u                    o  u_hat  q(u_hat)
#   0  0.6                  0  0.6    0.5
#   1  0.5 + 0.45 = 0.95    0  0.95   1.0
#   2  1.0 + 0.3  = 1.3     1  0.3    0.25
#   3  0.25 + 0.2 = 0.45    0  0.45   0.5
# (unquantized: u = 0.6, 1.05, 0.35, 0.55 and spikes 0, 1, 0, 0)
Q_INPUTS = [0.6, 0.45, 0.3, 0.2]
Q_SPIKES = [0.0, 0.0, 1.0, 0.0]
Q_MEMBRANE = [0.6, 0.95, 1.3, 0.45]
# Linear surrogate 0.3 * (1 - |z|) at z = u - 1: 0.18, 0.285, 0.21, 0.135. With the STE,
# dL/du[t] = sg[t] + dL/du[t+1] (leak 1), so dL/dI = 0.81, 0.63, 0.345, 0.135 for L = sum(o),
# and dL/dleak = sum_t dL/du[t] * q(u_hat[t-1]) = 0.63*0.5 + 0.345*1.0 + 0.135*0.25 = 0.69375.
Q_GRAD_I = [0.81, 0.63, 0.345, 0.135]
Q_GRAD_LEAK = 0.69375


@pytest.fixture
def failing_backend(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("fused backend called")

    monkeypatch.setitem(LIF_BACKENDS, "failing", fail)
    return "failing"


def test_state_quantizer_hand_trace(failing_backend):
    lif = LIF(leak=1.0, threshold=1.0, backend=failing_backend)
    lif.state_quantizer = Quarter()
    lif.double()
    recorded = {}
    current = torch.tensor(Q_INPUTS, dtype=torch.float64).view(4, 1, 1).requires_grad_(True)
    with record_membranes([("lif", lif)], lambda name, layer, u: recorded.setdefault(name, u)):
        spikes = lif(current)
    assert spikes.flatten().tolist() == Q_SPIKES
    assert recorded["lif"].flatten().tolist() == pytest.approx(Q_MEMBRANE, abs=1e-12)
    spikes.sum().backward()
    assert current.grad.flatten().tolist() == pytest.approx(Q_GRAD_I, abs=1e-12)
    assert lif.leak.grad.item() == pytest.approx(Q_GRAD_LEAK, abs=1e-12)
    ref_spikes, ref_u = lif_step_loop(current.detach(), torch.tensor(1.0, dtype=torch.float64),
                                      torch.tensor(1.0, dtype=torch.float64), "soft", "linear",
                                      quantizer=Quarter().double())
    assert torch.equal(ref_spikes, spikes.detach()) and torch.equal(ref_u, recorded["lif"])
    lif.state_quantizer = None  # back to the (here failing) fused backend
    with pytest.raises(AssertionError, match="fused backend called"):
        lif(current)


def test_state_quantizer_per_channel_hard_reset():
    # channel 0: thr 1, hard reset, leak 1 -> same u as the soft trace until the spike, then 0
    # channel 1: thr 2 never fires: u_hat accumulates, rounded to 1/4: 0.5, 1.0 (0.95), 1.25 (1.3), 1.5 (1.45)
    lif = LIF(leak=1.0, threshold=1.0, reset="hard", per_channel=True, num_channels=2,
              state_quantizer=Quarter()).double()
    with torch.no_grad():
        lif.threshold.copy_(torch.tensor([1.0, 2.0]))
    recorded = {}
    current = torch.tensor(Q_INPUTS, dtype=torch.float64).view(4, 1, 1).expand(4, 1, 2)
    with record_membranes([("lif", lif)], lambda name, layer, u: recorded.setdefault(name, u)):
        spikes = lif(current)
    assert spikes[:, 0, 0].tolist() == Q_SPIKES and spikes[:, 0, 1].tolist() == [0.0] * 4
    assert recorded["lif"][:, 0, 0].tolist() == pytest.approx([0.6, 0.95, 1.3, 0.2], abs=1e-12)
    assert recorded["lif"][:, 0, 1].tolist() == pytest.approx([0.6, 0.95, 1.3, 1.45], abs=1e-12)


def test_state_quantizer_is_a_registered_submodule():
    lif = LIF(threshold=0.5)
    assert lif.state_quantizer is None and "state_quantizer" in lif._modules
    assert set(lif.state_dict()) == {"leak", "threshold"}
    lif.state_quantizer = Quarter(0.125)
    assert dict(lif.named_children()) == {"state_quantizer": lif.state_quantizer}
    assert set(lif.state_dict()) == {"leak", "threshold", "state_quantizer.step"}
    lif.to(torch.float64)
    assert lif.state_quantizer.step.dtype == torch.float64
    other = LIF(threshold=0.5, state_quantizer=Quarter(0.25)).double()
    other.load_state_dict(lif.state_dict())
    assert other.state_quantizer.step.item() == 0.125
    with pytest.raises(TypeError):
        lif.state_quantizer = lambda x: x  # not an nn.Module: would not be moved or saved
    lif.state_quantizer = None
    assert set(lif.state_dict()) == {"leak", "threshold"}


def test_neuron_options_are_stated_once_and_every_one_reaches_the_lif():
    """NeuronOptions is the one place of the neuron's defaults: LIF's signature agrees with it, and every
    option set in a recipe's model.neuron (surrogate_scale included) arrives on every LIF of the network."""
    import inspect

    from snncompress.models import build_model
    from snncompress.neuron import NeuronOptions
    from snncompress.recipe import NeuronConfig

    assert NeuronConfig is NeuronOptions
    signature = inspect.signature(LIF.__init__).parameters
    for name, field in NeuronOptions.model_fields.items():
        assert signature[name].default == field.default, name
    chosen = {"leak": 0.5, "threshold": 2.0, "reset": "hard", "surrogate": "atan", "surrogate_scale": 3.0,
              "learn_leak": False, "learn_threshold": False, "per_channel": True, "backend": "reference"}
    model = build_model("convnet", 10, (1, 8, 8), 2, neuron=chosen, features=[4, "A"], classifier=[8])
    lifs = [m for m in model.modules() if isinstance(m, LIF)]
    assert len(lifs) == 2
    for lif in lifs:
        assert (lif.reset, lif.surrogate, lif.surrogate_scale, lif.per_channel, lif.backend) == \
            ("hard", "atan", 3.0, True, "reference")
        assert torch.all(lif.leak == 0.5) and torch.all(lif.threshold == 2.0)
        assert not isinstance(lif.leak, torch.nn.Parameter) and not isinstance(lif.threshold, torch.nn.Parameter)
    assert model.spec["neuron"]["surrogate_scale"] == 3.0
    assert "surrogate_scale" not in build_model("convnet", 10, (1, 8, 8), 2).spec["neuron"]
