"""File helpers: every file the package writes goes through :func:`atomic_write`.

A write goes to a temporary file in the destination folder, then is renamed
onto the destination, so a killed run never leaves a half-written file.
Under ``torchrun`` only rank 0 writes (:func:`snncompress.distributed.is_writer`);
the other ranks' writes are skipped.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .distributed import is_writer
from .errors import UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path`` atomically (rank 0 only)."""
    if not is_writer():
        return
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


@contextmanager
def folder_lock(folder: Path, what: str = "run"):
    """Hold an exclusive lock on ``folder`` (file ``.lock`` inside) while the block runs.

    A second holder is refused with a :class:`~snncompress.errors.UserError` naming the
    live process. The lock is the operating system's (``flock``), so a killed process
    releases it at once. Only rank 0 locks under ``torchrun``; without ``fcntl``
    (Windows) nothing is locked.
    """
    if fcntl is None or not is_writer():
        yield
        return
    path = Path(folder) / ".lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            pid = handle.read().strip()
            raise UserError(f"{folder} is in use by a live snncompress {what}{f' (pid {pid})' if pid else ''}; "
                            f"wait for it to finish or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
