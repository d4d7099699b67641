"""LIF equations against hand-computed traces, surrogate gradients and finite differences."""

import pytest
import torch

from snncompress import LIF, lif_multistep
from snncompress.neuron import surrogate_grad

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
