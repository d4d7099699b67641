"""Checkpoints: one safetensors file holding the architecture as data and every tensor as the footprint counts it.

Format 2. The safetensors metadata key ``"snncompress"`` holds JSON with
``spec`` (the architecture, see :mod:`snncompress.models`), ``tensors`` (how
each stored tensor is encoded), ``state_quantizers`` (each LIF's membrane-state
quantizer: its configuration and scale) and ``info`` (free-form provenance). Each
tensor of :func:`snncompress.compress.state.stored_tensors` is written in the
format :func:`snncompress.compress.footprint.tensor_cost` chose for it:

=====================  ====================================================================
tensor                 stored as
=====================  ====================================================================
plain                  ``NAME``: the tensor itself (its own dtype)
quantized              ``NAME@codes``: the integer codes, two's complement, bit-packed at the
                       quantizer's width (little-endian bit order); ``NAME@scale``: float32
masked, ``bitmap``     ``NAME@bitmap``: one presence bit per position, packed; the kept
                       values (row-major) as ``NAME@values`` or ``NAME@codes`` + ``NAME@scale``
masked, ``csr``        ``NAME@colidx`` (``ceil(log2 cols)`` bits each) and ``NAME@rowptr``
                       (``rows + 1`` entries of ``ceil(log2(kept + 1))`` bits), packed;
                       values as for ``bitmap``
masked, ``dense``      values as for an unmasked tensor; the mask is reloaded as the
                       nonzero positions (cheapest when nearly everything is kept; a kept
                       weight that is exactly zero then counts as pruned)
=====================  ====================================================================

So the tensor bytes of the file equal the footprint's bytes up to rounding
each packed array up to whole bytes (at most one byte per array, three per
tensor). Masks and quantizers come back attached to their tensors, and the
reloaded model computes the same logits bit for bit (quantization is
idempotent on its own grid, see :mod:`snncompress.compress.quantizers`).
Format 1 files (integer weights and uint8 masks beside a dense state dict)
are still read.

No pickles: the file is read with safetensors only. Writes are atomic.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .compress.masks import get_masks, set_masks
from .compress.quantizers import (Quantizer, UniformQuantizer, attach_quantizer, get_quantizers,
                                  quantizer_from_config)
from .compress.state import StoredTensor, bookkeeping, stored_tensors
from .errors import UserError
from .io import atomic_write
from .compress.footprint import index_bits, tensor_cost
from .models import SpikingNetwork, build_from_spec

FORMAT = 2
READABLE_FORMATS = (1, 2)
META_KEY = "snncompress"
#: What decoding a damaged or foreign file can raise; each becomes one UserError line.
DAMAGED = (KeyError, ValueError, TypeError, AttributeError, IndexError, OverflowError, RuntimeError,
           SafetensorError)
#: First bytes of files that are pickles (never unpickled here): pickle protocol 2+ and torch.save's zip.
PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the ready model (masks and quantizers attached) and its provenance."""

    model: SpikingNetwork
    info: dict = field(default_factory=dict)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return get_masks(self.model)

    @property
    def quantizers(self) -> dict[str, Quantizer]:
        return get_quantizers(self.model)


# ----------------------------------------------------------------------------- bit packing


def pack_uint(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pack non-negative integers (< 2^width) into uint8 bytes, ``width`` bits each, little-endian bits."""
    v = values.reshape(-1).to(torch.int64).numpy().astype(np.uint64)
    bits = ((v[:, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return torch.from_numpy(np.packbits(bits.reshape(-1), bitorder="little"))


def unpack_uint(data: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_uint`: ``count`` int64 values."""
    bits = np.unpackbits(data.numpy(), count=count * width, bitorder="little").reshape(count, width)
    return torch.from_numpy((bits.astype(np.int64) << np.arange(width, dtype=np.int64)).sum(1))


def pack_signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Two's complement ``bits``-bit codes, packed."""
    return pack_uint(codes.to(torch.int64) & ((1 << bits) - 1), bits)


def unpack_signed(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    u = unpack_uint(data, bits, count)
    return torch.where(u >= (1 << (bits - 1)), u - (1 << bits), u)


# ----------------------------------------------------------------------------- encoding


def _encode_values(name: str, values: torch.Tensor, quantizer: Quantizer | None, out: dict) -> None:
    """Values (flat, the kept ones) as plain floats or as packed codes + scale."""
    if quantizer is None:
        out[f"{name}@values"] = values.contiguous()
        return
    codes, scale = quantizer.export(values)
    out[f"{name}@codes"] = pack_signed(codes, quantizer.bits)
    out[f"{name}@scale"] = scale.reshape(quantizer.scale.shape)


def _encode(t: StoredTensor, out: dict) -> dict:
    """Write the arrays of stored tensor ``t`` into ``out``; returns its metadata entry."""
    cost = tensor_cost(t)
    values = t.values.detach().cpu()
    entry = {"shape": list(values.shape), "dtype": str(values.dtype).removeprefix("torch."),
             "format": cost["format"], "masked": t.mask is not None, "kept": cost["stored"],
             "quantizer": t.quantizer.config() if t.quantizer is not None else None}
    if t.mask is None or cost["format"] == "dense":
        if t.quantizer is None:
            out[t.name] = values.contiguous()
        else:
            _encode_values(t.name, values.reshape(-1), t.quantizer, out)
        return entry
    mask = t.mask.detach().cpu().bool()
    _encode_values(t.name, values.reshape(-1)[mask.reshape(-1)], t.quantizer, out)
    if cost["format"] == "bitmap":
        out[f"{t.name}@bitmap"] = pack_uint(mask.reshape(-1), 1)
    else:
        rows = mask.reshape(mask.shape[0] if mask.dim() else 1, -1)
        columns = rows.nonzero()[:, 1]
        pointers = torch.cat([torch.zeros(1, dtype=torch.int64), rows.sum(1).cumsum(0)])
        out[f"{t.name}@colidx"] = pack_uint(columns, index_bits(rows.shape[1]))
        out[f"{t.name}@rowptr"] = pack_uint(pointers, index_bits(cost["stored"] + 1))
    return entry


def _stored_quantizer(name: str, entry: dict, tensors: dict) -> Quantizer | None:
    """The quantizer of stored tensor ``name`` with its stored scale, or None."""
    if entry["quantizer"] is None:
        return None
    quantizer = quantizer_from_config(entry["quantizer"])
    quantizer.scale.copy_(tensors[f"{name}@scale"].reshape(quantizer.scale.shape))
    return quantizer


def _decode_values(name: str, entry: dict, count: int, tensors: dict, quantizer: Quantizer | None) -> torch.Tensor:
    """The ``count`` stored values of ``name`` as floats (codes times scale for a quantized tensor)."""
    dtype = getattr(torch, entry["dtype"])
    if quantizer is None:
        return tensors[f"{name}@values"].to(dtype).reshape(-1)
    return quantizer.dequantize(unpack_signed(tensors[f"{name}@codes"], quantizer.bits, count), dtype)


def _decode(name: str, entry: dict, tensors: dict,
            quantizer: Quantizer | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dense values, mask or None)`` of stored tensor ``name``."""
    shape, numel = entry["shape"], math.prod(entry["shape"])
    if not entry["masked"] or entry["format"] == "dense":
        values = tensors[name] if quantizer is None and name in tensors else \
            _decode_values(name, entry, numel, tensors, quantizer)
        values = values.reshape(shape)
        return values, (values != 0) if entry["masked"] else None
    kept = entry["kept"]
    if entry["format"] == "bitmap":
        mask = unpack_uint(tensors[f"{name}@bitmap"], 1, numel).bool()
    else:
        rows = shape[0] if shape else 1
        cols = numel // max(rows, 1)
        columns = unpack_uint(tensors[f"{name}@colidx"], index_bits(cols), kept)
        pointers = unpack_uint(tensors[f"{name}@rowptr"], index_bits(kept + 1), rows + 1)
        row_of = torch.repeat_interleave(torch.arange(rows), pointers.diff())
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[row_of * cols + columns] = True
    values = torch.zeros(numel, dtype=getattr(torch, entry["dtype"]))
    values[mask] = _decode_values(name, entry, kept, tensors, quantizer)
    return values.reshape(shape), mask.reshape(shape)


# ----------------------------------------------------------------------------- files


def save_checkpoint(path, model: SpikingNetwork, *, info: dict | None = None) -> None:
    """Write ``model`` (with its masks and quantizers) and provenance ``info`` to ``path`` atomically."""
    arrays, entries = {}, {}
    for stored in stored_tensors(model):
        entries[stored.name] = _encode(stored, arrays)
    meta = {"format": FORMAT, "spec": model.spec, "tensors": entries, "state_quantizers": _state_quantizers(model),
            "info": info or {}}
    atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata={META_KEY: json.dumps(meta)}))


def _state_quantizers(model) -> dict:
    """``{lif name: {"config", "scale"}}`` of every LIF with a membrane-state quantizer."""
    return {name: {"config": lif.state_quantizer.config(), "scale": float(lif.state_quantizer.scale)}
            for name, lif in model.spiking_layers() if getattr(lif, "state_quantizer", None) is not None}


def _attach_state_quantizers(model, described: dict) -> None:
    layers = dict(model.spiking_layers())
    for name, entry in described.items():
        quantizer = quantizer_from_config(entry["config"])
        quantizer.scale.fill_(entry["scale"])
        layers[name].state_quantizer = quantizer


def stored_bytes(path) -> int:
    """Bytes of tensor data in the checkpoint at ``path`` (the file minus its header and metadata)."""
    return sum(t.nbytes for t in load_file(str(path)).values())


def read_metadata(path) -> dict:
    """The checkpoint's JSON metadata (spec, tensors, info), without loading tensors."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder, not a file")
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError) as exc:
        if _is_pickle(path):
            raise UserError(f"{path} is a pickle / torch.save file, not a snncompress checkpoint (safetensors); "
                            f"pickles are never loaded") from None
        raise UserError(f"{path} is not a snncompress checkpoint (safetensors): {str(exc).strip()}") from None
    if raw is None:
        raise UserError(f"{path} is a safetensors file without snncompress metadata")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise UserError(f"{path} has damaged snncompress metadata (not JSON)") from None
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise UserError(f"{path} has checkpoint format {found}, this version reads {READABLE_FORMATS}")
    return meta


def _is_pickle(path: Path) -> bool:
    """Whether the file starts like a pickle or a ``torch.save`` archive (only its first bytes are read)."""
    try:
        with open(path, "rb") as f:
            return f.read(4).startswith(PICKLE_MAGIC)
    except OSError:
        return False


@contextmanager
def _decoding(path):
    """Turn what a damaged or foreign file raises while it is decoded into one UserError line."""
    try:
        yield
    except UserError as exc:
        raise UserError(f"checkpoint {path}: {exc}") from None
    except DAMAGED as exc:
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"checkpoint {path} is damaged or not from this tool: {type(exc).__name__}: {reason}") from None


def _check_shapes(spec: dict, state: dict) -> None:
    """The spec's tensors against the stored ones, on the meta device: a spec that does not fit its
    tensors (or asks for a huge network) fails before any memory is allocated for it."""
    with torch.device("meta"):
        fresh = build_from_spec(spec)
    skip = bookkeeping(fresh)  # e.g. BatchNorm's step counter: a format 1 file stores it, format 2 does not
    expected = {k: tuple(v.shape) for k, v in fresh.state_dict().items() if k not in skip}
    stored = {k: tuple(v.shape) for k, v in state.items() if k not in skip}
    if expected != stored:
        name = next(k for k in sorted(set(expected) | set(stored)) if expected.get(k) != stored.get(k))
        raise UserError(f"does not match its architecture: {name} is {stored.get(name, 'missing')} in the "
                        f"file and {expected.get(name, 'absent')} in the spec")


def _format1_state(meta: dict, tensors: dict) -> tuple[dict, dict, dict]:
    """Format 1: ``(state, masks, quantizers)`` from a dense state dict with integer weights beside it."""
    quantizers = {}
    for name, q in meta.get("quant", {}).items():
        scale = tensors.pop(f"{name}@scale").to(torch.float32)
        tensors[name] = tensors[name].to(torch.float32) * scale
        quantizers[name] = UniformQuantizer(q["bits"])
        quantizers[name].scale.copy_(scale)
    masks = {name: tensors.pop(f"{name}@mask").bool() for name in meta.get("masks", [])}
    return tensors, masks, quantizers


def _format2_state(meta: dict, tensors: dict) -> tuple[dict, dict, dict]:
    state, masks, quantizers = {}, {}, {}
    for name, entry in meta["tensors"].items():
        quantizer = _stored_quantizer(name, entry, tensors)
        state[name], mask = _decode(name, entry, tensors, quantizer)
        if mask is not None:
            masks[name] = mask
        if quantizer is not None:
            quantizers[name] = quantizer
    return state, masks, quantizers


def load_checkpoint(path, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model stored at ``path`` with its masks and quantizers, in eval mode."""
    meta = read_metadata(path)
    with _decoding(path):
        tensors = load_file(str(path), device="cpu")
        read = _format2_state if meta["format"] == 2 else _format1_state
        state, masks, quantizers = read(meta, tensors)
        _check_shapes(meta["spec"], state)
        model = build_from_spec(meta["spec"])
        model.load_state_dict({**bookkeeping(model), **state}, strict=True)
        set_masks(model, masks)
        _attach_state_quantizers(model, meta.get("state_quantizers", {}))
        for name, quantizer in quantizers.items():
            attach_quantizer(model, name, quantizer, calibrate=False)
        info = meta.get("info", {})
        if not isinstance(info, dict):
            raise TypeError(f"info is a {type(info).__name__}, not a mapping")
    return Checkpoint(model=model.to(device).eval(), info=info)

