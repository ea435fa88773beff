"""Render the quality table of BENCHMARKS.md from benchmarks/results/*.json.

    python benchmarks/render.py > /tmp/quality.md
"""
import json
import sys
from pathlib import Path

KEYS = ("ndcg@10", "hr@10", "ndcg@50", "hr@50", "mrr")


def main(paths):
    rows = ["| result | dataset | model | seeds | exclude_seen | refit | " + " | ".join(KEYS) + " | epoch s | best epochs |",
            "|---|---|---|---|---|---|" + "---:|" * len(KEYS) + "---:|---|"]
    for p in paths:
        r = json.loads(Path(p).read_text())
        if "metrics" not in r:
            continue
        # a refit result is two rows: the early-stopped models, then the refitted ones;
        # a refit-only result (fixed epoch count, no early stopping) is one
        proto = r["protocol"]
        if not proto.get("refit"):
            variants = [("no", r["metrics"])]
        elif "refit_epochs" in proto:
            variants = [(f"only ({proto['refit_epochs']} epochs)", r["metrics"])]
        else:
            variants = [("no", r["metrics_before_refit"]), ("yes", r["metrics"])]
        for refit, metrics in variants:
            cells = [f"{metrics[k]['mean']:.4f} ± {metrics[k]['std']:.4f}" for k in KEYS]
            rows.append(f"| `{Path(p).stem}` | {r['dataset']} | {r['model']} | {','.join(map(str, r['seeds']))} | "
                        f"{r['protocol']['exclude_seen']} | {refit} | " + " | ".join(cells) + f" | {r['epoch_seconds']:.1f} | {r['best_epochs']} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1:] or sorted(Path(__file__).parent.glob("results/*.json")))
