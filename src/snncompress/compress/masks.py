"""Pruning masks that live on the module, beside the weight they mask.

A mask is a bool buffer inside a ``torch.nn.utils.parametrize`` parametrization
of the masked tensor, so the module computes with ``weight = original * mask``:

* the forward pass sees exact zeros at masked positions;
* the gradient reaching ``original`` at a masked position is exactly zero
  (``d(original * 0) / d original = 0``);
* ``.to()`` moves the mask with the module, ``state_dict`` holds it
  (``<module>.parametrizations.weight.0.mask``) and ``copy.deepcopy`` copies it.

A mask always comes first in the tensor's parametrization chain, so a
quantizer attached to the same tensor sees the masked weight: the effective
weight is ``Q(original * mask)``. :func:`enforce_masks_` also zeroes
``original`` at masked positions (weight decay would otherwise let stored
values drift under a zero mask); the training loop calls it after each step.

Names are the plain ones (``features.0.weight``), whatever parametrizations
the module carries.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


class WeightMask(nn.Module):
    """Parametrization ``w -> w * mask``; ``mask`` is a bool buffer of ``w``'s shape."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)

    def extra_repr(self) -> str:
        return f"kept={int(self.mask.sum())}/{self.mask.numel()}"


def split_name(name: str) -> tuple[str, str]:
    """``"features.0.weight"`` -> ``("features.0", "weight")``."""
    module, _, tensor = name.rpartition(".")
    return module, tensor


def owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding tensor ``name`` and the tensor's attribute name on it."""
    module_name, tensor = split_name(name)
    return (model.get_submodule(module_name) if module_name else model), tensor


def chain(module: nn.Module, tensor: str) -> list[nn.Module]:
    """The parametrizations on ``module.<tensor>`` in application order (empty when none)."""
    if not parametrize.is_parametrized(module, tensor):
        return []
    return list(module.parametrizations[tensor])


def find(module: nn.Module, tensor: str, kind: type) -> nn.Module | None:
    """The parametrization of type ``kind`` on ``module.<tensor>`` (a mask, a quantizer), or None."""
    return next((p for p in chain(module, tensor) if isinstance(p, kind)), None)


def attached(model: nn.Module, kind: type) -> dict[str, nn.Module]:
    """``{tensor name: parametrization}`` of every parametrization of type ``kind`` in ``model``, in module order."""
    found = {}
    for module_name, module in model.named_modules():
        for tensor, plist in getattr(module, "parametrizations", {}).items():
            for p in plist:
                if isinstance(p, kind):
                    found[f"{module_name}.{tensor}" if module_name else tensor] = p
    return found


def detach(module: nn.Module, tensor: str, part: nn.Module) -> None:
    """Remove parametrization ``part`` from ``module.<tensor>``, keeping the stored values as they are."""
    plist = module.parametrizations[tensor]
    if len(plist) == 1:
        parametrize.remove_parametrizations(module, tensor, leave_parametrized=False)
    else:
        del plist[next(i for i, p in enumerate(plist) if p is part)]


def original(module: nn.Module, tensor: str) -> torch.Tensor:
    """The stored (unparametrized) tensor behind ``module.<tensor>``."""
    if parametrize.is_parametrized(module, tensor):
        return module.parametrizations[tensor].original
    return getattr(module, tensor)


def set_mask(model: nn.Module, name: str, mask: torch.Tensor) -> None:
    """Mask tensor ``name`` of ``model`` with ``mask`` (bool, the tensor's shape); replaces an earlier mask."""
    module, tensor = owner(model, name)
    target = original(module, tensor)
    if tuple(mask.shape) != tuple(target.shape):
        raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, the tensor {tuple(target.shape)}")
    existing = find(module, tensor, WeightMask)
    if existing is not None:
        existing.mask.copy_(mask.to(existing.mask.device, torch.bool))
    else:
        parametrize.register_parametrization(module, tensor, WeightMask(mask.to(target.device)))
        plist = module.parametrizations[tensor]
        if len(plist) > 1:  # masks first: quantizers see the masked weight
            plist.insert(0, plist.pop(len(plist) - 1))
    enforce_masks_(model, [name])


def set_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """:func:`set_mask` for every ``{name: mask}``."""
    for name, mask in masks.items():
        set_mask(model, name, mask)


def get_mask(model: nn.Module, name: str) -> torch.Tensor | None:
    """The bool mask of tensor ``name`` (the buffer itself), or None."""
    found = find(*owner(model, name), WeightMask)
    return found.mask if found is not None else None


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: bool mask}`` of every masked tensor of ``model``, in module order."""
    return {name: p.mask for name, p in attached(model, WeightMask).items()}


def remove_mask(model: nn.Module, name: str, burn_in: bool = True) -> None:
    """Drop the mask of tensor ``name``; with ``burn_in`` the masked positions stay zero in storage."""
    module, tensor = owner(model, name)
    if burn_in:
        enforce_masks_(model, [name])
    detach(module, tensor, find(module, tensor, WeightMask))


def remove_masks(model: nn.Module, burn_in: bool = True) -> None:
    """:func:`remove_mask` for every masked tensor of ``model``."""
    for name in list(get_masks(model)):
        remove_mask(model, name, burn_in)


@torch.no_grad()
def enforce_masks_(model: nn.Module, names: list[str] | None = None) -> None:
    """Zero the stored values at masked positions (all masked tensors, or ``names``)."""
    masks = get_masks(model)
    for name in names if names is not None else list(masks):
        module, tensor = owner(model, name)
        original(module, tensor).mul_(masks[name].to(original(module, tensor).dtype))


def density(model: nn.Module) -> float:
    """Kept fraction over all masked tensors (1.0 when nothing is masked)."""
    masks = get_masks(model).values()
    total = sum(m.numel() for m in masks)
    return float(sum(int(m.sum()) for m in masks) / total) if total else 1.0
