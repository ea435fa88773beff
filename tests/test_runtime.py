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
