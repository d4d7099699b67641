"""What a compressed model stores: each tensor with the mask and quantizer attached to it.

:func:`stored_tensors` is the one enumeration that the footprint
(:mod:`snncompress.compress.footprint`) costs and the checkpoint
(:mod:`snncompress.checkpoint`) writes, so the two cannot disagree about what
is stored. Buffers of the compression parts themselves (a mask's bits, a
quantizer's scale) belong to the tensor they act on; integer bookkeeping
(BatchNorm's ``num_batches_tracked``) is not needed at inference and is not stored.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..parametrization import own_classes
from .masks import WeightMask
from .quantizers import Quantizer


@dataclass
class StoredTensor:
    """One stored tensor: its plain name, values as stored, its owner module, mask and quantizer.

    ``values`` is the tensor before quantization (the stored original times
    the mask where one is set), shape of the tensor.
    """

    name: str
    values: torch.Tensor
    owner: nn.Module
    mask: torch.Tensor | None = None
    quantizer: Quantizer | None = None


def stored_tensors(model: nn.Module) -> list[StoredTensor]:
    """Every floating-point tensor ``model`` stores, in ``state_dict`` order, under its plain name."""
    modules = dict(model.named_modules())
    found = []
    for key, tensor in model.state_dict(keep_vars=True).items():
        if not torch.is_floating_point(tensor) or ".state_quantizer." in f".{key}":
            continue  # bookkeeping; a LIF's state quantizer is described in the checkpoint's metadata
        path, _, attr = key.rpartition(".")
        parts = path.split(".")
        if "parametrizations" in parts:
            if attr != "original":
                continue  # a mask's or quantizer's own buffer
            at = parts.index("parametrizations")
            found.append(_parametrized(modules, ".".join(parts[:at]), parts[at + 1]))
        else:
            found.append(StoredTensor(key, tensor.detach(), modules.get(path, model)))
    return found


def bookkeeping(model: nn.Module) -> dict[str, torch.Tensor]:
    """The non-float buffers :func:`stored_tensors` leaves out (BatchNorm's ``num_batches_tracked``),
    by ``state_dict`` name, outside any parametrization (a mask's bits are the mask's)."""
    return {k: v for k, v in model.state_dict().items()
            if not torch.is_floating_point(v) and "parametrizations" not in k.split(".")}


def frozen(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` for inference: every mask and quantizer burned into plain tensors.

    The copy computes exactly what ``model`` computes in eval mode (each tensor
    becomes the value its parametrizations produce), without re-applying them at
    every forward pass; it is what deployment and latency timing run.
    """
    copy_ = own_classes(copy.deepcopy(model)).eval()
    for module in list(copy_.modules()):
        for tensor in list(getattr(module, "parametrizations", {}).keys()):
            parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
    return copy_


def _parametrized(modules: dict[str, nn.Module], module_path: str, tensor: str) -> StoredTensor:
    module = modules[module_path]
    plist = module.parametrizations[tensor]
    mask = next((p.mask for p in plist if isinstance(p, WeightMask)), None)
    quantizer = next((p for p in plist if isinstance(p, Quantizer)), None)
    values = plist.original.detach()
    if mask is not None:
        values = values * mask.to(values.dtype)
    name = f"{module_path}.{tensor}" if module_path else tensor
    return StoredTensor(name, values, module, mask, quantizer)


@torch.no_grad()
def flush_subnormals_(model: nn.Module) -> int:
    """Set every subnormal floating-point value of ``model``'s tensors to zero; returns how many there were.

    Trained weights decay into the subnormal range (|w| < ``torch.finfo(dtype).tiny``, 1.2e-38 in
    float32); x86 CPUs handle such operands in microcode, which made a trained Fashion-MNIST
    convnet's CPU forward up to 2x slower than the same shapes with normal values. Their products
    are below 1e-38, far under any accumulated current, so a deployed model drops them, as
    flush-to-zero arithmetic would.
    """
    flushed = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            tiny = (tensor != 0) & (tensor.abs() < torch.finfo(tensor.dtype).tiny)
            flushed += int(tiny.sum())
            tensor.masked_fill_(tiny, 0.0)
    return flushed
