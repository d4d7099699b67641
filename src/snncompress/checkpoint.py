"""Checkpoints: one safetensors file holding the architecture as data and every tensor.

Format (``format`` 1):

* safetensors metadata key ``"snncompress"``: JSON with ``spec`` (the model's
  architecture, see :mod:`snncompress.models`), ``quant`` (for each
  integer-stored weight: ``{"bits": b}``), ``masks`` (names of masked
  weights) and ``info`` (free-form provenance: stage, metrics).
* tensors: the model's ``state_dict``. A quantized weight is stored as
  integers (int8 for <= 8 bits, int16 for <= 16, int32 otherwise) under its
  own name, with its float32 per-layer scale under ``<name>@scale``; the float
  weight is ``integers * scale``. A pruning mask is stored under
  ``<name>@mask`` as uint8.

No pickles: the file is read with safetensors only. Writes are atomic (temp
file in the same folder, then rename), so a killed run never leaves a
half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .errors import UserError
from .models import SpikingNetwork, build_from_spec

FORMAT = 1
META_KEY = "snncompress"


@dataclass
class Checkpoint:
    """A loaded checkpoint: the ready model plus what was stored beside it."""

    model: SpikingNetwork
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    quant: dict[str, dict] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def int_dtype_for(bits: int) -> torch.dtype:
    """Smallest signed integer dtype that holds a ``bits``-bit signed value."""
    return torch.int8 if bits <= 8 else torch.int16 if bits <= 16 else torch.int32


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path, model: SpikingNetwork, *, masks: dict | None = None,
                    quant: dict | None = None, info: dict | None = None) -> None:
    """Write ``model`` (and optional masks, integer weights, provenance) to ``path`` atomically.

    Args:
        masks: ``{param_name: bool tensor}`` pruning masks (same shape as the weight).
        quant: ``{param_name: {"bits": int, "int": int tensor, "scale": float tensor}}``;
            the stored weight becomes those integers and scale.
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    quant_meta = {}
    for name, q in (quant or {}).items():
        tensors[name] = q["int"].detach().cpu().to(int_dtype_for(q["bits"])).contiguous()
        tensors[f"{name}@scale"] = torch.as_tensor(q["scale"], dtype=torch.float32).cpu().contiguous()
        quant_meta[name] = {"bits": int(q["bits"])}
    for name, m in (masks or {}).items():
        tensors[f"{name}@mask"] = m.detach().cpu().to(torch.uint8).contiguous()
    meta = {"format": FORMAT, "spec": model.spec, "quant": quant_meta,
            "masks": sorted(masks or {}), "info": info or {}}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)}))


def read_metadata(path) -> dict:
    """The checkpoint's JSON metadata (spec, quant, masks, info), without loading tensors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path} is not a snncompress checkpoint (safetensors): {exc}") from None
    if raw is None:
        raise UserError(f"{path} is a safetensors file without snncompress metadata")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} has checkpoint format {meta.get('format')}, this version reads {FORMAT}")
    return meta


def load_checkpoint(path, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model stored at ``path`` (masks applied, integer weights dequantized)."""
    meta = read_metadata(path)
    tensors = load_file(str(path), device=str(device))
    model = build_from_spec(meta["spec"]).to(device)
    quant = {}
    for name, q in meta.get("quant", {}).items():
        ints, scale = tensors[name], tensors.pop(f"{name}@scale")
        quant[name] = {"bits": q["bits"], "int": ints, "scale": scale}
        tensors[name] = ints.to(torch.float32) * scale
    masks = {name: tensors.pop(f"{name}@mask").bool() for name in meta.get("masks", [])}
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise UserError(f"checkpoint {path} does not match its architecture: "
                        f"{' '.join(line.strip() for line in first[:3])}") from None
    model.masks = masks
    return Checkpoint(model=model.eval(), masks=masks, quant=quant, info=meta.get("info", {}))


def load(path, device: str | torch.device = "cpu") -> SpikingNetwork:
    """The model stored in a snncompress checkpoint, in eval mode, ready to run."""
    return load_checkpoint(path, device).model
