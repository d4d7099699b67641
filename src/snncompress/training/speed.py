"""Speed switches of the training loop: bf16 autocast, channels_last, torch.compile with a clean fallback.

Each is a :class:`~snncompress.training.TrainConfig` field (and a training-stage
option), off by default, and runs the same code on CPU tensors as on a GPU:

``precision: bf16``
    convolutions and linear layers run under ``torch.autocast`` in bfloat16;
    the LIF integrates in float32 (:class:`~snncompress.neuron.LIF` casts its
    input current up), so membrane potentials, thresholds and leaks stay float32
    and spikes (0/1) are exact in either type. Parameters and optimizer state
    stay float32.
``channels_last``
    4-D weights and input batches use the NHWC memory layout (faster
    convolutions on tensor cores); the model is handed back in the default layout.
``compile``
    the forward pass goes through :func:`torch.compile`; when compiling fails
    (no compiler, an unsupported op), the loop says so once and continues
    eagerly with the same weights.

Always on, on CPU: :func:`subnormals_as_zero` while training (weights that weight
decay drives below 1.2e-38 made a training step 7x slower, issue 27).
"""

from __future__ import annotations

import contextlib
import warnings

import torch

PRECISIONS = ("fp32", "bf16")
#: torch.compile backend (tests swap in "eager" to check the switch without a C++ build)
COMPILE_BACKEND = "inductor"


def autocast(device, precision: str):
    """Context for the forward pass and loss: bf16 autocast, or nothing for fp32 (``train`` checks the name)."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_memory_format(model: torch.nn.Module, channels_last: bool) -> None:
    """Put the model's 4-D tensors in NHWC (``channels_last``) or back in the default layout."""
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def batch_layout(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """An image batch ``[B, C, H, W]`` in NHWC when ``channels_last`` (else unchanged)."""
    return images.contiguous(memory_format=torch.channels_last) if channels_last and images.dim() == 4 else images


class CompiledForward:
    """``module``'s forward through :func:`torch.compile`, falling back to eager on the first failure."""

    def __init__(self, module: torch.nn.Module, desc: str = "train"):
        self.module, self.desc = module, desc
        self.compiled = torch.compile(module, backend=COMPILE_BACKEND)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: eager is always correct
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                warnings.warn(f"[{self.desc}] torch.compile failed ({type(exc).__name__}: {reason}); "
                              "training continues without it", RuntimeWarning, stacklevel=2)
                self.compiled = None
        return self.module(*args)


@contextlib.contextmanager
def subnormals_as_zero(device):
    """On CPU, treat subnormal floats (below 1.2e-38) as zero in arithmetic while the block runs (x86 FTZ/DAZ,
    :func:`torch.set_flush_denormal`; unlike :func:`snncompress.compress.state.flush_subnormals_`, which zeroes a
    model's stored values, nothing stored changes); afterwards PyTorch's default (off) again. A model whose weights
    decayed into the subnormal range trained at 261 against 36 ms a step (one thread, batch 64) without it."""
    flushing = torch.device(device).type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flushing:
            torch.set_flush_denormal(False)
