"""Time the counter-based dropout kernel (perseq/ops/dropout.py) against a plain multiply,
the memory-bound floor of any dropout: one forward call on a (128, 200, 256) float32 tensor
(the 4d FFN activation of an ML-1M batch), best of 15, at 1 and 2 numba threads. Writes a
JSON file. Run it with other work paused; to compare two versions run it at both commits.

    python benchmarks/dropout_kernel.py --out benchmarks/results/dropout_kernel.json
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

import numpy as np
from numba import set_num_threads

from perseq.ops.dropout import _masked_scale


def best_ms(f, reps: int = 15) -> float:
    f()  # compile / warm
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="JSON file for the timings (printed either way)")
    a = ap.parse_args()
    x = np.random.default_rng(0).standard_normal(128 * 200 * 256).astype(np.float32)
    out = np.empty_like(x)
    seed, threshold, scale = np.uint64(0x0123456789ABCDEF), np.uint64(int(0.2 * 2**32)), np.float32(1.25)
    rows = []
    for threads in (1, 2):
        set_num_threads(threads)
        rows.append({"threads": threads,
                     "dropout_ms": round(best_ms(lambda: _masked_scale(x, out, seed, threshold, scale)), 2),
                     "multiply_ms": round(best_ms(lambda: np.multiply(x, scale, out=out)), 2)})
        print(rows[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"elements": x.size, "rows": rows, "commit": commit, "cpu": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d")}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
