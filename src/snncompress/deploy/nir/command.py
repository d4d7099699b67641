"""The ``snncompress export`` command: a checkpoint or NIR file to NIR or a safetensors checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

from ...errors import UserError
from .export import export_notes, write_nir
from .graph import import_graph
from .load import import_nir, is_nir_file, load_nir, read_nir
from .mapping import DEFAULT_DT, _check_dt, require_nir


def _check_out_file(out) -> Path:
    """``--out`` as a file path whose folder exists (or can be made) and is writable; a UserError otherwise."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name")
    folder = next((p for p in out.parents if p.exists()), Path("."))
    if not folder.is_dir():
        raise UserError(f"--out {out}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {folder} is not writable")
    return out


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``"C,H,W"`` (or ``"N"``) as a tuple of positive ints; None stays None; a UserError for anything else."""
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        shape = ()
    if not shape or any(v < 1 for v in shape):
        raise UserError(f"--input-shape must be positive integers separated by commas (C,H,W or N), got {text!r}")
    return shape


def describe_graph_model(model) -> str:
    """One line: the node kinds, input, outputs, T, dt and reset of a graph network."""
    kinds: dict[str, int] = {}
    for node in model.spec["graph"]["nodes"]:
        if node["kind"] not in ("input", "output"):
            kinds[node["kind"]] = kinds.get(node["kind"], 0) + 1
    resets = sorted({n["reset"] for n in model.spec["graph"]["nodes"] if "reset" in n})
    dt = model.spec.get("dt")
    return (f"{', '.join(f'{n} {k}' for k, n in kinds.items())}; input {list(model.spec['in_shape'])}, "
            f"{model.spec['num_classes']} outputs, T {model.timesteps}, dt {'-' if dt is None else f'{dt:g}'}, "
            f"reset {'/'.join(resets) or '-'}, integration {model.spec.get('integration', 'euler')}")


def import_command(source, out, *, input_shape: str | None = None, timesteps: int | None = None,
                   dt: float | None = None, integration: str = "euler", reset: str | None = None) -> None:
    """``snncompress import FILE.nir --out CKPT``: a NIR graph from any framework as a checkpoint of a graph
    network (a file this package wrote comes back as the model it was). Everything is checked before writing."""
    from ...checkpoint import save_checkpoint

    out = _check_out_file(out)
    if dt is not None:
        dt = _check_dt(dt)
    source = Path(source)
    graph = read_nir(source)
    own = "snncompress_spec" in dict(getattr(graph, "metadata", None) or {})
    if own:
        model = import_nir(graph)
        if timesteps is not None:
            model.timesteps = int(timesteps)
    else:
        model = import_graph(graph, timesteps=timesteps, input_shape=parse_shape(input_shape), dt=dt,
                             integration=integration, reset=reset)
    save_checkpoint(out, model, info={"imported_from": source.name})
    what = describe_graph_model(model) if model.spec.get("family") == "graph" else f"{model.spec.get('arch')}"
    print(f"wrote {out}: snncompress checkpoint of {'graph network' if not own else 'model'} from {source.name} "
          f"({what})")


def export_command(source, fmt: str, out, *, dt: float = DEFAULT_DT, soft_reset: str = "annotate",
                   leak_one: str = "if") -> None:
    """``snncompress export SOURCE --format nir|safetensors --out FILE``.

    ``SOURCE`` is a checkpoint (``.safetensors``) or a NIR file this package wrote
    (recognised by its HDF5 header). Checks everything before writing; prints what was written.
    """
    from ...checkpoint import load_checkpoint, save_checkpoint

    out = _check_out_file(out)
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
