"""Resumable training: an atomic snapshot of a training run between two optimizer steps, without pickles.

A snapshot is one safetensors file (written through :func:`snncompress.io.atomic_write`,
so a kill leaves the previous snapshot or the new one, never half of one):

===================  ============================================================
tensors              ``model.NAME`` (the full ``state_dict``: parametrization
                     originals, masks, quantizer scales, BN statistics),
                     ``optim.I.KEY`` (each parameter's optimizer state),
                     ``rng.torch`` / ``rng.cuda`` (``[world, n]`` uint8, one row
                     per rank), ``rng.numpy``, ``cb.I.KEY`` (callback tensors)
metadata (JSON)      ``key`` (which run this belongs to), ``progress``
                     (:class:`Progress`), ``param_groups``, the Python RNG,
                     callbacks' non-tensor state
===================  ============================================================

Loading restores all of it, so the resumed run continues with the same
weights, optimizer moments, learning rate, data order and random draws, and
ends with the same final weights as an uninterrupted run (on the same machine
and thread count). A snapshot whose key does not match (other config, other
starting weights) is ignored.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..io import atomic_write
from .. import distributed

META_KEY = "snncompress-train-snapshot"


@dataclass
class Progress:
    """Where a training run stands between two steps (what a snapshot must restore besides tensors)."""

    epoch: int = 0              # epochs finished
    batch: int = 0              # batches done in the current epoch
    step: int = 0               # optimizer steps done in all
    loader_epoch: int = 0       # the training loader's epoch counter when the current epoch began
    sums: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # this epoch so far: loss sum, correct, seen
    seconds: float = 0.0        # this epoch's training time before the snapshot
    lr: float = 0.0             # the last step's learning rate
    epochs: int = 0             # the epochs the schedule spans (fewer than asked when a time budget cuts it)
    history: list = field(default_factory=list)  # the finished epochs' rows


def run_key(config, model: torch.nn.Module, batches_per_epoch: int) -> str:
    """Hash of the config, the batches per epoch, the number of ranks and the starting weights.

    A snapshot resumes only its own run.
    """
    settings = config.model_dump(exclude={"snapshot_every_steps"})  # how often, not what
    shape = [settings, batches_per_epoch, distributed.world_size()]  # one RNG row per rank
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def save_snapshot(path: Path, key: str, model, optimizer, progress: Progress, callbacks=()) -> None:
    """Write the snapshot atomically (rank 0 writes; every rank must call it: the RNG rows are gathered)."""
    tensors, meta = _rng_state()
    tensors.update({f"model.{k}": v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()})
    opt = optimizer.state_dict()
    extra = {}
    for index, state in opt["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().clone().contiguous()
            else:
                extra[f"{index}.{name}"] = value
    meta.update(key=key, progress=asdict(progress), param_groups=opt["param_groups"], optim_extra=extra,
                callbacks=[_callback_state(cb, i, tensors) for i, cb in enumerate(callbacks)])
    if distributed.is_writer():
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)}))


def load_snapshot(path: Path, key: str, model, optimizer, callbacks=()) -> Progress | None:
    """Restore a matching snapshot into ``model``, ``optimizer``, the RNGs and ``callbacks``; else None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
        tensors = load_file(str(path))
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        print(f"[resume] ignoring unreadable snapshot {path.name}: {exc}", flush=True)
        return None
    if meta.get("key") != key:
        print(f"[resume] {path.name} belongs to another configuration or starting model; starting over", flush=True)
        return None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer.load_state_dict(_optimizer_state(tensors, meta))
    for i, cb in enumerate(callbacks):
        state = dict(meta["callbacks"][i]) if i < len(meta["callbacks"]) else {}
        state.update({k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"cb.{i}.")})
        cb.load_state_dict(state)
    _set_rng_state(tensors, meta)
    return Progress(**meta["progress"])


def _optimizer_state(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["optim_extra"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _callback_state(callback, index: int, tensors: dict) -> dict:
    """A callback's state: its tensors go into ``tensors`` (``cb.I.KEY``), the rest is returned for JSON."""
    plain = {}
    for name, value in callback.state_dict().items():
        if torch.is_tensor(value):
            tensors[f"cb.{index}.{name}"] = value.detach().cpu().clone().contiguous()
        else:
            plain[name] = value
    return plain


def _rng_state() -> tuple[dict, dict]:
    """Every random generator a training step draws from: torch (per rank), CUDA, NumPy, Python."""
    tensors = {"rng.torch": distributed.gather_rows(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = distributed.gather_rows(torch.cuda.get_rng_state().cuda()).cpu()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, state, python_gauss = random.getstate()
    meta = {"numpy_rng": [kind, int(pos), int(has_gauss), float(gauss)],
            "python_rng": [version, list(state), python_gauss]}
    return tensors, meta


def _set_rng_state(tensors: dict, meta: dict) -> None:
    rank = distributed.rank()
    torch.set_rng_state(tensors["rng.torch"][rank].clone())
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"][rank].clone())
    kind, pos, has_gauss, gauss = meta["numpy_rng"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, python_gauss = meta["python_rng"]
    random.setstate((version, tuple(state), python_gauss))
