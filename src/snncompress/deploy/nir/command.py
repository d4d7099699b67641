"""The ``snncompress export`` command: a checkpoint or NIR file to NIR or a safetensors checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

from ...errors import UserError
from .export import export_notes, write_nir
from .load import is_nir_file, load_nir
from .mapping import DEFAULT_DT, _check_dt, require_nir


def export_command(source, fmt: str, out, *, dt: float = DEFAULT_DT, soft_reset: str = "annotate",
                   leak_one: str = "if") -> None:
    """``snncompress export SOURCE --format nir|safetensors --out FILE``.

    ``SOURCE`` is a checkpoint (``.safetensors``) or a NIR file this package wrote
    (recognised by its HDF5 header). Checks everything before writing; prints what was written.
    """
    from ...checkpoint import load_checkpoint, save_checkpoint

    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name")
    folder = next((p for p in out.parents if p.exists()), Path("."))
    if not folder.is_dir():
        raise UserError(f"--out {out}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {folder} is not writable")
    dt = _check_dt(dt)
    if fmt not in ("nir", "safetensors"):
        raise UserError(f"--format must be nir or safetensors, got {fmt!r}")
    if fmt == "nir":
        require_nir()
    source = Path(source)
    from_nir = source.is_file() and is_nir_file(source)
    model = load_nir(source) if from_nir else load_checkpoint(source).model
    if fmt == "safetensors":
        save_checkpoint(out, model, info={"imported_from": source.name} if from_nir else {"copied_from": source.name})
        print(f"wrote {out}: snncompress checkpoint of {model.spec.get('arch')} (T = {model.timesteps}) "
              f"from {'NIR file' if from_nir else 'checkpoint'} {source.name}")
        return
    graph = write_nir(model, out, dt=dt, soft_reset=soft_reset, leak_one=leak_one)
    kinds: dict[str, int] = {}
    for node in graph.nodes.values():
        kinds[type(node).__name__] = kinds.get(type(node).__name__, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in kinds.items() if k not in ("Input", "Output"))
    print(f"wrote {out}: NIR graph of {model.spec.get('arch')} ({summary}), dt {dt:g}, T {model.timesteps}")
    for note in export_notes(graph):
        print(f"note: {note}")
