"""The quickstart: embedded synthetic data, two models, a table next to the ceiling."""
from __future__ import annotations

import time

from .config import from_dict
from .data.sequences import leave_one_out
from .data.synthetic import make_synthetic
from .report import markdown_table
from .train import fit

MODELS = ("sasrec", "gru4rec")


def run_quickstart(epochs: int = 40, out: str | None = "runs/quickstart", log=print) -> dict:
    t0 = time.perf_counter()
    data, gen = make_synthetic()
    split = leave_one_out(data)
    log(f"synthetic data: {data.n_users} users, {data.n_items} items, {data.n_interactions} events "
        f"(clusters, long-term mixtures, short-term transitions, per-user quirks)")
    # the synthetic users revisit items (quirks, transitions), so seen items stay rankable
    base = {"data": {"max_len": 100}, "eval": {"exclude_seen": False},
            "train": {"epochs": epochs, "patience": 8, "lr": 2e-3}}
    rows = []
    for name in MODELS:
        cfg = from_dict({**base, "model": {"name": name}})
        r = fit(cfg, split, out_dir=None if out is None else f"{out}/{name}", log=lambda s: log("  " + s))
        rows.append({"name": f"{name} (epoch {r['best_epoch']})", **r["test"]})
    ceiling = gen.bayes_ceiling(data, split.test_pos)
    rows.append({"name": "Bayes-optimal ceiling", **ceiling})
    log("\ntest metrics, full ranking, seen items not excluded:\n")
    log(markdown_table(rows))
    log(f"\nquickstart finished in {time.perf_counter() - t0:.0f}s")
    return {"rows": rows, "ceiling": ceiling}
