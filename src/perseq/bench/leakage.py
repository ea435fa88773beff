"""The leakage probe (perseq.federated.leakage) on one round of a federated config: how many
of a client's items the top moved rows of the item table give away, seen as each client's
own update, as the SecAgg+ sum, as the DP release at a target ε, and as one update with
that noise on its own.

    perseq bench leakage --config configs/ml-1m/mamba4rec-fedavg.yaml --weights runs/ml-1m-mamba4rec-fedavg-s0 \\
        --epsilon 8 --out benchmarks/results/federated_leakage_ml-1m.json

The clients are one round's sample of the config (``clients_per_round``, seed
``train.seed``), trained by the library's client step from ``--weights`` (a run folder's best
weights; default: the round-0 model). The DP noise multiplier is the one that spends
``--epsilon`` (δ = federated.dp_delta) over the config's whole schedule of rounds at its
sampling rate; the clipping norm is ``federated.dp_clip`` when set, else the median of these
updates' norms.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..report import write_result_file


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="perseq bench leakage", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/ml-1m/mamba4rec-fedavg.yaml", help="a federated run config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config value")
    ap.add_argument("--weights", help="a run folder: start the round from its best weights (default: round 0)")
    ap.add_argument("--epsilon", type=float, default=8.0, help="the ε the DP settings spend over the whole run")
    ap.add_argument("--round", type=int, default=0, help="which round's sample of clients (0-based)")
    ap.add_argument("--out", help="JSON file to write")
    a = ap.parse_args(argv)

    from ..config import load_config
    from ..data.batching import TrainWindows
    from ..data.loading import load_data
    from ..data.sequences import make_split
    from ..evaluate import train_item_counts
    from ..federated.client import local_update
    from ..federated.leakage import probe, touched_items, update_norms
    from ..federated.partition import active_clients, client_windows, partition
    from ..federated.privacy import noise_for_epsilon
    from ..federated.simulate import initial_model, sample_round
    from ..losses import get_loss
    from ..runtime import use_threads

    cfg = load_config(a.config, a.set)
    fc, tc = cfg.federated, cfg.train
    use_threads(tc.threads, log=lambda s: None)
    data, _ = load_data(cfg.data, log=lambda s: None)
    split = make_split(data, cfg.data.split)
    model = initial_model(cfg, data.n_items)
    if a.weights:
        model.load_state_dict(load_file(str(Path(a.weights) / "model.safetensors")))
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    windows = TrainWindows(split, model.max_len, cfg.data.windows)
    counts = train_item_counts(split)  # (n_items + 1,): the loss's and the popularity guess's
    loss_fn = get_loss(cfg.loss, counts)
    mine = client_windows(windows, partition(data.n_users, fc.users_per_client, tc.seed))
    active = active_clients(mine)
    plain_fc = type(fc)(**{**fc.__dict__, "dp_clip": None, "dropout": 0.0, "stragglers": 0.0})
    sampled, _ = sample_round(active, plain_fc, tc.seed, a.round)
    t0 = time.perf_counter()
    deltas, items = [], []
    for c in sampled:
        up, _ = local_update(model, start, windows, mine[int(c)], fc, tc, loss_fn, a.round)
        deltas.append(up.delta)
        items.append(touched_items(windows, mine[int(c)]))
    norms = update_norms(deltas)
    clip = fc.dp_clip if fc.dp_clip is not None else float(np.median(norms))
    q = len(sampled) / len(active)
    z = noise_for_epsilon(a.epsilon, sample_rate=q, rounds=fc.rounds, delta=fc.dp_delta)
    scores = probe(deltas, items, torch.as_tensor(counts, dtype=torch.float64), clip=clip, noise_multiplier=z, generator=torch.Generator().manual_seed(tc.seed))
    result = {"config": a.config, "overrides": a.set, "weights": a.weights or "round 0", "round": a.round,
              "clients": len(sampled), "mean_items_per_client": float(np.mean([len(i) for i in items])),
              "n_items": data.n_items, "recovered": scores,
              "dp": {"epsilon": a.epsilon, "delta": fc.dp_delta, "noise_multiplier": z, "clip": clip,
                     "sample_rate": q, "rounds": fc.rounds},
              "seconds": time.perf_counter() - t0}
    print(json.dumps(result["recovered"], indent=1), file=sys.stderr)
    if a.out:
        write_result_file(a.out, result)
    return result


if __name__ == "__main__":
    main()
