"""Process-level settings for CPU training: glibc's allocator.

torch's CPU allocator has no cache: every tensor is a malloc and every free returns it.
glibc serves blocks over its mmap threshold (which adapts, but never above 32 MB) by mmap and
unmaps them on free, so the next step touches fresh pages again, each a page fault. Blocks
that big are routine in training: HSTU-large's (B, H, T, T) attention at B=128, T=200 is 41
MB and is made four times per block per step; full-softmax CE over Beauty's 12,101 items
works in 1024-row logit chunks of 50 MB. Steady state (after the first epoch), one thread,
``getrusage`` per step, two other runs on the 2-core machine (so times are rough), 2026-11-24:

    ML-1M HSTU-large (L 200)   86,000 faults per step -> 0;   ~820 -> ~590 ms per step
    Beauty SASRec (L 50)        8,000 faults per step -> 0;   ~113 -> ~99 ms per step
    ML-1M Mamba4Rec (L 200)     0 either way after 3 epochs (its blocks are under 32 MB;
                                tuned, it gets there within the first epoch)

(glibc defaults -> ``tune_malloc_for_training``). The fix is the one PyTorch's CPU
performance guides reach with jemalloc or tcmalloc, done with glibc alone: never serve a
block by mmap (``M_MMAP_MAX`` 0: from the heap, which the process reuses) and never trim the
heap (``M_TRIM_THRESHOLD``). The cost: memory a run freed stays with the process for reuse
instead of going back to the OS, so between steps its resident size sits at its high-water
mark (HSTU-large 1.6 -> 2.2 GB, Beauty SASRec 0.55 -> 0.72 GB; it stops growing within the
first epochs); the peak itself barely moves (HSTU-large ML-1M epoch: 2068 -> 2112 MiB).
A whole HSTU-large ML-1M epoch, 2 threads, idle machine: 43.7 -> 34.4 s (BENCHMARKS.md).

Process-wide, like numba's threading layer in ``ops/scan_numba.py``; ``fit`` and the speed
benchmarks call it. Set ``PERSEQ_MALLOC_TUNING=0`` to keep glibc's defaults; any of glibc's
own ``MALLOC_*`` tunables in the environment also leaves the allocator as configured.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
_GLIBC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")
_applied = False


def tune_malloc_for_training() -> bool:
    """Switch glibc's allocator to keep and reuse freed memory (see the module docstring).
    Returns whether the setting is in force; a no-op off glibc, when opted out, or when the
    environment already configures malloc. Idempotent."""
    global _applied
    if _applied:
        return True
    if os.environ.get("PERSEQ_MALLOC_TUNING", "1") == "0" or any(k in os.environ for k in _GLIBC_ENV):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success; the trim threshold is an int, so "never" is INT_MAX
    _applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied


#: Spins of an idle OpenMP worker before it sleeps (libgomp's ``GOMP_SPINCOUNT``; its default
#: is 300,000 when ``OMP_WAIT_POLICY`` is unset). perseq's numba kernels run on numba's own
#: thread pool, and after every torch op torch's idle OpenMP workers keep spinning on the
#: cores those kernels want: with 2 threads on the 2-core machine, a Mamba4Rec encoder step
#: (forward + backward, B=128, L=200, 40 steps) took 178-185 ms under the default and 165-172
#: ms spinning 10,000 times, SASRec's 154-159 ms either way (2026-11-24, BENCHMARKS.md).
OPENMP_SPIN_COUNT = "10000"
_OMP_ENV = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def limit_openmp_spin() -> bool:
    """Shorten the spin of torch's idle OpenMP workers (see ``OPENMP_SPIN_COUNT``) by setting
    ``GOMP_SPINCOUNT``, which libgomp reads once, when torch loads it: ``import perseq``
    (which calls this) must come before ``import torch`` to have an effect. Returns whether
    it was set; not when torch is already imported, when ``GOMP_SPINCOUNT`` or
    ``OMP_WAIT_POLICY`` is already in the environment, or with ``PERSEQ_OMP_SPIN_TUNING=0``.
    Processes started from this one inherit it."""
    if os.environ.get("PERSEQ_OMP_SPIN_TUNING", "1") == "0" or any(k in os.environ for k in _OMP_ENV):
        return False
    if "torch" in sys.modules:
        return False
    os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT
    return True
