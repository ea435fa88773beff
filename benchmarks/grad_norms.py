"""Unclipped gradient norms of a run's model on its own training data and loss: does
``train.grad_clip`` (1.0 by default) act during training, or only in the first steps?

For a finished run folder, the global gradient norm (as ``clip_grad_norm_`` computes it,
before clipping) of the training loss on ten training batches (batch order of an epoch
with a fixed seed; refit runs use their training + validation events), for a freshly
initialized model (the run's seed) and for each weights file asked for. Writes JSON.

    python benchmarks/grad_norms.py runs/bench/ml-1m-hstu-large-101-s0 --out benchmarks/results/grad_norms_ml-1m_hstu-large-101-s0.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from perseq.checkpoint import load_model, saved_model_config
from perseq.cli import _rebuild_split
from perseq.data.batching import TrainWindows
from perseq.losses import get_loss
from perseq.models.registry import build_model
from perseq.train import refit_split, seed_everything, train_step


def batch_grad_norms(model, windows, loss_fn, n_batches: int, batch_size: int) -> list[float]:
    # training's own step with an optimizer that moves nothing (SGD, lr 0) and no clipping:
    # each batch's gradients are left in .grad exactly as training computes them
    still = torch.optim.SGD(model.parameters(), lr=0.0)
    norms = []
    for idx in windows.batch_order(batch_size, seed=5)[:n_batches]:
        train_step(model, windows.make_batch(idx), loss_fn, still)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))
    return norms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run folder (config.json, weights)")
    ap.add_argument("--weights", nargs="+", default=["model.safetensors"], help="weights files in the folder")
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="JSON file (printed either way)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    run = Path(a.run)
    meta = json.loads((run / "config.json").read_text())
    cfg, split = _rebuild_split(meta)
    results = run / "results.json"
    if results.exists() and (json.loads(results.read_text()).get("refit") or {}).get("only"):
        split = refit_split(split)  # a refit-only run trained on training + validation events
    if cfg.model["name"] == "bert4rec":
        raise SystemExit("error: cloze models are not covered (their batches need masking)")
    loss_fn = get_loss(cfg.loss, None)
    mc = saved_model_config(meta)
    n_items = mc.pop("n_items")
    result = {"run": str(run), "batches": a.batches, "batch_size": cfg.train.batch_size, "grad_clip": cfg.train.grad_clip,
              "date": time.strftime("%Y-%m-%d"), "norms": {}}
    seed_everything(cfg.train.seed)
    models = {"init": build_model(cfg.model["name"], n_items, **mc)}
    for w in a.weights:
        models[w] = load_model(run, w)[0]
    for name, model in models.items():
        windows = TrainWindows(split, model.max_len, cfg.data.windows)
        norms = batch_grad_norms(model, windows, loss_fn, a.batches, cfg.train.batch_size)
        result["norms"][name] = {"values": [round(v, 4) for v in norms], "median": round(float(np.median(norms)), 4),
                                 "min": round(min(norms), 4), "max": round(max(norms), 4)}
        print(name, result["norms"][name], flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
