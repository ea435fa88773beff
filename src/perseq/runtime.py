"""Process-level settings for CPU training: the thread count, glibc's allocator, OpenMP's spin.

**Thread count** (``choose_threads``, applied by ``use_threads``; ``fit`` and ``perseq bench
epoch`` call it). The first of these that is set decides:

1. an explicit count: ``train.threads`` (``--set train.threads=N``; unset or 0 is automatic),
   a benchmark's ``--threads``;
2. ``PERSEQ_THREADS`` in the environment;
3. ``OMP_NUM_THREADS`` in the environment (the variable torch itself reads; ``torchrun`` sets it
   to 1 for each of several processes on one machine);
4. otherwise, automatic: the cores this process may run on (``os.sched_getaffinity``) minus
   the cores busy with other work right now, at least 1, and at most a cgroup-v2 CPU quota
   (``cpu.max``, in whole cores rounded down) where a container sets one.
   "Busy" is measured over 0.2 s from ``/proc/stat``: the busy fractions of the allowed CPUs,
   summed and rounded to whole cores (where there is no ``/proc/stat``, the 1-minute load
   average; where there is neither, no core counts as busy).

The same count goes to torch's intra-op pool and to numba's (perseq's kernels in ``ops/``
run there). ``fit`` logs the choice and the reason, e.g. ``threads: 1 (1 of 2 cores busy)``,
and the count is in every result's ``hardware`` field. The count is chosen when a training
starts and kept for it, so automatic choices (not explicit ones) can differ between a run
and its resumption; set ``train.threads`` or ``PERSEQ_THREADS`` where bit-identical results
across processes matter.

Why: a thread count above the free cores does not just share them, it stalls. Each torch op
splits its work over all its threads and waits for the slowest; a thread whose core is taken
by another process finishes a time slice later, and the others spin or sleep meanwhile.
The quickstart with torch's default (2 threads on the 2-core machine) beside one
single-thread ML-1M training took about 5x its idle time (issue 23; its epochs 3-4x as
long), where one thread on the one free core costs only what one thread costs idle. With
this policy (2-core Xeon, 2026-12-04, single runs on a shared machine, so rough; the
quiet-window figures are in benchmarks/results/quickstart.json): quickstart 35 s idle (2
threads chosen), 46 s beside that training (1 chosen), 1.3x; one ML-1M SASRec epoch
16.7 s and 29.5 s, 1.8x.

**Allocator.** torch's CPU allocator has no cache: every tensor is a malloc and every free
returns it. glibc serves blocks over its mmap threshold (which adapts, but never above 32
MB) by mmap and unmaps them on free, so the next step touches fresh pages again, each a page
fault. Blocks that big are routine in training: HSTU-large's (B, H, T, T) attention at
B=128, T=200 is 41 MB and is made four times per block per step; full-softmax CE over
Beauty's 12,101 items works in 1024-row logit chunks of 50 MB. Steady state (after the
first epoch), one thread, ``getrusage`` per step, two other runs on the 2-core machine (so
times are rough), 2026-11-24:

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
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

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


#: seconds over which ``busy_cores`` samples /proc/stat: 20 ticks of the kernel's 100 Hz
#: counters per CPU, enough to tell a core running flat out from an idle one
BUSY_SAMPLE_S = 0.2


@dataclass(frozen=True)
class ThreadChoice:
    """A thread count and the rule of the policy that gave it."""

    n: int
    reason: str  # which rule of the policy decided, for the log line

    def __str__(self) -> str:
        return f"{self.n} ({self.reason})"


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cgroup_cpu_limit() -> int | None:
    """Whole cores of a cgroup-v2 CPU quota (``cpu.max``, as containers set it), rounded
    down, at least 1; None where there is no quota."""
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, int(quota) // int(period))


def _cpu_times(cpus: list[int]) -> dict[int, tuple[int, int]] | None:
    """{cpu: (busy ticks, total ticks)} from /proc/stat; None where it cannot be read."""
    try:
        lines = open("/proc/stat").read().splitlines()
    except OSError:
        return None
    want, out = set(cpus), {}
    for line in lines:
        name, *fields = line.split() or [""]
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in want:
            # user nice system idle iowait irq softirq steal (guest time is inside user):
            # waiting on I/O is idle; time stolen by the hypervisor is a core someone uses
            t = [int(x) for x in fields[:8]]
            out[int(name[3:])] = (sum(t) - t[3] - t[4], sum(t))
    return out or None


def busy_cores(cpus: list[int] | None = None, interval: float = BUSY_SAMPLE_S) -> float | None:
    """How many of ``cpus`` (default: the allowed ones) other work keeps busy now: their busy
    fractions over ``interval`` seconds, summed. This process sleeps while it samples, so
    the figure is everyone else's. Without /proc/stat, the 1-minute load average (capped at
    the CPU count); None where neither exists."""
    cpus = allowed_cpus() if cpus is None else cpus
    before = _cpu_times(cpus)
    if before is None:
        try:
            return min(float(os.getloadavg()[0]), float(len(cpus)))
        except (AttributeError, OSError):
            return None
    time.sleep(interval)
    after = _cpu_times(cpus) or {}
    busy = 0.0
    for c, (b0, t0) in before.items():
        b1, t1 = after.get(c, (b0, t0))
        busy += (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
    return busy


def _positive_int(text: str, name: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{name}={text!r}: expected a thread count of at least 1")
    return n


@dataclass(frozen=True)
class CpuLoad:
    """What the automatic thread count is decided from."""

    cpus: list[int]  # the CPUs this process may run on
    busy: float | None  # how many of them other work keeps busy (None: unknown)
    quota: int | None  # a CPU quota in whole cores (None: none)

    @classmethod
    def measure(cls) -> "CpuLoad":
        cpus = allowed_cpus()
        return cls(cpus, busy_cores(cpus), cgroup_cpu_limit())


def choose_threads(requested: int | None = None, *, load: CpuLoad | None = None, env=None) -> ThreadChoice:
    """The thread count for a training (the policy in the module docstring). ``load``
    replaces the measurement (``CpuLoad.measure()``, 0.2 s) and ``env`` ``os.environ``."""
    env = os.environ if env is None else env
    if requested:  # None or 0: not set (0 was "torch's default" before this policy)
        return ThreadChoice(_positive_int(str(requested), "threads"), "as requested")
    for var in ("PERSEQ_THREADS", "OMP_NUM_THREADS"):
        if env.get(var, "").strip():
            return ThreadChoice(_positive_int(env[var].strip(), var), f"{var}={env[var].strip()}")
    load = CpuLoad.measure() if load is None else load
    total = len(load.cpus)
    n_busy = 0 if load.busy is None else min(total, math.floor(load.busy + 0.5))  # whole cores, half up
    free = total - n_busy
    n = max(1, free if load.quota is None else min(load.quota, free))
    why = f"{total} cores, load unknown" if load.busy is None else f"{n_busy} of {total} cores busy"
    return ThreadChoice(n, why + ("" if load.quota is None else f", CPU quota {load.quota}"))


def apply_threads(n: int) -> None:
    """Run torch's intra-op pool and numba's pool (perseq's kernels) on ``n`` threads."""
    import torch

    torch.set_num_threads(n)
    try:
        import numba

        from .ops import scan_numba  # noqa: F401  (sets numba's threading layer before its pool starts)
    except ImportError:  # pragma: no cover - numba is a dependency
        return
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


def use_threads(requested: int | None = None, log=print) -> ThreadChoice:
    """``choose_threads`` then ``apply_threads``, logging ``threads: N (why)``."""
    choice = choose_threads(requested)
    apply_threads(choice.n)
    if log is not None:
        log(f"threads: {choice}")
    return choice
