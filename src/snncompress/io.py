"""File helpers: every file the package writes goes through :func:`atomic_write`.

A write goes to a temporary file in the destination folder, then is renamed
onto the destination, so a killed run never leaves a half-written file.
Under ``torchrun`` only rank 0 writes (:func:`snncompress.distributed.is_writer`);
the other ranks' writes are skipped (``every_rank=True``: caches any process may fill).

A failed write (a full disk, a read-only or over-quota file system, no permission;
safetensors reports these as ``SafetensorError``) is a :class:`UserError` naming the
file and the cause; the temporary file is removed, so the destination keeps its
previous complete content or stays absent. The C kernel build
(:mod:`snncompress.kernels.cpu`) is the one writer apart: it compiles into a temporary
folder and renames the library, and a failure there falls back to another backend.
"""

from __future__ import annotations

import errno
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


#: errno -> the cause a refusal names
WRITE_FAILURES = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only",
                  errno.EDQUOT: "the disk quota is exceeded", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted", errno.EFBIG: "the file is too large",
                  errno.EIO: "input/output error"}


def write_failure(path: Path, exc: BaseException) -> UserError | None:
    """The :class:`UserError` for a write of ``path`` that failed with ``exc``, or None if it is not an I/O failure.

    ``OSError`` carries an errno; safetensors' ``SafetensorError`` only a message, searched for the
    operating system's wording of the same causes.
    """
    if isinstance(exc, OSError):
        cause = WRITE_FAILURES.get(exc.errno) or exc.strerror or str(exc)
    elif type(exc).__name__ == "SafetensorError":
        text = str(exc).lower()
        cause = next((reason for code, reason in WRITE_FAILURES.items() if os.strerror(code).lower() in text),
                     None)
        if cause is None:
            return None
    else:
        return None
    return UserError(f"cannot write {path}: {cause}; nothing was left half-written: free space or fix the "
                     f"folder, then rerun the same command to resume")


def atomic_write(path: Path, write, *, every_rank: bool = False) -> None:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path`` atomically (rank 0 only, unless
    ``every_rank``). An I/O failure is a :class:`UserError` naming ``path`` (:func:`write_failure`)."""
    if not (every_rank or is_writer()):
        return
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        failure = write_failure(path, exc)
        if failure is not None:
            raise failure from None
        raise


def write_bytes(path: Path, data: bytes, *, every_rank: bool = False) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), every_rank=every_rank)


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
