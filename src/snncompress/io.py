"""File helpers: every file the package writes goes through :func:`atomic_write`.

A write goes to a temporary file in the destination folder, then is renamed
onto the destination, so a killed run never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


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


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_json(path: Path, data) -> None:
    """Write ``data`` as indented JSON atomically (floats for non-JSON numbers such as numpy scalars)."""
    write_bytes(path, (json.dumps(data, indent=2, default=float) + "\n").encode())


def save_figure(fig, path: Path) -> str:
    """Write a matplotlib ``Figure`` as PNG atomically (Agg canvas, no display); returns the file name."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    return Path(path).name
