"""Validation NDCG@10 per round of every federated row of a dataset (FedAvg, PFSR, its
ablations, PFSR with DP), from the ``federated_runs`` curves in benchmarks/results/*.json,
with centralized training's test NDCG@10 as a reference line.

    python benchmarks/plot_federated.py                    # ML-1M -> benchmarks/results/federated_rounds_ml-1m.png
    python benchmarks/plot_federated.py --dataset amazon-beauty

A row with several seeds is drawn as their mean at the rounds every seed evaluated (seeds
stop early at different rounds; the mean runs to the shortest). The centralized line is a
test figure against validation curves: the two events differ, so read it as a level, not a
target a curve must cross.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def rows(dataset: str) -> list[tuple[str, list[int], list[float], int]]:
    """(model name, rounds, mean validation NDCG@10, seeds) of each federated result file."""
    out = []
    for p in sorted(RESULTS.glob(f"{dataset}_*.json")):
        d = json.loads(p.read_text())
        runs = d.get("federated_runs") if isinstance(d, dict) else None
        if not runs:
            continue
        curves = [{r: m["ndcg@10"] for r, m in run["valid_curve"]} for run in runs]
        common = sorted(set.intersection(*(set(c) for c in curves)))
        out.append((d["model"], common, [sum(c[r] for c in curves) / len(curves) for r in common], len(runs)))
    return out


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ml-1m")
    ap.add_argument("--out", help="PNG to write (default: benchmarks/results/federated_rounds_<dataset>.png)")
    a = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = rows(a.dataset)
    if not found:
        raise SystemExit(f"no federated result files for {a.dataset} in {RESULTS}")
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, rounds, ndcg, seeds in found:
        ax.plot(rounds, ndcg, label=f"{name} ({seeds} seed{'s' if seeds > 1 else ''})", lw=1.5)
    central = RESULTS / f"{a.dataset}_mamba4rec.json"
    if central.exists():
        level = json.loads(central.read_text())["metrics"]["ndcg@10"]["mean"]
        ax.axhline(level, color="k", ls="--", lw=1, label=f"centralized Mamba4Rec, test ({level:.4f})")
    ax.set_xlabel("round")
    ax.set_ylabel("validation NDCG@10")
    ax.set_title(f"Federated training on {a.dataset}, one user per client")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = Path(a.out) if a.out else RESULTS / f"federated_rounds_{a.dataset}.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
