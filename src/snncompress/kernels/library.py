"""The C kernel library: its sources (package data in ``csrc/``), build, cache, load and ctypes signatures.

The sources are ``csrc/common.c`` (helpers, ``pack_u8_f32``), ``csrc/lif.c`` (the LIF and
average-pool kernels, written once over the placeholders ``SCALAR`` / ``SUF`` and instantiated
for float / f32 and double / f64) and ``csrc/population.c`` (the Diehl & Cook population loop
of :mod:`.population`). They are joined into one translation unit, compiled on first use with
the system C compiler, cached under a key that hashes that text, the compiler, its flags, the
host CPU and the PyTorch version, and loaded with :mod:`ctypes` (OpenMP threads shared with
PyTorch's runtime). Elements of one timestep are split in tiles of TILE contiguous elements; a
tile walks all T steps with its state in L1, so every tensor is touched once.
``-ffp-contract=off`` keeps ``u = leak*h + I`` two roundings, as in the reference (bit-exact
spikes).

Environment: ``SNNCOMPRESS_NO_CEXT=1`` disables the C kernel,
``SNNCOMPRESS_CACHE`` sets the build cache folder, ``CC`` the compiler.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.resources
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def read_source(name: str) -> str:
    """The text of the C source file ``csrc/<name>`` shipped with the package."""
    return (importlib.resources.files(__package__) / "csrc" / name).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def c_source() -> str:
    """The one translation unit the library is built from (its text is part of the cache key)."""
    template = read_source("lif.c")
    return read_source("common.c") + "".join(
        template.replace("SCALAR", ctype).replace("SUF", suf)
        for ctype, suf in (("float", "f32"), ("double", "f64"))) + read_source("population.c")


_lib = None
_lib_error: str | None = None
_lib_lock = threading.Lock()

BASE_FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno"]


def _cache_dir() -> Path:
    env = os.environ.get("SNNCOMPRESS_CACHE")
    if env:
        return Path(env) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "snncompress" / "kernels"


def _cpu_fingerprint() -> str:
    """Identifies the host CPU, so that a ``-march=native`` build is never reused on another one."""
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    text += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        pass
    return text


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    return None


def _try_build(cc: str, flags: list[str], out: Path) -> str | None:
    """Compile :func:`c_source` into ``out`` atomically; returns an error message or None."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "lif_cpu.c"
        src.write_text(c_source())
        so = Path(tmp) / out.name
        proc = subprocess.run([cc, *flags, str(src), "-o", str(so)], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            return (proc.stderr or proc.stdout).strip()[-2000:]
        os.replace(so, out)  # atomic: a concurrent builder never sees a half-written library
    return None


def _declare(lib) -> None:
    P, I64, INT, DBL = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    for suf in ("f32", "f64"):
        fwd = getattr(lib, f"lif_fwd_{suf}")
        fwd.argtypes = [P, I64, P, P, P, P, I64, I64, I64, I64, INT, INT]
        fwd.restype = None
        bwd = getattr(lib, f"lif_bwd_{suf}")
        bwd.argtypes = [P, I64, P, P, P, P, P, P, I64, I64, I64, I64, INT, INT, DBL, INT, INT]
        bwd.restype = None
    for suf in ("f32", "f64"):
        for name in ("avgpool_fwd", "avgpool_bwd"):
            fn = getattr(lib, f"{name}_{suf}")
            fn.argtypes = [P, P, I64, I64, I64, I64, INT]
            fn.restype = None
    lib.pack_u8_f32.argtypes = [P, I64, P, ctypes.c_float, INT]
    lib.pack_u8_f32.restype = INT
    lib.snn_has_openmp.restype = INT
    fn = lib.dc_population_f32  # csrc/population.c
    fn.argtypes = [I64, I64, I64, P, P, P, P, P, P, P, P, P, P, P, P, P, P, P, P, INT, INT]
    fn.restype = None


def load_library():
    """The compiled kernel library (ctypes.CDLL), building it on first use; None if impossible.

    Tries ``-march=native -fopenmp`` first, then without OpenMP, then portable flags.
    The reason for a failure is kept in :func:`build_error`.
    """
    global _lib, _lib_error
    if _lib is not None or _lib_error is not None:
        return _lib
    with _lib_lock:
        if _lib is not None or _lib_error is not None:
            return _lib
        if os.environ.get("SNNCOMPRESS_NO_CEXT", "") not in ("", "0"):
            _lib_error = "disabled by SNNCOMPRESS_NO_CEXT"
            return None
        if not sys.platform.startswith(("linux", "darwin")):
            _lib_error = f"no C kernel build on {sys.platform}"
            return None
        cc = _compiler()
        if cc is None:
            _lib_error = "no C compiler found (set CC)"
            return None
        errors = []
        variants = [["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], []]
        for extra in variants:
            flags = BASE_FLAGS + extra
            key = hashlib.sha256("\0".join([c_source(), cc, *flags, _cpu_fingerprint(),
                                            torch.__version__]).encode()).hexdigest()[:16]
            path = _cache_dir() / f"lif_cpu_{key}.so"
            try:
                if not path.exists():
                    try:
                        path.parent.mkdir(parents=True, exist_ok=True)
                    except OSError:  # read-only home: build under the temp folder instead
                        path = Path(tempfile.gettempdir()) / f"snncompress-{os.getuid()}" / path.name
                if not path.exists():
                    err = _try_build(cc, flags, path)
                    if err:
                        errors.append(f"{' '.join(extra) or 'plain'}: {err.splitlines()[-1] if err else ''}")
                        continue
                lib = ctypes.CDLL(str(path))
                _declare(lib)
                _lib = lib
                log.debug("snncompress LIF C kernel loaded from %s", path)
                return _lib
            except (OSError, subprocess.SubprocessError, AttributeError) as exc:
                errors.append(f"{' '.join(extra) or 'plain'}: {exc}")
        _lib_error = "; ".join(errors) or "unknown build failure"
        log.warning("snncompress: C LIF kernel unavailable, using the PyTorch fallback (%s)", _lib_error)
        return None


def build_error() -> str | None:
    """Why the C kernel is not in use (None while it is, or before the first attempt)."""
    return _lib_error


def cext_available() -> bool:
    """True if the compiled C kernel can be (and now is) loaded."""
    return load_library() is not None
