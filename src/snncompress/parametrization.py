"""Helpers for ``torch.nn.utils.parametrize`` that every layer of the package needs (a leaf: imports torch only)."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize


def own_classes(root: nn.Module) -> nn.Module:
    """Give every parametrized module under ``root`` a class of its own; returns ``root``.

    ``torch.nn.utils.parametrize`` puts a module's tensor properties on a class made for
    that module, and ``copy.deepcopy`` keeps the class: a copy and its original then share
    it, so adding or removing a parametrization on the copy would add or remove the
    property on the original too. Call this on a fresh deep copy (``SpikingNetwork`` does).
    """
    for module in root.modules():
        if parametrize.is_parametrized(module):
            cls = type(module)
            namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
            module.__class__ = type(cls.__name__, cls.__bases__, namespace)
    return root
