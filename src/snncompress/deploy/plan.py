"""A lean CPU inference runner for spiking VGG / convnet models: the deployment form.

The eager :class:`~snncompress.models.SpikingVGG` forward is written for training:
every layer call goes through ``nn.Module.__call__``, time folding reshapes, the
LIF module's backend selection and argument checks, and the kernel wrapper's
layout probes. At batch 1 and few timesteps these 10-30 us per layer cost more
than the arithmetic (a pruned T = 1 convnet spends most of its time there).

:class:`InferencePlan` walks the same modules once at build time and keeps, per
layer, only what the forward needs:

* convolution / BatchNorm / linear: the module's own ``forward`` (no hooks); a
  BatchNorm right after a convolution or linear layer is folded into it (below);
* LIF: the C forward kernel bound once to its leak and threshold vectors
  (:class:`snncompress.kernels.cpu.BoundForward`); the current before the first LIF is read
  with time stride 0 (computed once, never copied T times);
* 2x2 average pooling: the C pooling kernel (bit-identical to PyTorch's);
* dropout: nothing (eval mode).

Activations stay time-folded ``[T*B, ...]`` from the first LIF on; the logits
are summed over t exactly as the eager model does. The plan reads the model's
current tensors and changes nothing, so build it after training.

BatchNorm folding (``fold_batchnorm``, on by default as in every deployment
runtime, and as the C export and the NIR graph already do): an eval-mode
``BN(layer(x)) = gain * layer(x) + shift`` becomes one layer with weights
``gain * W`` (per output channel) and bias ``gain * b + shift``, computed in
float64 at build time. The plan then holds copies of those layers' weights
(rebuild it after changing them) and one pass less per BatchNorm. Its logits
equal the eager model's up to float rounding: the folded sums round
differently, so a membrane potential within about 1e-7 (relative) of its
threshold may spike in one and not in the other. ``fold_batchnorm=False``
keeps the eager arithmetic exactly (tests check bit-equality).

:func:`build_inference_plan` returns None for what the plan does not cover
(ResNets, ANN mode, Poisson encoding, non-CPU tensors, dtypes other than
float32/float64, no C compiler); callers then use the eager model.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..metrics.latency import median_ms
from ..models.chain import batchnorm_affine
from ..neuron import LIF
from ..kernels import cpu


#: Layers the plan runs with their own (plain-class) forward.
STATELESS_LAYERS = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)
#: Layers a BatchNorm right after them is folded into.
FOLDABLE_LAYERS = (nn.Conv2d, nn.Linear)


def _folded_forward(layer: nn.Conv2d | nn.Linear, bn: nn.BatchNorm1d | nn.BatchNorm2d, dtype: torch.dtype):
    """The forward of ``bn(layer(x))`` (eval mode) as one layer: weight ``gain * W`` per output channel, bias
    ``gain * b + shift`` (``gain, shift`` of :func:`batchnorm_affine`, float64, then ``dtype``)."""
    gain, shift = batchnorm_affine(bn)
    weight = layer.weight.detach().double().cpu()
    weight = (weight * gain.view(-1, *[1] * (weight.dim() - 1))).to(dtype).contiguous()
    bias = shift if layer.bias is None else shift + gain * layer.bias.detach().double().cpu()
    bias = bias.to(dtype).contiguous()
    if isinstance(layer, nn.Conv2d):  # the layer's own padding mode, stride, dilation and groups
        return functools.partial(nn.Conv2d._conv_forward, layer, weight=weight, bias=bias)
    return functools.partial(nn.functional.linear, weight=weight, bias=bias)


def _lif_vectors(lif: LIF, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Leak and threshold as contiguous vectors of one value (scalar) or ``C`` (per channel)."""
    leak = lif.leak.detach().reshape(-1).to(dtype).contiguous()
    thr = lif.threshold.detach().reshape(-1).to(dtype).contiguous()
    return leak, thr


class InferencePlan(nn.Module):
    """Inference-only forward of a spiking VGG/convnet: images ``[B, C, H, W]`` -> logits ``[B, K]``.

    Build it with :func:`build_inference_plan`. It holds references to the model's
    modules and parameters; a later change of the model's weights is seen by the plan,
    except in layers a BatchNorm was folded into (copies), and a change of leak/threshold
    is not (rebuild it).
    """

    def __init__(self, model: nn.Module, steps: list[tuple], timesteps: int, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.steps = steps
        self.timesteps = int(timesteps)
        self.dtype = dtype
        #: Intra-op threads of a forward pass (None: the process setting); see :meth:`tune_threads`.
        self.threads: int | None = None

    def tune_threads(self, images: torch.Tensor, repeats: int = 30) -> dict[int, float]:
        """Run at the fastest thread count from 1 to ``torch.get_num_threads()`` on ``images``.

        At batch 1 a pruned, low-T model's layers are too small to share between threads: a
        second thread costs more in synchronisation than it saves (the STP Fashion-MNIST
        model: 0.27 ms on 2 threads, 0.19 ms on 1), while the dense baseline gains from it. A
        deployment runtime picks per model; this does, by timing. Returns ``{threads: median ms}``.
        """
        self.threads, timings = None, {}
        for threads in range(1, torch.get_num_threads() + 1):
            self.threads = threads
            timings[threads] = median_ms(lambda: self(images), repeats, warmup=3)
        self.threads = min(timings, key=timings.get)
        return timings

    def train(self, mode: bool = True) -> "InferencePlan":
        """Inference only: the plan and its model stay in eval mode (BatchNorm keeps its running stats)."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` (normalised, the model's dtype, CPU) -> logits ``[B, K]`` (summed over t)."""
        process_threads = torch.get_num_threads()
        if self.threads is None or self.threads == process_threads:
            return self._forward(images)
        torch.set_num_threads(self.threads)
        try:
            return self._forward(images)
        finally:
            torch.set_num_threads(process_threads)

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        x, has_time = images.to(self.dtype), False
        with torch.inference_mode():
            for step in self.steps:
                kind = step[0]
                if kind == "lif":  # spikes [T*B, ...] of x ([T*B, ...], or [B, ...] broadcast over T)
                    x, has_time = step[1](x, has_time), True
                elif kind == "pool":
                    x = cpu.avgpool_forward(x.contiguous(), step[1])
                elif kind == "flatten":
                    x = x.flatten(1)
                else:
                    x = step[1](x)
            if has_time:
                return x if self.timesteps == 1 else x.view(self.timesteps, -1, *x.shape[1:]).sum(0)
            return x * self.timesteps


def _pool_size(m: nn.AvgPool2d) -> int | None:
    """The window ``k`` of a k x k / stride k / no-padding average pool, else None."""
    k, s, p = m.kernel_size, m.stride, m.padding
    k = k if isinstance(k, int) else (k[0] if k[0] == k[1] else None)
    s = k if s is None else (s if isinstance(s, int) else (s[0] if s[0] == s[1] else None))
    if k is None or s != k or p not in (0, (0, 0)) or m.ceil_mode or not m.count_include_pad:
        return None
    return int(k)


def _plan_steps(seq: nn.Sequential, dtype: torch.dtype, timesteps: int, fold_batchnorm: bool) -> list[tuple] | None:
    """The plan of one ``nn.Sequential`` of the model, or None if it holds a layer the plan lacks."""
    from ..models.base import TimeDropout

    steps, previous = [], None  # previous: the layer of the last step, if it can take a BatchNorm in
    for m in seq:
        # running_var is None when the BatchNorm keeps no running statistics (eval uses batch statistics)
        if (fold_batchnorm and isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and previous is not None
                and m.running_var is not None):
            steps[-1] = ("module", _folded_forward(previous, m, dtype))
            previous = None
            continue
        previous = m if isinstance(m, FOLDABLE_LAYERS) else None
        if isinstance(m, LIF):
            if m.state_quantizer is not None:  # the C kernel keeps a float membrane
                return None
            steps.append(("lif", cpu.BoundForward(*_lif_vectors(m, dtype), m.reset == "hard", timesteps)))
        elif isinstance(m, STATELESS_LAYERS):
            # the plain class's forward: lean_memory's subclasses only change what backward keeps
            base = next(cls for cls in STATELESS_LAYERS if isinstance(m, cls))
            steps.append(("module", functools.partial(base.forward, m)))
        elif isinstance(m, nn.AvgPool2d):
            k = _pool_size(m)
            if k is None:
                return None
            steps.append(("pool", k))
        elif isinstance(m, (TimeDropout, nn.Dropout, nn.Identity)):  # identity in eval mode
            continue
        else:
            return None
    return steps


def build_inference_plan(model: nn.Module, fold_batchnorm: bool = True) -> InferencePlan | None:
    """The lean inference form of a spiking VGG/convnet on CPU, or None where it does not apply.

    ``fold_batchnorm``: fold each BatchNorm into the convolution or linear layer before it (module
    docstring; False keeps the eager model's arithmetic bit for bit). The model is put in eval mode
    (nothing else about it changes).
    """

    if "plan" not in getattr(model, "EXPORTS", ()) or not model.spiking:
        return None
    if model.spec.get("encoding", "direct") != "direct" or cpu.load_library() is None:
        return None
    params = list(model.parameters())
    dtype = params[0].dtype if params else torch.float32
    if dtype not in (torch.float32, torch.float64) or any(p.device.type != "cpu" or p.dtype != dtype
                                                           for p in params):
        return None
    features = _plan_steps(model.features, dtype, model.timesteps, fold_batchnorm)
    classifier = _plan_steps(model.classifier, dtype, model.timesteps, fold_batchnorm)
    if features is None or classifier is None:
        return None
    model.eval()
    return InferencePlan(model, features + [("flatten",)] + classifier, model.timesteps, dtype)
