"""Fused multi-step LIF on CPU: one pass over memory forward, one backward.

The reference :func:`snncompress.neuron.lif_multistep` runs ~10 tensor ops per
timestep forward and ~20 in autograd's backward, each a full pass over
``[B, ...]`` memory, and saves 3-4 tensors per step. This module computes the
same function with

* a C kernel (compiled on first use with the system C compiler, cached, loaded
  with :mod:`ctypes`; OpenMP threads shared with PyTorch's runtime). Forward
  reads ``I`` once and writes spikes ``o`` and the pre-reset potential ``u``
  once; backward reads ``grad_o`` and ``u`` once and writes ``grad_I`` once,
  reducing ``dL/dleak`` and ``dL/dthr`` per channel on the fly;
* a pure-PyTorch fallback with the same saved state (``u`` only) for machines
  without a C compiler or for other devices.

Saved for backward: ``u`` ``[T, B, ...]`` in the working dtype, nothing else;
spikes, ``z`` and the reset state are recomputed from it bit-exactly. Under
``torch.inference_mode`` / ``no_grad`` nothing is saved.

Backward recurrence (``h`` = ``u_hat``, ``g[t] = dL/do[t]``, ``sg`` the
surrogate derivative at ``z[t] = u[t]/thr - 1``; ``dh[T-1] = 0``)::

    du[t]   = g[t] * sg[t] / thr + dh[t] * (1 | hard: 1 - o[t])
    dh[t-1] = leak * du[t]
    dI[t]   = du[t]
    dleak   = sum_t du[t] * h[t-1]
    dthr    = sum_t -g[t] * sg[t] * u[t] / thr^2  (soft reset: - dh[t] * o[t])

summed over every broadcast dimension of ``leak`` / ``thr`` (scalar: all;
per-channel: all but the channel dimension). When the input is one tensor
broadcast over T (conv1's output feeding the first LIF), the kernel takes that
tensor itself as its autograd input and returns ``sum_t dI[t]``.

Memory layouts: each timestep must be dense (contiguous or channels_last; the
kernel walks it in memory order); the time stride is free (0 = broadcast).

Environment: ``SNNCOMPRESS_NO_CEXT=1`` disables the C kernel,
``SNNCOMPRESS_CACHE`` sets the build cache folder, ``CC`` the compiler.
"""

from __future__ import annotations

import ctypes
import hashlib
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

from ..neuron import RESETS, SURROGATES, lif_multistep, surrogate_grad, surrogate_scale
from .population_c import POPULATION_C, declare_population

log = logging.getLogger(__name__)

#: How many surrogate formulas the C and Triton kernels implement (``KIND`` 0, 1, 2).
KERNEL_SURROGATES = 3

#: ``KIND`` of each surrogate the fused kernels support: its position in
#: :data:`snncompress.neuron.SURROGATE_TABLE`. Other surrogates run the reference.
SURROGATE_IDS = {name: kind for kind, name in enumerate(SURROGATES[:KERNEL_SURROGATES])}


def mark_keep(t: torch.Tensor) -> torch.Tensor:
    """Flag a tensor our kernels save (membrane potentials) so the lean-memory pack hook skips it."""
    t._snn_keep = True
    return t

# --------------------------------------------------------------------------------------
# C source. Elements of one timestep are split in tiles of TILE contiguous elements; a
# tile walks all T steps with its state in L1, so every tensor is touched once.
# -ffp-contract=off keeps u = leak*h + I two roundings, as in the reference (bit-exact
# spikes).
# --------------------------------------------------------------------------------------
C_COMMON = r"""
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define TILE 512

int snn_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static inline int snn_tid(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* Lean storage of activations whose values are k/d, k in 0..255 (spikes, pooled spikes):
   write k as uint8. Returns 1 on success, 0 as soon as a value does not fit. */
int pack_u8_f32(const float* x, int64_t n, uint8_t* out, float d, int nthreads) {
    int ok = 1;
    int64_t nchunks = (n + 65535) / 65536;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t c = 0; c < nchunks; ++c) {
        if (!__atomic_load_n(&ok, __ATOMIC_RELAXED)) continue;
        int64_t a = c * 65536, b = a + 65536 < n ? a + 65536 : n;
        int bad = 0;
        for (int64_t i = a; i < b; ++i) {
            float q = x[i] * d;
            int k = (int)q;
            bad |= (q != (float)k) | (k < 0) | (k > 255);
            out[i] = (uint8_t)k;
        }
        if (bad) __atomic_store_n(&ok, 0, __ATOMIC_RELAXED);
    }
    return ok;
}
"""

# One copy per dtype: SCALAR -> float / double, SUF -> f32 / f64.
C_TEMPLATE = r"""
/* Per-element leak / threshold / channel index of a tile of L elements starting at n0.
   Element n of a timestep has channel (n / S) % C (C = 1 for scalar parameters). */
static inline void gather_SUF(const SCALAR* leak, const SCALAR* thr, int64_t n0, int64_t L,
                              int64_t C, int64_t S, SCALAR* lk, SCALAR* th, int32_t* ch) {
    int64_t c = (n0 / S) % C, s = n0 % S;
    /* Fill runs of one channel at a time: a constant fill vectorises, an element-wise
       channel counter does not (it cost ~3 ns per element, more than the T = 1 update). */
    for (int64_t i = 0; i < L;) {
        int64_t run = S - s < L - i ? S - s : L - i;
        const SCALAR a = leak[c], b = thr[c];
        for (int64_t k = i; k < i + run; ++k) { lk[k] = a; th[k] = b; ch[k] = (int32_t)c; }
        i += run; s = 0;
        if (++c == C) c = 0;
    }
}

/* One tile, all timesteps. HARD and SAVE are compile-time constants at every call site,
   so each combination gets its own branch-free vector loop. */
static inline __attribute__((always_inline)) void fwd_tile_SUF(
        const SCALAR* restrict I, int64_t its, SCALAR* restrict out, SCALAR* restrict usave,
        const SCALAR* restrict lk, const SCALAR* restrict th, int64_t Tn, int64_t N,
        int64_t n0, int64_t L, const int HARD, const int SAVE) {
    SCALAR h[TILE];
    for (int64_t i = 0; i < L; ++i) h[i] = 0;
    for (int64_t t = 0; t < Tn; ++t) {
        const SCALAR* restrict it = I + t * its + n0;
        SCALAR* restrict ot = out + t * N + n0;
        SCALAR* restrict ut = SAVE ? usave + t * N + n0 : 0;
        for (int64_t i = 0; i < L; ++i) {
            SCALAR u = lk[i] * h[i]; u = u + it[i];         /* two roundings, as the reference */
            SCALAR z = u / th[i] - (SCALAR)1;
            SCALAR o = z >= (SCALAR)0 ? (SCALAR)1 : (SCALAR)0;
            ot[i] = o;
            if (SAVE) ut[i] = u;
            h[i] = HARD ? u * ((SCALAR)1 - o) : u - th[i] * o;
        }
    }
}

/* Forward. I[t] at I + t*its (its = 0: input broadcast over time); out, usave [T, N];
   usave NULL: nothing is saved (inference). */
void lif_fwd_SUF(const SCALAR* I, int64_t its, SCALAR* out, SCALAR* usave,
                 const SCALAR* leak, const SCALAR* thr,
                 int64_t Tn, int64_t N, int64_t C, int64_t S, int hard, int nthreads) {
    int64_t ntiles = (N + TILE - 1) / TILE;
    int mode = (hard ? 2 : 0) + (usave ? 1 : 0);
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t tile = 0; tile < ntiles; ++tile) {
        SCALAR lk[TILE], th[TILE]; int32_t ch[TILE];
        int64_t n0 = tile * TILE, L = N - n0 < TILE ? N - n0 : TILE;
        gather_SUF(leak, thr, n0, L, C, S, lk, th, ch);
        switch (mode) {
            case 0: fwd_tile_SUF(I, its, out, usave, lk, th, Tn, N, n0, L, 0, 0); break;
            case 1: fwd_tile_SUF(I, its, out, usave, lk, th, Tn, N, n0, L, 0, 1); break;
            case 2: fwd_tile_SUF(I, its, out, usave, lk, th, Tn, N, n0, L, 1, 0); break;
            default: fwd_tile_SUF(I, its, out, usave, lk, th, Tn, N, n0, L, 1, 1); break;
        }
    }
}

/* Surrogate derivative at z; KIND 0 linear, 1 atan, 2 fast sigmoid (neuron.surrogate_grad). */
static inline __attribute__((always_inline)) SCALAR surr_SUF(SCALAR z, const int KIND, SCALAR s) {
    if (KIND == 0) { SCALAR a = z < 0 ? -z : z; SCALAR v = (SCALAR)1 - a; return v > 0 ? s * v : (SCALAR)0; }
    if (KIND == 1) { SCALAR q = (SCALAR)1.5707963267948966 * s * z; return (s / (SCALAR)2) / ((SCALAR)1 + q * q); }
    { SCALAR a = z < 0 ? -z : z; SCALAR d = (SCALAR)1 + s * a; return (SCALAR)1 / (d * d); }
}

/* Backward of one tile: t = T-1 .. 0 with carry = dL/dh[t] = leak * dL/du[t+1].
   u[t-1] is read once per step and kept for the next one (z recomputed exactly). */
static inline __attribute__((always_inline)) void bwd_tile_SUF(
        const SCALAR* restrict G, int64_t gts, const SCALAR* restrict U, SCALAR* restrict dI,
        const SCALAR* restrict lk, const SCALAR* restrict th, SCALAR* restrict al,
        SCALAR* restrict at, int64_t Tn, int64_t N, int64_t n0, int64_t L, SCALAR s,
        const int HARD, const int KIND, const int SUMT) {
    SCALAR rt[TILE], carry[TILE], zc[TILE], uc[TILE], ds[TILE];
    const SCALAR* restrict ul = U + (Tn - 1) * N + n0;
    for (int64_t i = 0; i < L; ++i) {
        rt[i] = (SCALAR)1 / th[i]; carry[i] = 0; al[i] = 0; at[i] = 0; ds[i] = 0;
        uc[i] = ul[i]; zc[i] = ul[i] / th[i] - (SCALAR)1;
    }
    for (int64_t t = Tn - 1; t >= 0; --t) {
        const SCALAR* restrict gt = G + t * gts + n0;
        SCALAR* restrict dt = dI + (SUMT ? 0 : t * N) + n0;
        const SCALAR* restrict up = U + (t > 0 ? t - 1 : 0) * N + n0;
        const int prev = t > 0;
        for (int64_t i = 0; i < L; ++i) {
            SCALAR u = uc[i], z = zc[i], the = th[i], r = rt[i];
            SCALAR o = z >= (SCALAR)0 ? (SCALAR)1 : (SCALAR)0;
            SCALAR gz = gt[i] * surr_SUF(z, KIND, s) * r;        /* dL/du through the spike */
            SCALAR du = gz + (HARD ? carry[i] * ((SCALAR)1 - o) : carry[i]);
            if (SUMT) ds[i] += du; else dt[i] = du;
            at[i] -= gz * u * r + (HARD ? (SCALAR)0 : carry[i] * o);
            carry[i] = lk[i] * du;
            SCALAR upv = up[i]; SCALAR zp = upv / the - (SCALAR)1;
            SCALAR op = zp >= (SCALAR)0 ? (SCALAR)1 : (SCALAR)0;
            SCALAR hp = HARD ? upv * ((SCALAR)1 - op) : upv - the * op;
            al[i] += prev ? du * hp : (SCALAR)0;
            uc[i] = upv; zc[i] = zp;
        }
    }
    if (SUMT) { SCALAR* restrict d0 = dI + n0; for (int64_t i = 0; i < L; ++i) d0[i] = ds[i]; }
}

/* k x k average pooling with stride k, no padding, floor mode, on P contiguous planes
   [H, W] -> [H/k, W/k]. Same summation order as PyTorch's kernel (row by row, then one
   division by k*k), so results are bit-identical. */
void avgpool_fwd_SUF(const SCALAR* x, SCALAR* y, int64_t P, int64_t H, int64_t W, int64_t k,
                     int nthreads) {
    int64_t Ho = H / k, Wo = W / k;
    const SCALAR div = (SCALAR)(k * k);
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t p = 0; p < P; ++p) {
        const SCALAR* xp = x + p * H * W;
        SCALAR* yp = y + p * Ho * Wo;
        if (k == 2) {
            for (int64_t i = 0; i < Ho; ++i) {
                const SCALAR* r0 = xp + (2 * i) * W;
                const SCALAR* r1 = r0 + W;
                SCALAR* yr = yp + i * Wo;
                for (int64_t j = 0; j < Wo; ++j) {
                    SCALAR s = (SCALAR)0;
                    s += r0[2 * j]; s += r0[2 * j + 1]; s += r1[2 * j]; s += r1[2 * j + 1];
                    yr[j] = s / div;
                }
            }
        } else {
            for (int64_t i = 0; i < Ho; ++i)
                for (int64_t j = 0; j < Wo; ++j) {
                    SCALAR s = (SCALAR)0;
                    for (int64_t a = 0; a < k; ++a)
                        for (int64_t b = 0; b < k; ++b) s += xp[(i * k + a) * W + j * k + b];
                    yp[i * Wo + j] = s / div;
                }
        }
    }
}

/* Its backward: every input position gets grad/(k*k) of its window (0 outside windows). */
void avgpool_bwd_SUF(const SCALAR* g, SCALAR* dx, int64_t P, int64_t H, int64_t W, int64_t k,
                     int nthreads) {
    int64_t Ho = H / k, Wo = W / k;
    const SCALAR div = (SCALAR)(k * k);
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t p = 0; p < P; ++p) {
        const SCALAR* gp = g + p * Ho * Wo;
        SCALAR* dp = dx + p * H * W;
        for (int64_t r = 0; r < H; ++r) {
            SCALAR* dr = dp + r * W;
            int64_t i = r / k;
            if (i >= Ho) { for (int64_t c = 0; c < W; ++c) dr[c] = (SCALAR)0; continue; }
            const SCALAR* gr = gp + i * Wo;
            if (k == 2) {
                for (int64_t j = 0; j < Wo; ++j) { SCALAR v = gr[j] / div; dr[2 * j] = v; dr[2 * j + 1] = v; }
            } else {
                for (int64_t j = 0; j < Wo; ++j) { SCALAR v = gr[j] / div; for (int64_t b = 0; b < k; ++b) dr[j * k + b] = v; }
            }
            for (int64_t c = Wo * k; c < W; ++c) dr[c] = (SCALAR)0;
        }
    }
}

/* Backward. G[t] at G + t*gts; U [T, N] saved pre-reset potentials; dI [T, N] out, or
   [N] = sum over t when sum_t (input broadcast over time: its gradient is that sum).
   dleak / dthr: nthreads x C doubles (zeroed by the caller) or NULL when not needed. */
void lif_bwd_SUF(const SCALAR* G, int64_t gts, const SCALAR* U, SCALAR* dI,
                 const SCALAR* leak, const SCALAR* thr, double* dleak, double* dthr,
                 int64_t Tn, int64_t N, int64_t C, int64_t S,
                 int hard, int kind, double scale, int sum_t, int nthreads) {
    int64_t ntiles = (N + TILE - 1) / TILE;
    const SCALAR s = (SCALAR)scale;
    int mode = (hard ? 3 : 0) + kind + (sum_t ? 6 : 0);
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t tile = 0; tile < ntiles; ++tile) {
        SCALAR lk[TILE], th[TILE], al[TILE], at[TILE]; int32_t ch[TILE];
        int64_t n0 = tile * TILE, L = N - n0 < TILE ? N - n0 : TILE;
        gather_SUF(leak, thr, n0, L, C, S, lk, th, ch);
#define BWD(H, K, ST) bwd_tile_SUF(G, gts, U, dI, lk, th, al, at, Tn, N, n0, L, s, H, K, ST)
        switch (mode) {
            case 0: BWD(0, 0, 0); break;   case 1: BWD(0, 1, 0); break;   case 2: BWD(0, 2, 0); break;
            case 3: BWD(1, 0, 0); break;   case 4: BWD(1, 1, 0); break;   case 5: BWD(1, 2, 0); break;
            case 6: BWD(0, 0, 1); break;   case 7: BWD(0, 1, 1); break;   case 8: BWD(0, 2, 1); break;
            case 9: BWD(1, 0, 1); break;   case 10: BWD(1, 1, 1); break;  default: BWD(1, 2, 1); break;
        }
#undef BWD
        int tid = snn_tid();
        if (dleak) { double* acc = dleak + (int64_t)tid * C;
            for (int64_t i = 0; i < L; ++i) acc[ch[i]] += (double)al[i]; }
        if (dthr) { double* acc = dthr + (int64_t)tid * C;
            for (int64_t i = 0; i < L; ++i) acc[ch[i]] += (double)at[i]; }
    }
}
"""

C_SOURCE = C_COMMON + "".join(
    C_TEMPLATE.replace("SCALAR", ctype).replace("SUF", suf)
    for ctype, suf in (("float", "f32"), ("double", "f64"))) + POPULATION_C


# --------------------------------------------------------------------------------------
# Build and load
# --------------------------------------------------------------------------------------
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
    """Compile C_SOURCE into ``out`` atomically; returns an error message or None."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "lif_cpu.c"
        src.write_text(C_SOURCE)
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
    declare_population(lib)


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
            key = hashlib.sha256("\0".join([C_SOURCE, cc, *flags, _cpu_fingerprint(),
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


# --------------------------------------------------------------------------------------
# Argument checks shared by all backends
# --------------------------------------------------------------------------------------
def step_format(current: torch.Tensor) -> str | None:
    """Memory order of one timestep ``current[t]``: "contiguous", "channels_last" or None.

    The kernels walk a timestep as one dense run of memory, so any dense order works for
    scalar parameters; per-channel parameters are indexed by the order's channel position.
    """
    step = current[0]
    if step.is_contiguous():
        return "contiguous"
    if step.dim() == 4 and step.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return None


def channel_layout(current: torch.Tensor, leak: torch.Tensor, threshold: torch.Tensor,
                   fmt: str = "contiguous"):
    """``(C, S)``: element n (in memory order) of a timestep uses parameter index ``(n // S) % C``.

    Parameters are scalars (one element) or per-channel, broadcasting over dimension 1 of
    ``[B, C, ...]``. Returns None for any other layout (the caller falls back to the
    reference).
    """
    nd = current.dim() - 1  # dims of one timestep, [B, C, ...]
    per_channel = False
    for p in (leak, threshold):
        if not isinstance(p, torch.Tensor):
            return None
        if p.numel() == 1:
            if p.dim() > nd:
                return None
            continue
        shape = (1,) * (nd - p.dim()) + tuple(p.shape)
        if p.dim() > nd or nd < 2 or shape[1] != current.shape[2] or any(
                d != 1 for i, d in enumerate(shape) if i != 1):
            return None
        per_channel = True
    if not per_channel:
        return 1, max(1, current[0].numel())
    c = current.shape[2]
    if fmt == "channels_last":  # [B, H, W, C] in memory: channel is the fastest index
        return c, 1
    s = 1
    for d in current.shape[3:]:
        s *= d
    return c, max(1, s)


def _like_steps(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` [T, ...] with each timestep dense in ``like[0]``'s memory order (copied only if needed)."""
    if x[0].stride() == like[0].stride() or step_format(x) == step_format(like):
        return x
    return _empty_steps(like).copy_(x)


def _empty_steps(like: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    """An uninitialised ``[T, ...]`` tensor, timesteps packed, each in ``like[0]``'s memory order.

    With ``steps``, ``like`` is one timestep ``[B, ...]`` and the result has ``steps`` of them.
    """
    step = like if steps is not None else like[0]
    shape = (steps, *like.shape) if steps is not None else like.shape
    return torch.empty_strided(shape, (step.numel(), *step.stride()), dtype=like.dtype, device=like.device)


def time_broadcast_base(current: torch.Tensor) -> torch.Tensor | None:
    """``b`` if ``current`` is exactly ``b`` broadcast over a new leading time dimension, else None.

    The models feed the first LIF with conv1's output ``c.unsqueeze(0).expand(T, ...)``.
    Running the backend on ``c`` itself (same memory, read with time stride 0) lets its
    backward return ``dL/dc = sum_t dL/dI[t]`` directly, instead of a ``[T, ...]`` gradient
    that the expand's backward would sum: one ``[T, B, ...]`` tensor less, written and read.
    """
    if current.dim() < 2 or current.shape[0] < 2 or current.stride(0) != 0:
        return None
    base = current._base
    if (base is None or base.shape != current.shape[1:] or base.stride() != current.stride()[1:]
            or base.storage_offset() != current.storage_offset()
            or base.requires_grad != current.requires_grad or base.dtype != current.dtype):
        return None
    return base


def _param_vector(p: torch.Tensor, c: int) -> torch.Tensor:
    """A parameter as a contiguous length-``c`` vector (scalar parameters repeated)."""
    p = p.detach().reshape(-1)
    return (p.expand(c) if p.numel() == 1 else p).contiguous()


def _reduce_param_grad(g_channels: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per-channel gradient ``[C]`` -> gradient of the parameter's own shape."""
    if p.numel() == 1:
        return g_channels.sum().reshape(p.shape).to(p.dtype)
    return g_channels.reshape(p.shape).to(p.dtype)


def _time_stride(x: torch.Tensor) -> int:
    """Element stride between timesteps (0 when the input is broadcast over time)."""
    return x.stride(0) if x.shape[0] > 1 else 0


def _threads(n: int) -> int:
    return 1 if n < 1 << 15 else max(1, torch.get_num_threads())


def _ptr(x: torch.Tensor | None):
    return None if x is None else x.data_ptr()


def launch_forward(current, its, lk, th, hard, layout, steps, out, u=None) -> None:
    """Call the C forward kernel on prepared parameter vectors ``lk``, ``th`` (length ``C``).

    Spikes go into ``out`` (``steps`` dense timesteps, ``[T, ...]`` or time-folded ``[T*B, ...]``),
    pre-reset potentials into ``u`` (same shape; None saves nothing); ``current``'s timestep t is
    read at element offset ``t * its`` (0: one tensor broadcast over time).
    """
    c, s = layout
    n = out.numel() // steps
    fn = _lib.lif_fwd_f32 if current.dtype == torch.float32 else _lib.lif_fwd_f64
    fn(_ptr(current), its, _ptr(out), _ptr(u), _ptr(lk), _ptr(th), steps, n, c, s, int(hard),
       _threads(steps * n))


def _forward_kernel(current, its, leak, threshold, hard, layout, out, u=None) -> None:
    """:func:`launch_forward` with the LIF's own ``leak`` / ``threshold`` tensors (scalar or per channel)."""
    c = layout[0]
    launch_forward(current, its, _param_vector(leak, c), _param_vector(threshold, c), hard, layout,
                   out.shape[0], out, u)


# --------------------------------------------------------------------------------------
# The C-kernel autograd function
# --------------------------------------------------------------------------------------
class _LIFCext(torch.autograd.Function):
    """C-kernel LIF. ``current`` is ``[T, B, ...]``, or ``[B, ...]`` broadcast over ``steps``."""

    @staticmethod
    def forward(ctx, current, leak, threshold, hard, kind, scale, layout, steps):
        bcast = steps is not None
        steps = steps if bcast else current.shape[0]
        its = 0 if bcast else _time_stride(current)
        out = _empty_steps(current, steps if bcast else None)
        need_grad = any(ctx.needs_input_grad[:3])
        u = torch.empty_like(out) if need_grad else None
        _forward_kernel(current, its, leak, threshold, hard, layout, out, u)
        if need_grad:
            mark_keep(u)
            ctx.save_for_backward(u, leak, threshold)
            ctx.cfg = (hard, kind, scale, layout, bcast)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        u, leak, threshold = ctx.saved_tensors
        hard, kind, scale, (c, s), bcast = ctx.cfg
        steps = u.shape[0]
        n = u[0].numel()
        if grad_out.dtype != u.dtype:
            grad_out = grad_out.to(u.dtype)
        grad_out = _like_steps(grad_out, u)
        gts = _time_stride(grad_out)
        lk, th = _param_vector(leak, c), _param_vector(threshold, c)
        nthreads = _threads(steps * n)
        need_in, need_leak, need_thr = ctx.needs_input_grad[:3]
        acc_leak = torch.zeros(nthreads, c, dtype=torch.float64) if need_leak else None
        acc_thr = torch.zeros(nthreads, c, dtype=torch.float64) if need_thr else None
        grad_in = torch.empty_like(u[0]) if bcast else _empty_steps(u)
        fn = _lib.lif_bwd_f32 if u.dtype == torch.float32 else _lib.lif_bwd_f64
        fn(_ptr(grad_out), gts, _ptr(u), _ptr(grad_in), _ptr(lk), _ptr(th), _ptr(acc_leak),
           _ptr(acc_thr), steps, n, c, s, int(hard), SURROGATE_IDS[kind], float(scale), int(bcast),
           nthreads)
        g_leak = _reduce_param_grad(acc_leak.sum(0), leak) if need_leak else None
        g_thr = _reduce_param_grad(acc_thr.sum(0), threshold) if need_thr else None
        return grad_in if need_in else None, g_leak, g_thr, None, None, None, None, None


def _lif_cext_inference(current, leak, threshold, hard, layout):
    """Spikes ``[T, B, ...]`` of the C forward kernel, no autograd bookkeeping (nothing needs grad).

    At batch 1 and T = 1 the autograd.Function wrapper and the per-call helpers cost more
    than the kernel itself, so inference calls the kernel directly.
    """
    out = _empty_steps(current)
    _forward_kernel(current, _time_stride(current), leak, threshold, hard, layout, out)
    return out


# --------------------------------------------------------------------------------------
# Pure-PyTorch fallback with the same lean saved state (any device)
# --------------------------------------------------------------------------------------
class _LIFTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, current, leak, threshold, hard, kind, scale):
        steps = current.shape[0]
        need_grad = any(ctx.needs_input_grad[:3])
        leak_d, thr_d = leak.detach(), threshold.detach()
        out = torch.empty_like(current, memory_format=torch.preserve_format)
        u = torch.empty_like(out) if need_grad else None
        h = torch.zeros_like(current[0])
        for t in range(steps):
            ut = u[t] if need_grad else torch.empty_like(h)
            torch.mul(h, leak_d, out=ut)
            ut.add_(current[t])  # two roundings, as in the reference: bit-exact spikes
            z = torch.div(ut, thr_d).sub_(1.0)
            o = out[t].copy_(z >= 0)
            if hard:
                h = ut * (1.0 - o)
            else:
                h = ut - thr_d * o
        if need_grad:
            mark_keep(u)
            ctx.save_for_backward(u, leak, threshold)
            ctx.cfg = (hard, kind, scale)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        u, leak, threshold = ctx.saved_tensors
        hard, kind, scale = ctx.cfg
        leak_d, thr_d = leak.detach(), threshold.detach()
        need_leak, need_thr = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_in = torch.empty_like(u)
        gl = torch.zeros_like(u[0]) if need_leak else None
        gt = torch.zeros_like(u[0]) if need_thr else None
        carry = None
        z = u[-1] / thr_d - 1.0
        for t in range(u.shape[0] - 1, -1, -1):
            o = (z >= 0).to(u.dtype)
            gz = grad_out[t] * surrogate_grad(z, kind, scale)
            du = torch.div(gz, thr_d, out=grad_in[t])
            if carry is not None:
                du.add_(carry * (1.0 - o) if hard else carry)
            if need_thr:
                gt.sub_(gz * u[t] / (thr_d * thr_d))
                if carry is not None and not hard:
                    gt.sub_(carry * o)
            if t > 0:
                z = u[t - 1] / thr_d - 1.0
                if need_leak:
                    op = (z >= 0).to(u.dtype)
                    hp = u[t - 1] * (1.0 - op) if hard else u[t - 1] - thr_d * op
                    gl.add_(du * hp)
                carry = du * leak_d
        g_leak = _sum_to(gl, leak) if need_leak else None
        g_thr = _sum_to(gt, threshold) if need_thr else None
        return grad_in, g_leak, g_thr, None, None, None


def _sum_to(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Sum an element-wise gradient ``[B, ...]`` down to parameter ``p``'s broadcast shape."""
    if p.numel() == 1:
        return g.sum().reshape(p.shape).to(p.dtype)
    return g.sum_to_size((1,) * (g.dim() - p.dim()) + tuple(p.shape)).reshape(p.shape).to(p.dtype)


# --------------------------------------------------------------------------------------
# Public backend functions (signature of neuron.lif_multistep)
# --------------------------------------------------------------------------------------
def _supported(current, leak, threshold, reset, surrogate) -> bool:
    return (reset in RESETS and surrogate in SURROGATE_IDS and current.dim() >= 2
            and current.shape[0] >= 1 and current[0].numel() > 0
            and current.dtype in (torch.float32, torch.float64)
            and isinstance(leak, torch.Tensor) and isinstance(threshold, torch.Tensor)
            and leak.dtype == current.dtype and threshold.dtype == current.dtype
            and leak.device == current.device and threshold.device == current.device)


def lif_torch(current, leak, threshold, reset="soft", surrogate="linear", scale=None,
              return_membrane=False):
    """Lean-memory PyTorch implementation of :func:`lif_multistep` (any device)."""
    if return_membrane or not _supported(current, leak, threshold, reset, surrogate):
        return lif_multistep(current, leak, threshold, reset, surrogate, scale, return_membrane)
    if channel_layout(current, leak, threshold) is None:
        return lif_multistep(current, leak, threshold, reset, surrogate, scale)
    s = surrogate_scale(surrogate, scale)
    return _LIFTorch.apply(current, leak, threshold, reset == "hard", surrogate, s)


def lif_cpu(current, leak, threshold, reset="soft", surrogate="linear", scale=None,
            return_membrane=False):
    """Fused CPU implementation of :func:`lif_multistep` (same signature and results).

    Uses the compiled C kernel when it is available, else :func:`lif_torch`; tensors on
    other devices, other dtypes and parameter layouts other than scalar / per-channel go
    to the PyTorch paths.
    """
    if return_membrane or not _supported(current, leak, threshold, reset, surrogate):
        return lif_multistep(current, leak, threshold, reset, surrogate, scale, return_membrane)
    if channel_layout(current, leak, threshold) is None:
        return lif_multistep(current, leak, threshold, reset, surrogate, scale)
    s = surrogate_scale(surrogate, scale)
    if current.device.type != "cpu" or load_library() is None:
        return _LIFTorch.apply(current, leak, threshold, reset == "hard", surrogate, s)
    fmt = step_format(current)
    if fmt is None:
        current, fmt = current.contiguous(), "contiguous"
    layout = channel_layout(current, leak, threshold, fmt)
    if not (torch.is_grad_enabled() and (current.requires_grad or leak.requires_grad
                                         or threshold.requires_grad)):
        return _lif_cext_inference(current, leak, threshold, reset == "hard", layout)
    base = time_broadcast_base(current)
    if base is not None:
        return _LIFCext.apply(base, leak, threshold, reset == "hard", surrogate, s, layout, current.shape[0])
    return _LIFCext.apply(current, leak, threshold, reset == "hard", surrogate, s, layout, None)


def pack_u8(x: torch.Tensor, levels: float = 16.0) -> torch.Tensor | None:
    """``x`` as uint8 ``k`` where ``x == k / levels`` exactly for every element, else None.

    Spikes ({0, 1}) and 2x2 average-pooled spikes (multiples of 1/4) fit ``levels=16``.
    Stops at the first value that does not fit (C kernel) so a failed try is cheap.
    """
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        return None
    out = torch.empty(x.shape, dtype=torch.uint8)
    lib = load_library()
    if lib is not None:
        ok = lib.pack_u8_f32(x.data_ptr(), x.numel(), out.data_ptr(), float(levels),
                             _threads(x.numel()))
        return out if ok else None
    q = x * levels
    k = q.round()
    if not bool(((q == k) & (k >= 0) & (k <= 255)).all()):
        return None
    return out.copy_(k)


# --------------------------------------------------------------------------------------
# Average pooling with stride == kernel (the only pooling in DIET networks)
# --------------------------------------------------------------------------------------
def avgpool_forward(x: torch.Tensor, k: int) -> torch.Tensor:
    """C k x k / stride k average pool of a contiguous CPU float tensor ``[..., H, W]`` ->
    ``[..., H // k, W // k]`` (no autograd; the library must be loaded)."""
    lead, (h, w) = x.shape[:-2], x.shape[-2:]
    planes = x.numel() // (h * w) if h * w else 0
    y = torch.empty(*lead, h // k, w // k, dtype=x.dtype)
    fn = _lib.avgpool_fwd_f32 if x.dtype == torch.float32 else _lib.avgpool_fwd_f64
    fn(x.data_ptr(), y.data_ptr(), planes, h, w, k, _threads(x.numel()))
    return y


class _AvgPoolCext(torch.autograd.Function):
    """k x k / stride k average pool; saves only the input shape for backward."""

    @staticmethod
    def forward(ctx, x, k):
        ctx.shape, ctx.k = x.shape, k
        return avgpool_forward(x, k)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        g = g.contiguous()
        h, w = ctx.shape[-2:]
        planes = g.numel() // max(1, g.shape[-2] * g.shape[-1]) if g.dim() >= 2 else 0
        dx = torch.empty(ctx.shape, dtype=g.dtype)
        fn = _lib.avgpool_bwd_f32 if g.dtype == torch.float32 else _lib.avgpool_bwd_f64
        fn(g.data_ptr(), dx.data_ptr(), planes, h, w, ctx.k, _threads(dx.numel()))
        return dx, None


def avg_pool_fast(x: torch.Tensor, k: int) -> torch.Tensor | None:
    """``F.avg_pool2d(x, k)`` (stride k, no padding) on contiguous CPU float tensors with the C
    kernel, bit-identical to PyTorch's and saving nothing for backward; None when not applicable.
    """
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() not in (3, 4)
            or not x.is_contiguous() or x.shape[-1] < k or x.shape[-2] < k or load_library() is None):
        return None
    return _AvgPoolCext.apply(x, int(k))
