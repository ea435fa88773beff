"""perseq.runtime: glibc allocator tuning for training (page faults, not speed, are checked:
they are what the setting removes, and they are deterministic where timings are not)."""
import json
import os
import platform
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt tuning applies to glibc only")

# Touch a 64 MB tensor, free it, and count the page faults of touching a 60 MB one: under
# glibc's defaults a block that size is a fresh mmap every time (15,360 new 4 KiB pages);
# tuned, it is carved from the freed heap block, whose pages are mapped already. (Smaller
# than the first: torch allocates with posix_memalign, which glibc 2.36 serves from a chunk
# a little larger than asked for, so a freed block of exactly the same size may not fit;
# in training, freed blocks of many sizes coalesce.)
_PROBE = r"""
import json, resource, sys, torch
from perseq.runtime import tune_malloc_for_training
torch.set_num_threads(1)  # no thread pool starting (and allocating) between the two touches
tuned = tune_malloc_for_training() if sys.argv[1] == "tune" else False
def touch(mb):
    t = torch.empty(mb << 18)  # float32
    t.fill_(1.0)
    del t
touch(64)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch(60)
print(json.dumps({"tuned": tuned, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}))
"""


def _run(script, mode, **env):
    """stdout of ``script`` run in a fresh process with argv[1] = mode, the allocator
    settings of this environment removed and ``env`` added."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "PERSEQ_MALLOC_TUNING"}
    e.update(env)
    return subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, env=e, check=True).stdout


def _probe(mode, **env):
    return json.loads(_run(_PROBE, mode, **env).strip().splitlines()[-1])


@glibc_only
def test_tuned_allocator_reuses_freed_pages():
    base, tuned = _probe("default"), _probe("tune")
    assert tuned["tuned"] is True
    assert tuned["faults"] < 1000, (base, tuned)  # vs one per 4 KiB page (15,360) untuned
    # the probe does touch fresh pages under the defaults, unless transparent huge pages are
    # on for every mapping (2 MiB pages: 32 faults)
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    if not (os.path.exists(thp) and "[always]" in open(thp).read()):
        assert base["faults"] > 10_000, base


@glibc_only
def test_opt_out_and_explicit_glibc_settings_are_respected():
    assert _probe("tune", PERSEQ_MALLOC_TUNING="0")["tuned"] is False
    assert _probe("tune", MALLOC_TRIM_THRESHOLD_="1000000")["tuned"] is False
    assert _probe("tune", GLIBC_TUNABLES="glibc.malloc.mmap_max=0")["tuned"] is False


# A few HSTU training steps whose (B, H, T, T) attention (64 x 2 x 300 x 300 floats, 46 MB)
# is over glibc's 32 MB mmap limit. Before training, a 256 MB block is filled with NaN and
# freed: tuned, later tensors reuse those pages, so a kernel that read memory it never
# wrote would see NaN there, where the defaults hand out fresh zeroed pages.
_TRAIN = r"""
import hashlib, sys, torch
from perseq.runtime import tune_malloc_for_training
from perseq.models import build_model
torch.set_num_threads(1)
tuned = tune_malloc_for_training() if sys.argv[1] == "tune" else False
junk = torch.full((64 << 20,), float("nan"))
del junk
torch.manual_seed(0)
model = build_model("hstu", 500, max_len=300, d=16, n_heads=2, dropout=0.1, time_bias=False)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
items = torch.randint(1, 501, (64, 300))
for _ in range(3):
    h = model.encode(items)  # (64, 300, 16)
    loss = (h @ model.output_embeddings().T).logsumexp(-1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
print(tuned, float(loss), digest)
"""


@glibc_only
def test_training_is_bitwise_the_same_under_either_allocator():
    base, tuned = _run(_TRAIN, "default").split(), _run(_TRAIN, "tune").split()
    assert base[0] == "False" and tuned[0] == "True"
    assert base[1:] == tuned[1:] and base[1] != "nan"


_SPIN_PROBE = "import os, sys\n{first}\nimport perseq, torch\nprint(os.environ.get('GOMP_SPINCOUNT'))"


@pytest.mark.parametrize("first,env,expected", [
    ("", {}, "10000"),  # import perseq before torch: set
    ("import torch", {}, "None"),  # torch (so libgomp) already loaded: too late, left alone
    ("", {"PERSEQ_OMP_SPIN_TUNING": "0"}, "None"),  # opted out
    ("", {"GOMP_SPINCOUNT": "7"}, "7"),  # the user's own setting wins
    ("", {"OMP_WAIT_POLICY": "PASSIVE"}, "None"),
])
def test_openmp_spin_is_limited_only_when_perseq_comes_first_and_nothing_is_set(first, env, expected):
    from perseq.runtime import OPENMP_SPIN_COUNT

    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "PERSEQ_OMP_SPIN_TUNING")}
    out = subprocess.run([sys.executable, "-c", _SPIN_PROBE.format(first=first)], env={**clean, **env},
                         capture_output=True, text=True, check=True).stdout.split()[-1]
    assert out == (OPENMP_SPIN_COUNT if expected == "10000" else expected)


# ---- thread count (choose_threads: the policy in runtime.py's docstring) ----

def test_explicit_count_wins_then_perseq_threads_then_omp_num_threads():
    from perseq.runtime import CpuLoad, choose_threads

    env = {"PERSEQ_THREADS": "3", "OMP_NUM_THREADS": "5"}
    assert choose_threads(2, env=env, load=CpuLoad([0, 1], 0.0, None)).n == 2
    c = choose_threads(None, env=env, load=CpuLoad([0, 1], 2.0, None))
    assert (c.n, str(c)) == (3, "3 (PERSEQ_THREADS=3)")  # an override is taken as given, busy or not
    assert choose_threads(None, env={"OMP_NUM_THREADS": "5"}, load=CpuLoad([0, 1], 0.0, None)).n == 5
    assert choose_threads(0, env={}, load=CpuLoad([0, 1], 0.0, None)).n == 2  # 0: not set (as before)
    for bad in ({"PERSEQ_THREADS": "0"}, {"PERSEQ_THREADS": "two"}, {"OMP_NUM_THREADS": "-1"}):
        with pytest.raises(ValueError, match="thread count"):
            choose_threads(None, env=bad, load=CpuLoad([0, 1], 0.0, None))
    with pytest.raises(ValueError):
        choose_threads(-2, env={})


@pytest.mark.parametrize("busy", [0.0, 0.2, 0.49, 0.51, 1.0, 1.4, 2.6, 3.0, 7.5])
@pytest.mark.parametrize("n_cpus", [1, 2, 4])
def test_automatic_count_is_the_cores_not_busy_within_1_and_the_cores(busy, n_cpus):
    from perseq.runtime import CpuLoad, choose_threads

    c = choose_threads(None, env={}, load=CpuLoad(list(range(n_cpus)), busy, None))
    assert 1 <= c.n <= n_cpus
    n_busy = min(n_cpus, int(busy + 0.5))
    assert c.n == max(1, n_cpus - n_busy)
    assert c.reason == f"{n_busy} of {n_cpus} cores busy"


def test_a_cpu_quota_caps_the_count_and_busy_cores_reduce_it():
    from perseq.runtime import CpuLoad, choose_threads

    assert choose_threads(None, env={}, load=CpuLoad(list(range(8)), 0.0, 2)).n == 2
    assert choose_threads(None, env={}, load=CpuLoad(list(range(8)), 5.0, 4)).n == 3
    assert choose_threads(None, env={}, load=CpuLoad([0, 1], 1.0, None)).n == 1
    assert str(choose_threads(None, env={}, load=CpuLoad([0, 1], 1.0, None))) == "1 (1 of 2 cores busy)"
    assert str(choose_threads(None, env={}, load=CpuLoad([0, 1, 2, 3], None, 2))) == "2 (4 cores, load unknown, CPU quota 2)"


def test_without_proc_stat_the_load_average_stands_in(monkeypatch):
    import perseq.runtime as rt

    monkeypatch.setattr(rt, "_cpu_times", lambda cpus: None)
    monkeypatch.setattr(rt.os, "getloadavg", lambda: (1.3, 0.0, 0.0), raising=False)
    assert rt.busy_cores([0, 1]) == 1.3
    assert rt.busy_cores([0]) == 1.0  # capped at the CPUs asked about
    assert rt.choose_threads(None, env={}, load=rt.CpuLoad([0, 1, 2, 3], rt.busy_cores([0, 1, 2, 3]), None)).n == 3


@pytest.mark.skipif(not os.path.exists("/proc/stat") or not hasattr(os, "sched_setaffinity"),
                    reason="measures /proc/stat with a process pinned to one CPU")
def test_a_busy_loop_on_a_core_counts_as_busy_and_lowers_the_automatic_count():
    from perseq.runtime import CpuLoad, allowed_cpus, busy_cores, choose_threads

    cpus = allowed_cpus()
    spin = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpus[-1]}}})\nwhile True: pass"])
    try:
        import time

        time.sleep(0.5)  # started and spinning
        assert busy_cores([cpus[-1]]) > 0.8  # that CPU is taken (by the loop, or by it and others)
        if len(cpus) > 1:
            assert choose_threads(None, env={}, load=CpuLoad(cpus, busy_cores(cpus), None)).n <= len(cpus) - 1
    finally:
        spin.kill()
        spin.wait()


def test_use_threads_sets_torch_and_numba_and_logs_the_choice():
    import numba
    import torch

    from perseq.runtime import use_threads

    before_t, before_n = torch.get_num_threads(), numba.get_num_threads()
    lines = []
    try:
        choice = use_threads(1, log=lines.append)
        assert choice.n == 1 and torch.get_num_threads() == 1 and numba.get_num_threads() == 1
        assert lines == ["threads: 1 (as requested)"]
    finally:
        torch.set_num_threads(before_t)
        numba.set_num_threads(before_n)
