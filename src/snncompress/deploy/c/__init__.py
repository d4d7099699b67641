"""The C engine: compile a spiking VGG / convnet or an imported graph chain to dependency-free C99
(docs/deployment/c.md).

:func:`compile_engine` folds the model into tables (:mod:`.engine`), :func:`c_sources` writes
them as ``snn_model.h`` / ``snn_model.c`` beside the runtime (``snn_runtime.c``/``.h``,
``snn_main.c``: package data), :func:`run_reference` is the numpy twin of the runtime's
arithmetic, and :func:`write_c_folder` writes a checked export folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from ...errors import UserError
from ...io import write_bytes
from .emit import RUNTIME_FILES, c_sources
from .engine import Engine, EngineLayer, check_supported, compile_engine
from .reference import Trace, run_reference

#: Files an export folder holds.
EXPORT_FILES = ("snn_model.h", "snn_model.c") + RUNTIME_FILES


def check_out_folder(out) -> Path:
    """``out`` as a folder the export may write (absent, or a folder); a UserError otherwise."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; the C export writes a folder")
    existing = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {existing} is not writable")
    return out


def write_c_folder(model, out, mean, std, description: str, pack_weights: bool = False) -> Engine:
    """Compile ``model`` and write the export folder ``out`` (every check before the first write).

    ``pack_weights``: store integer weight codes as a bit stream of their width (:func:`.emit.model_sources`).
    """
    out = check_out_folder(out)
    engine = compile_engine(model, mean, std)
    files = c_sources(engine, description, pack_weights)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        write_bytes(out / name, text.encode())
    return engine


def export_c_command(source, out, normalisation, dataset: str | None = None, pack_weights: bool = False) -> Engine:
    """``snncompress export CKPT --format c --out DIR``: check, compile, then write the folder.

    ``normalisation(dataset_name) -> (mean, std)`` is handed in by the caller (the dataset
    tables live above this layer); ``dataset`` defaults to the one the checkpoint records.
    """
    from ...checkpoint import load_checkpoint

    out = check_out_folder(out)
    loaded = load_checkpoint(source)
    check_supported(loaded.model)
    dataset = dataset or loaded.info.get("dataset")
    if not dataset:
        raise UserError(f"checkpoint {source} does not record its dataset (needed for the input normalisation); "
                        f"pass --dataset")
    mean, std = normalisation(dataset)
    model = loaded.model
    description = (f"{model.spec.get('arch')} from {Path(source).name}, T = {model.timesteps}, "
                   f"dataset {dataset}")
    engine = write_c_folder(model, out, mean, std, description, pack_weights)
    kind = f"integer ({engine.weight_bits}-bit weight codes{', bit-packed' if pack_weights else ''})" \
        if engine.integer else "float32"
    sparse = sum(not layer.dense for layer in engine.layers)
    print(f"wrote {out}: C99 engine of {model.spec.get('arch')} ({kind}, T = {engine.timesteps}, "
          f"{len(engine.layers)} layers, {sparse} sparse); build: cc -O2 -o snn {out}/*.c")
    return engine


__all__ = ["export_c_command", "EXPORT_FILES", "Engine", "EngineLayer", "Trace", "c_sources", "check_supported", "compile_engine",
           "run_reference", "write_c_folder"]
