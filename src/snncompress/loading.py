"""``snncompress.load``: a model from any file this package writes (a checkpoint, or a NIR graph it exported)."""

from __future__ import annotations

import torch

from .checkpoint import load_checkpoint
from .models import SpikingNetwork


def load(path, device: str | torch.device = "cpu") -> SpikingNetwork:
    """The model stored at ``path`` in eval mode: a safetensors checkpoint, or a NIR file (HDF5) written by
    :func:`snncompress.deploy.nir.write_nir` (the ``nir`` extra). Anything else is a one-line UserError."""
    from .deploy.nir import is_nir_file, load_nir  # NIR is an optional extra

    if is_nir_file(path):
        return load_nir(path).to(device).eval()
    return load_checkpoint(path, device).model
