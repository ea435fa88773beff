"""Where HSTU's blocked attention should take over on CPU: one training step (batch 4,
synthetic timestamps, sampled softmax; ``perseq.bench.speed.measure_point``) with the whole
(B, H, T, T) line and with the blocked line forced, per model and length, each point in its
own process (peak RSS is per process). Appends one JSON line per point to --out.

    python benchmarks/hstu_blocked_cut.py --models hstu,hstu-large --lengths 512,1024,2048,4096 \
        --threads 2 --rounds 2 --out benchmarks/results/hstu_blocked_cut_s16.jsonl

The thresholds this informed are ``BLOCKED_FROM`` and ``WHOLE_MAX_SCORES`` in
``perseq/models/hstu.py``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys


def worker(model: str, length: int, mode: str, threads: int) -> dict:
    import perseq  # noqa: F401  (before torch: the OpenMP spin setting)
    import torch

    from perseq.bench.speed import measure_point
    from perseq.models import hstu

    torch.set_num_threads(threads)
    hstu.BLOCKED_FROM = 1 if mode == "blocked" else 10**9
    hstu.WHOLE_MAX_SCORES = 0 if mode == "blocked" else 10**18
    return {**measure_point(model, length, 4, "cpu", 3), "mode": mode}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="hstu,hstu-large")
    ap.add_argument("--lengths", default="512,1024,2048,4096")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="whole, blocked alternations per point")
    ap.add_argument("--out", required=True)
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "LENGTH", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker[0], int(a.worker[1]), a.worker[2], a.threads)))
        return
    for model in a.models.split(","):
        for length in a.lengths.split(","):
            for _ in range(a.rounds):
                for mode in ("whole", "blocked"):
                    cmd = [sys.executable, __file__, "--worker", model, length, mode, "--threads", str(a.threads), "--out", a.out]
                    p = subprocess.run(cmd, capture_output=True, text=True)
                    line = p.stdout.strip().splitlines()[-1] if p.returncode == 0 else json.dumps(
                        {"model": model, "length": int(length), "mode": mode, "error": (p.stderr.strip().splitlines() or ["?"])[-1]})
                    print(line, flush=True)
                    with open(a.out, "a") as f:
                        f.write(line + "\n")


if __name__ == "__main__":
    main()
