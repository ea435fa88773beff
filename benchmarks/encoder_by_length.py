"""Encoder cost versus sequence length: forward + backward of ``encode`` alone (no loss, no
optimizer) for a batch of random items, at the lengths an ML-1M epoch's length-bucketed
batches actually have, and the same over that epoch's real batches. Writes a JSON file.

Why: whole-epoch times mix the encoder with the full-softmax CE (the same for every
backbone) and with the batch-length distribution. The Mamba4Rec/SASRec epoch ratio depends
on that distribution: attention's cost falls quadratically with length, the scan's only
linearly, and an ML-1M epoch's batches average ~116 positions, not 200.

    python benchmarks/encoder_by_length.py --models sasrec,mamba4rec --lengths 20,50,100,150,200 \
        --threads 2 --out benchmarks/results/encoder_by_length.json

Import order matters for the numbers: ``perseq`` comes before ``torch`` here, as in the
``perseq`` command line, so its OpenMP spin setting applies (``perseq.runtime``).
"""
from __future__ import annotations

import perseq  # noqa: F401  (first: sets GOMP_SPINCOUNT before torch loads libgomp)

import argparse
import json
import os
import statistics
import time

import torch

from perseq.config import DataConfig
from perseq.data.batching import TrainWindows
from perseq.data.loading import load_data
from perseq.data.sequences import leave_one_out
from perseq.models import build_model
from perseq.report import git_commit, hardware_name
from perseq.runtime import tune_malloc_for_training


def fwd_bwd(model, items):
    """Forward and backward of ``encode`` with a fixed random output gradient of about the
    size a mean CE loss gives (1 / targets per batch). Not ``encode(...).sum()``: the encoders
    end in a LayerNorm, which maps a uniform gradient to (nearly) zero, and the tiny values
    that follow are denormals, which x86 computes in slow microcode. Until session 16 this
    benchmark did that, and it overstated Mamba4Rec's encoder (B=128, L=116, 2 threads:
    119.7 ms against 100.0 with this gradient; SASRec 86.0 against 82.4)."""
    h = model.encode(items)  # (B, L, d)
    if h.shape not in _GRADS:  # drawn once per shape, outside the timed steps that follow
        _GRADS[h.shape] = torch.randn(h.shape, generator=torch.Generator().manual_seed(0)) / h.shape[:2].numel()
    h.backward(_GRADS[h.shape])


_GRADS: dict = {}


def median_ms(fn, repeat: int) -> float:
    for _ in range(3):  # warm-up: allocations, kernel compilation
        fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sasrec,mamba4rec")
    ap.add_argument("--lengths", default="20,50,100,150,200")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=15, help="timed steps per point (median reported)")
    ap.add_argument("--dataset", default="ml-1m", help="whose epoch batches to run; '' to skip that part")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    tune_malloc_for_training()
    lengths = [int(v) for v in a.lengths.split(",")]
    batches = []
    if a.dataset:
        data, _ = load_data(DataConfig(dataset=a.dataset), log=lambda s: None)
        windows = TrainWindows(leave_one_out(data), 200, "all")
        batches = [windows.make_batch(i).inputs for i in windows.batch_order(a.batch, seed=0)]
        n_items = data.n_items
    else:
        n_items = 3706
    res = {"batch": a.batch, "threads": a.threads, "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
           "dataset": a.dataset or None, "epoch_batches": len(batches),
           "epoch_mean_length": round(statistics.mean(b.shape[1] for b in batches), 1) if batches else None,
           "models": {}, "hardware": hardware_name(), "torch": torch.__version__, "commit": git_commit(),
           "date": time.strftime("%Y-%m-%d")}
    for name in a.models.split(","):
        torch.manual_seed(0)
        params = {"d": 64, **({"n_blocks": 2} if name in ("sasrec", "bert4rec") else {})}
        model = build_model(name, n_items, max_len=200, **params).train()
        row = {"ms_by_length": {}}
        for L in lengths:
            items = torch.randint(1, n_items + 1, (a.batch, L))
            row["ms_by_length"][L] = round(median_ms(lambda: fwd_bwd(model, items), a.repeat), 1)
        if batches:
            for b in batches[:3]:
                fwd_bwd(model, b)
            t = time.perf_counter()
            for b in batches:
                fwd_bwd(model, b)
            row["epoch_batches_s"] = round(time.perf_counter() - t, 2)
        res["models"][name] = row
        print(name, json.dumps(row), flush=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", a.out)
    return res


if __name__ == "__main__":
    main()
