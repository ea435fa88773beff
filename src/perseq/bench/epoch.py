"""Time one training epoch and the data preparation; writes a JSON result.

    python -m perseq.bench.epoch --dataset ml-1m --loss ce --out benchmarks/results/speed_ml-1m_sasrec_ce.json

Peak memory is this process's maximum resident set size, so run one measurement per
process (the command line does).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path
from unittest import mock

import torch

from ..config import DataConfig
from ..data.batching import TrainWindows
from ..data.loading import load_data
from ..data.sequences import leave_one_out
from ..evaluate import train_item_counts
from ..losses import LossConfig, get_loss
from ..models import build_model, hstu
from ..report import git_commit, hardware_name
from ..runtime import tune_malloc_for_training, use_threads
from ..train import seed_everything, train_step


def _scan_kernels() -> str:
    from ..ops import scan_numba

    return "avx512-c" if scan_numba._native_lib() is not None else "numba"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ml-1m")
    ap.add_argument("--model", default="sasrec")
    ap.add_argument("--max-len", type=int, default=200)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=2, help="SASRec's and BERT4Rec's blocks (the others keep their own)")
    ap.add_argument("--loss", default="ce", choices=["ce", "sampled", "bce", "gbce"])
    ap.add_argument("--n-neg", type=int, default=128)
    ap.add_argument("--negatives", default="shared", choices=["shared", "per_row"], help="sampled loss: negatives "
                    "shared by the batch or drawn per target row")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampled loss temperature")
    ap.add_argument("--hstu-attention", default="fused", choices=["fused", "torch"],
                    help="HSTU's pointwise attention: the fused CPU kernels (default) or the reference torch line "
                         "(to measure what the kernels gain)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--windows", default="all", choices=["all", "last"])
    ap.add_argument("--epochs", type=int, default=1, help="epochs to time back to back; the result is the last "
                    "one's (the first still pays one-off costs: allocator warm-up, first-touch pages); "
                    "all are listed under epoch_seconds_each")
    ap.add_argument("--threads", type=int, default=None, help="torch and numba threads (default: as training "
                    "chooses them: PERSEQ_THREADS, OMP_NUM_THREADS, else the cores not busy now; perseq/runtime.py)")
    ap.add_argument("--out", help="JSON file to write")
    a = ap.parse_args(argv)
    # as fit() chooses them; the line goes to stderr, stdout is the JSON result
    threads = use_threads(a.threads, log=lambda s: print(s, file=sys.stderr))
    malloc_tuned = tune_malloc_for_training()  # as fit() trains
    seed_everything(0)

    t0 = time.perf_counter()
    data, _ = load_data(DataConfig(dataset=a.dataset), log=lambda s: None)
    prep_s = time.perf_counter() - t0
    split = leave_one_out(data)
    params = {"d": a.d}
    if a.model in ("sasrec", "bert4rec"):
        params["n_blocks"] = a.blocks
    model = build_model(a.model, data.n_items, max_len=a.max_len, **params)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    windows = TrainWindows(split, a.max_len, a.windows, cloze=model.objective == "cloze")
    loss_fn = get_loss(LossConfig(name=a.loss, n_neg=a.n_neg, negatives=a.negatives, temperature=a.temperature), train_item_counts(split))
    order = windows.batch_order(a.batch_size, seed=0)
    # the reference line instead of the fused kernels, for this measurement only
    no_fused = mock.patch.object(hstu, "_hstu_numba", None) if a.hstu_attention == "torch" else contextlib.nullcontext()
    with no_fused:
        for idx in order[:2]:  # warm-up: first-call allocations and kernel selection
            train_step(model, windows.make_batch(idx), loss_fn, opt, grad_clip=1.0)
        each = []
        for e in range(a.epochs):
            t1 = time.perf_counter()
            for idx in (order if e == 0 else windows.batch_order(a.batch_size, seed=e)):
                train_step(model, windows.make_batch(idx), loss_fn, opt, grad_clip=1.0)
            each.append(time.perf_counter() - t1)
        epoch_s = each[-1]
    res = {
        "dataset": a.dataset,
        "model": a.model,
        "loss": a.loss if a.loss != "sampled" else f"sampled({a.n_neg}, {a.negatives}, t={a.temperature})",
        "hstu_attention": a.hstu_attention if a.model.startswith("hstu") else None,
        # which fused CPU scan ran (the C kernels where they load, else numba's)
        "scan_kernels": _scan_kernels() if a.model == "mamba4rec" else None,
        "max_len": a.max_len,
        "d": a.d,
        # what the model has (the flag sets SASRec's and BERT4Rec's only)
        "blocks": getattr(model.cfg, "n_blocks", getattr(model.cfg, "n_layers", None)),
        "batch_size": a.batch_size,
        "windows": a.windows,
        "train_sequences": len(windows),
        "train_targets": windows.n_targets,
        "epoch_seconds": round(epoch_s, 2),
        "epoch_seconds_each": [round(x, 2) for x in each],
        "sequences_per_second": round(len(windows) / epoch_s, 1),
        "targets_per_second": round(windows.n_targets / epoch_s, 0),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "data_read_prepare_seconds": round(prep_s, 2),
        "torch_threads": torch.get_num_threads(),
        "threads_reason": threads.reason,
        "malloc_tuned": malloc_tuned,
        # libgomp's spin, as torch read it at import (perseq.runtime.limit_openmp_spin)
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "hardware": hardware_name(),
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
