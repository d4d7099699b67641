"""Spikes, firing rates and synaptic operations (SynOps), counted from what actually ran.

Spikes (:class:`SpikeMeter`)
    A forward hook on every :class:`~snncompress.neuron.LIF` sums its output
    spikes ``[T, B, ...]``. Firing rate of a layer = spikes / (neurons x T x
    images), i.e. spikes per neuron per timestep, in [0, 1]. Spikes per image
    = all spikes of all layers over all timesteps / images.

Synaptic operations (:class:`SynOpsMeter`, :func:`count_synops`)
    Counted at the operator level: a ``TorchDispatchMode`` sees every aten
    convolution / ``mm`` / ``addmm`` / ``linear`` / ``matmul`` that runs and
    re-runs it on binarised operands, whatever module issued it. Definitions
    and names are NeuroBench's ``SynapticOperations``:

    * ``Effective_ACs`` (``ac``): the op's input holds only -1, 0 and 1
      (spikes; signed Poisson spikes included, as in NeuroBench): one
      accumulate per (nonzero input x nonzero weight) pair.
    * ``Effective_MACs`` (``mac``): any other input (analog image into conv1,
      non-binary sums, average-pooled spikes by default, ReLU activations of
      the ANN twin): one multiply-accumulate per (nonzero input x nonzero
      weight) pair.
    * ``Dense`` (``dense``): the same op with all-ones input and weights
      (zero padding still contributes nothing), whatever the input kind.

    Biases and BatchNorm are not synaptic operations (NeuroBench suppresses
    biases; BatchNorm folds into weights and thresholds at inference). A
    pruned weight is zero in the tensor, so it costs nothing; a narrowed
    model is simply smaller. Counts are per image: totals / images run.

Conventions (options)
    ``conv1_per_timestep`` (default False): every op that runs before the
    first LIF on the time-less batch ``[B, ...]`` (direct-input conv1: the
    network computes it once and broadcasts it over T) counts once per
    image, as it ran. True multiplies those ops (effective and dense) by T,
    as if conv1 were recomputed at every timestep.

    ``pooled_spikes`` (default ``"mac"``): average pooling after a LIF turns
    spikes into 0, 1/4, 1/2, ... (global pooling: multiples of 1/(H*W)).
    ``"mac"`` follows NeuroBench: the next layer's input is non-binary, so
    each nonzero pooled value x nonzero weight is one Effective_MAC.
    ``"ac"`` counts what an event-driven chip would run: avg-pool followed
    by a conv (or linear) equals that layer applied to the raw spikes with
    weights scaled by 1/(pool area), so every raw spike that entered the
    pool window costs one AC per nonzero weight it reaches; the count is
    the pooled value x pool area (the spike multiplicity) x nonzero weights,
    and Dense for that layer is likewise counted on the raw spike grid
    (pooled Dense x pool area), so Effective_ACs <= Dense still holds.

    Residual sums: in snncompress ResNets the shortcut is added to the
    second neuron's input current, so every conv still receives spikes (or
    pooled spikes); the identity add is a membrane update, not a synaptic op.
    Should a conv ever receive a non-binary sum, it is counted as MACs.

Per-layer breakdown: each op is attributed to the innermost module executing
when it ran (module pre/post hooks keep a name stack), e.g. ``features.0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..neuron import LIF

POOLED_SPIKE_CONVENTIONS = ("mac", "ac")

_CONV_OPS = {"convolution", "_convolution", "conv1d", "conv2d", "conv3d"}
_LINEAR_OPS = {"linear", "mm", "addmm", "matmul", "bmm"}
_POOL_OPS = {"avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
             "_adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool3d", "mean"}
#: Ops that move or reshape values without changing them: a pooled-spike tag follows them.
_PASS_OPS = {"view", "_unsafe_view", "reshape", "flatten", "unsqueeze", "squeeze", "expand", "clone",
             "contiguous", "permute", "transpose", "alias", "detach", "select", "slice", "_to_copy", "to",
             "unflatten"}
_TAG = "_snncompress_pool_area"
OTHER_LAYER = "(model)"


def is_spike_tensor(x: torch.Tensor) -> bool:
    """True when every value of ``x`` is -1, 0 or 1 (NeuroBench's test for a spiking input)."""
    return not bool(((x != 0) & (x != 1) & (x != -1)).any())


@dataclass
class OpCount:
    """Synaptic operations: ``ac`` (Effective_ACs), ``mac`` (Effective_MACs), ``dense`` (Dense)."""

    ac: float = 0.0
    mac: float = 0.0
    dense: float = 0.0

    def add(self, other: "OpCount") -> None:
        self.ac += other.ac
        self.mac += other.mac
        self.dense += other.dense

    def scaled(self, factor: float) -> "OpCount":
        return OpCount(self.ac * factor, self.mac * factor, self.dense * factor)

    def as_dict(self) -> dict[str, float]:
        return {"ac": float(self.ac), "mac": float(self.mac), "dense": float(self.dense)}


def _pool_area(name: str, args: tuple, x: torch.Tensor, out: torch.Tensor) -> int | None:
    """How many inputs one output of this average-pooling op averages (None if not a plain average)."""
    if name == "mean":
        dims = args[1] if len(args) > 1 and args[1] is not None else list(range(x.dim()))
        dims = [dims] if isinstance(dims, int) else dims
        return math.prod(x.shape[d] for d in dims)
    if name.startswith("avg_pool"):
        nd = int(name[-2])
        divisor = args[6] if len(args) > 6 else None
        if divisor:
            return int(divisor)
        kernel = args[1]
        kernel = [kernel] * nd if isinstance(kernel, int) else list(kernel) * (nd if len(kernel) == 1 else 1)
        return math.prod(kernel)
    ratio = x.numel() / max(out.numel(), 1)  # adaptive pooling: exact only when sizes divide
    return int(ratio) if ratio == int(ratio) else None


class _OpInterceptor(TorchDispatchMode):
    """Runs every aten op unchanged and reports synaptic ops and pooling to its meter."""

    def __init__(self, meter: "SynOpsMeter"):
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _CONV_OPS or name in _LINEAR_OPS:
            self.meter._count_op(name, func, args, kwargs)
        elif name in _POOL_OPS and isinstance(out, torch.Tensor):
            self.meter._tag_pool(name, args, out)
        elif name in _PASS_OPS and isinstance(out, torch.Tensor) and args:
            area = getattr(args[0], _TAG, None) if isinstance(args[0], torch.Tensor) else None
            if area is not None:
                setattr(out, _TAG, area)
        return out


def _operands(name: str, args: tuple) -> tuple[int, int]:
    """Positions of (activation, weight) in the op's arguments."""
    return (1, 2) if name == "addmm" else (0, 1)


class SynOpsMeter:
    """Count synaptic operations of every forward pass run inside a ``with`` block.

    Usage::

        with torch.no_grad(), SynOpsMeter(model) as meter:
            for images in batches:      # images [B, C, H, W]
                model(images)
        meter.per_image()   # {"ac", "mac", "dense", "per_layer": {name: {...}}, "images": n, ...}

    Both pooled-spike conventions are counted in the same pass; ``pooled_spikes``
    picks the one :meth:`per_image` reports by default.

    Args:
        model: any ``nn.Module``; ``model.timesteps`` and ``model.spiking`` are
            used when present (snncompress networks).
        conv1_per_timestep: count ops that ran before the first LIF on the
            time-less batch T times instead of once (see the module docstring).
        pooled_spikes: ``"mac"`` (NeuroBench) or ``"ac"`` (raw-spike ACs).
    """

    def __init__(self, model: nn.Module, *, conv1_per_timestep: bool = False, pooled_spikes: str = "mac"):
        if pooled_spikes not in POOLED_SPIKE_CONVENTIONS:
            raise ValueError(f"pooled_spikes must be one of {POOLED_SPIKE_CONVENTIONS}, got {pooled_spikes!r}")
        self.model = model
        self.conv1_per_timestep = conv1_per_timestep
        self.pooled_spikes = pooled_spikes
        self.totals = {c: OpCount() for c in POOLED_SPIKE_CONVENTIONS}
        self.per_layer: dict[str, dict[str, OpCount]] = {c: {} for c in POOLED_SPIKE_CONVENTIONS}
        self.images = 0
        self._batch = 0
        self._seen_lif = False
        self._names: list[str] = []
        self._handles: list = []
        self._dense_cache: dict = {}
        self._mode: _OpInterceptor | None = None

    # -- hooks -----------------------------------------------------------------------------------
    def _on_model_start(self, module, args):
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        self._batch = int(x.shape[0]) if x is not None and x.dim() > 0 else 1
        self.images += self._batch
        self._seen_lif = False
        self._names.clear()

    def _on_lif_start(self, module, args):
        self._seen_lif = True

    def _enter_module(self, name):
        return lambda module, args: self._names.append(name)

    def _leave_module(self, module, args, out):
        if self._names:
            self._names.pop()

    def __enter__(self) -> "SynOpsMeter":
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_start))
        for name, module in self.model.named_modules():
            if not name:
                continue
            if isinstance(module, LIF):
                self._handles.append(module.register_forward_pre_hook(self._on_lif_start))
            self._handles.append(module.register_forward_pre_hook(self._enter_module(name)))
            self._handles.append(module.register_forward_hook(self._leave_module))
        self._mode = _OpInterceptor(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- counting --------------------------------------------------------------------------------
    def _tag_pool(self, name: str, args: tuple, out: torch.Tensor) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is None:
            return
        inner = getattr(x, _TAG, None)
        if inner is None and not is_spike_tensor(x):
            return
        area = _pool_area(name, args, x, out)
        if area is not None:
            setattr(out, _TAG, area * (inner or 1))

    def _time_factor(self, x: torch.Tensor) -> int:
        """T for an op on the time-less batch before the first LIF when counting per timestep, else 1."""
        if not self.conv1_per_timestep or self._seen_lif or not getattr(self.model, "spiking", False):
            return 1
        return int(getattr(self.model, "timesteps", 1)) if x.shape[0] == self._batch else 1

    def _op_counts(self, name, func, args, kwargs, x: torch.Tensor, w: torch.Tensor) -> dict[str, OpCount]:
        """Counts of one op under each pooled-spike convention, ``{"mac": OpCount, "ac": OpCount}``.

        Spikes: one AC per (nonzero input, nonzero weight) pair under both conventions.
        Pooled spikes: ``"mac"`` counts one MAC per nonzero pooled value x nonzero weight;
        ``"ac"`` counts one AC per raw spike (value x pool area) x nonzero weight, and Dense
        on the raw spike grid (x pool area). Any other input: MACs under both.
        """
        nonzero_w = (w != 0).to(torch.float32)
        dense = self._dense(name, func, args, kwargs, x, w)
        effective = self._run_binary(name, func, args, kwargs, (x != 0).to(torch.float32), nonzero_w)
        if is_spike_tensor(x):
            count = OpCount(ac=effective, dense=dense)
            return {"mac": count, "ac": count}
        as_mac = OpCount(mac=effective, dense=dense)
        area = getattr(x, _TAG, None)
        if area is None:
            return {"mac": as_mac, "ac": as_mac}
        raw_spikes = torch.round(x.abs().to(torch.float32) * area)
        as_ac = OpCount(ac=self._run_binary(name, func, args, kwargs, raw_spikes, nonzero_w), dense=dense * area)
        return {"mac": as_mac, "ac": as_ac}

    def _run_binary(self, name, func, args, kwargs, x, w) -> float:
        """Re-run the op with ``x`` and ``w`` in place of its operands and no bias; returns the sum."""
        if name == "addmm":
            return float(torch.mm(x, w).sum(dtype=torch.float64))
        new = list(args)
        i_x, i_w = _operands(name, args)
        new[i_x], new[i_w] = x, w
        if name in _CONV_OPS or name == "linear":
            if len(new) > 2:
                new[2] = None
            kwargs = {k: v for k, v in kwargs.items() if k != "bias"}
        return float(func(*new, **kwargs).sum(dtype=torch.float64))

    def _dense(self, name, func, args, kwargs, x, w) -> float:
        """Dense count (all-ones input and weights); computed for one slice of dim 0 and cached."""
        if name in ("bmm", "matmul") or x.dim() < 2:
            return self._run_binary(name, func, args, kwargs, torch.ones_like(x, dtype=torch.float32),
                                    torch.ones_like(w, dtype=torch.float32))
        key = (name, tuple(x.shape[1:]), tuple(w.shape),
               repr([a for a in args if not isinstance(a, torch.Tensor)]), repr(sorted(kwargs.items())))
        if key not in self._dense_cache:
            ones_x = torch.ones((1, *x.shape[1:]), dtype=torch.float32, device=x.device)
            ones_w = torch.ones_like(w, dtype=torch.float32)
            self._dense_cache[key] = self._run_binary(name, func, args, kwargs, ones_x, ones_w)
        return self._dense_cache[key] * x.shape[0]

    def _count_op(self, name: str, func, args: tuple, kwargs: dict) -> None:
        i_x, i_w = _operands(name, args)
        x, w = args[i_x], args[i_w]
        if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
            return
        factor = self._time_factor(x)
        ann = not getattr(self.model, "spiking", True)
        layer = self._names[-1] if self._names else OTHER_LAYER
        for convention, count in self._op_counts(name, func, args, kwargs, x, w).items():
            count = count.scaled(factor)
            if ann:  # ANN twin: every op is a multiply-accumulate
                count = OpCount(mac=count.ac + count.mac, dense=count.dense)
            self.totals[convention].add(count)
            self.per_layer[convention].setdefault(layer, OpCount()).add(count)

    def per_image(self, pooled_spikes: str | None = None) -> dict:
        """Counts per image under ``pooled_spikes`` (default: the meter's convention).

        Returns ``{"ac", "mac", "dense", "per_layer": {layer: {"ac", "mac", "dense"}}, "images",
        "pooled_spikes", "alternative": {"pooled_spikes", "ac", "mac", "dense"}}``; ``alternative``
        holds the totals under the other convention.
        """
        convention = pooled_spikes or self.pooled_spikes
        other = next(c for c in POOLED_SPIKE_CONVENTIONS if c != convention)
        n = max(self.images, 1)
        return {**self.totals[convention].scaled(1.0 / n).as_dict(),
                "per_layer": {k: v.scaled(1.0 / n).as_dict() for k, v in self.per_layer[convention].items()},
                "images": self.images, "pooled_spikes": convention,
                "alternative": {"pooled_spikes": other, **self.totals[other].scaled(1.0 / n).as_dict()}}


def count_synops(model: nn.Module, images: torch.Tensor, *, conv1_per_timestep: bool = False,
                 pooled_spikes: str = "mac") -> dict:
    """Synaptic operations per image of one forward pass on ``images`` ``[B, C, H, W]``.

    Returns ``{"ac", "mac", "dense", "per_layer": {layer: {"ac", "mac", "dense"}}, "images",
    "pooled_spikes", "alternative"}`` (see :meth:`SynOpsMeter.per_image`); see the module
    docstring for the definitions and the two conventions.
    """
    with torch.no_grad(), SynOpsMeter(model, conv1_per_timestep=conv1_per_timestep,
                                      pooled_spikes=pooled_spikes) as meter:
        model(images)
    return meter.per_image()


@dataclass
class SpikeMeter:
    """Count spikes of every LIF layer over the forward passes run inside a ``with`` block.

    A module with ``counts_spikes = True`` (the Diehl & Cook populations) reports spike counts
    instead: ``forward(counts [B, ...], steps)``.

    After the block: :meth:`spikes_per_image` (all layers, all timesteps),
    :meth:`firing_rates` ``{layer: spikes per neuron per timestep}``,
    :meth:`neurons` ``{layer: neurons per image}``.
    """

    model: nn.Module
    spikes: dict = field(default_factory=dict)
    neuron_steps: dict = field(default_factory=dict)
    neurons_per_image: dict = field(default_factory=dict)
    images: int = 0
    _handles: list = field(default_factory=list)

    def _on_model_start(self, module, args):
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        self.images += int(x.shape[0]) if x is not None and x.dim() > 0 else 1

    def _on_lif_output(self, name):
        def hook(module, args, out):  # out: spikes [T, B, ...]
            out = out.detach()
            self.spikes[name] = self.spikes.get(name, 0.0) + out.abs().sum(dtype=torch.float64)
            self.neuron_steps[name] = self.neuron_steps.get(name, 0) + out.numel()
            self.neurons_per_image[name] = math.prod(out.shape[2:])
        return hook

    def _on_counts(self, name):
        def hook(module, args, out):  # out: spike counts [B, ...] over args[1] timesteps
            steps = int(args[1])
            self.spikes[name] = self.spikes.get(name, 0.0) + out.detach().abs().sum(dtype=torch.float64)
            self.neuron_steps[name] = self.neuron_steps.get(name, 0) + out.numel() * steps
            self.neurons_per_image[name] = math.prod(out.shape[1:])
        return hook

    def __enter__(self) -> "SpikeMeter":
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_start))
        for name, module in self.model.named_modules():
            if isinstance(module, LIF):
                self._handles.append(module.register_forward_hook(self._on_lif_output(name)))
            elif getattr(module, "counts_spikes", False):  # a population that reports counts (models.stdp)
                self._handles.append(module.register_forward_hook(self._on_counts(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def layer_spikes_per_image(self) -> dict[str, float]:
        """Spikes per image of each LIF layer, summed over timesteps."""
        n = max(self.images, 1)
        return {k: float(v) / n for k, v in self.spikes.items()}

    def spikes_per_image(self) -> float:
        """Spikes per image over all LIF layers and all timesteps."""
        return float(sum(self.layer_spikes_per_image().values()))

    def firing_rates(self) -> dict[str, float]:
        """Spikes per neuron per timestep of each LIF layer, in [0, 1]."""
        return {k: float(v) / max(self.neuron_steps[k], 1) for k, v in self.spikes.items()}

    def neurons(self) -> dict[str, int]:
        """Neurons per image of each LIF layer (one membrane potential each)."""
        return dict(self.neurons_per_image)
