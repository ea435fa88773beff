"""The AVX-512 C kernels of the selective scan (``scan_avx512.c``): built with the system C
compiler on first use, cached on disk, called through ctypes. An optional fast path inside
the numba one (``scan_numba.NumbaScan``): same arguments, same formulas, tested against
the same reference; anything that stops it (no AVX-512 on this CPU, no compiler, a failed
build, ``PERSEQ_NATIVE=0``) leaves the numba kernels in charge, with one warning when a
build was tried and failed.

Why C: see the file's header. ``perseq bench scan`` at B=128, L=116, E=128, N=32, 2 threads
(the mean ML-1M batch of a Mamba4Rec epoch): forward 6.5 against 10.8-11.2 ms, backward
15.4-15.9 against 23.8-25.5 ms for the numba kernels (BENCHMARKS.md, session 17).

The build: ``$CC`` (default ``cc``) with ``-O3 -mavx512f -mavx512dq -mfma``, into
``$PERSEQ_CACHE_DIR`` (default ``~/.cache/perseq``)/native/, under a name that hashes the
source and the flags, written to a temporary file and renamed, so concurrent first calls
(two training runs) never see half a library.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

_SRC = Path(__file__).with_name("scan_avx512.c")
_FLAGS = ["-O3", "-mavx512f", "-mavx512dq", "-mfma", "-shared", "-fPIC"]
_LOCK = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _host_has_avx512() -> bool:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False  # not Linux, or no flags line: no way to tell, so no native path
    have = set(flags.split(":", 1)[1].split())
    return {"avx512f", "avx512dq", "fma"} <= have


def cache_dir() -> Path:
    root = os.environ.get("PERSEQ_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "perseq")
    return Path(root) / "native"


def _build() -> Path:
    cc = os.environ.get("CC", "cc")
    src = _SRC.read_bytes()
    key = hashlib.sha256(src + " ".join([cc, *_FLAGS]).encode()).hexdigest()[:16]
    out = cache_dir() / f"scan_avx512-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *_FLAGS, str(_SRC), "-o", tmp, "-lpthread"], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed:\n{res.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic: a concurrent build of the same source writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _declare(lib: ctypes.CDLL) -> None:
    P, I = ctypes.c_void_p, ctypes.c_int
    lib.perseq_scan_fwd.argtypes = [P, P, P, I, P, I, P, P, P, P, P, I, I, P, P, P, I, I, I, I, I, I]
    lib.perseq_scan_fwd.restype = I
    lib.perseq_scan_bwd.argtypes = [P, P, P, I, P, I, P, P, P, P, P, P, I, P, P, I, *[P] * 9, I, I, I, I, I, I]
    lib.perseq_scan_bwd.restype = I


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot run here (see the module docstring).
    The first call may compile (about a second); later calls return the cached handle."""
    global _lib, _tried
    if _tried:
        return _lib
    with _LOCK:
        if _tried:
            return _lib
        try:
            if os.environ.get("PERSEQ_NATIVE", "1") != "0" and _host_has_avx512():
                lib = ctypes.CDLL(str(_build()))
                _declare(lib)
                _lib = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            warnings.warn(f"perseq: the AVX-512 scan kernels could not be built, the numba kernels run instead "
                          f"(set PERSEQ_NATIVE=0 to skip the attempt): {err}", RuntimeWarning, stacklevel=2)
        _tried = True
        return _lib


def _ptr(t) -> int:
    return t.data_ptr()


def scan_fwd(lib, x, dl, WT, lr, dbias, sp, AT, B, C, D, z, gate, S, y, u, ck, nthreads):
    """The C forward on contiguous float32 CPU tensors, arguments as ``scan_numba._scan_fwd``."""
    Bsz, L, E = x.shape
    rc = lib.perseq_scan_fwd(*map(_ptr, (x, dl, WT)), int(lr), _ptr(dbias), int(sp), *map(_ptr, (AT, B, C, D, z)),
                             int(gate), S, *map(_ptr, (y, u, ck)), Bsz, L, E, AT.shape[0], WT.shape[0], nthreads)
    if rc != 0:
        raise RuntimeError(f"perseq_scan_fwd failed ({rc}: -2 out of memory, -3 bad shape)")


def scan_bwd(lib, x, dl, WT, lr, dbias, sp, AT, B, C, D, z, u, gate, gout, ck, S, gx, gdl, gWT, gbias, gAT, gB, gC, gD,
             gz, nthreads):
    """The C backward, arguments as ``scan_numba._scan_bwd``; the per-row partials gWT,
    gbias, gAT, gD must come in zeroed."""
    Bsz, L, E = x.shape
    rc = lib.perseq_scan_bwd(*map(_ptr, (x, dl, WT)), int(lr), _ptr(dbias), int(sp),
                             *map(_ptr, (AT, B, C, D, z, u)), int(gate), _ptr(gout), _ptr(ck), S,
                             *map(_ptr, (gx, gdl, gWT, gbias, gAT, gB, gC, gD, gz)), Bsz, L, E, AT.shape[0], WT.shape[0],
                             nthreads)
    if rc != 0:
        raise RuntimeError(f"perseq_scan_bwd failed ({rc}: -2 out of memory, -3 bad shape)")
