"""Per-epoch validation and test curves of runs trained with ``eval.monitor_test: true``,
and what each way of reading a result off them gives.

    python benchmarks/test_curve.py runs/bench/ml-1m-hstu-large-refinit-s0 \\
        runs/bench/ml-1m-hstu-large-101-refinit-monitor-s0 --out benchmarks/results/test_curve_ml-1m_hstu-large \\
        --published 0.1893 --ymin 0.14

writes ``<out>.json`` and ``<out>.png``. Per run:
  * ``at_valid_best``: the test at the epoch early stopping chose on validation (the
    reported number of an early-stopped run);
  * ``at_last``: the test after the last epoch (the reported number of a fixed-epoch run);
  * ``peek_best``: the highest test over all epochs and its epoch. This one is selected on
    the test itself, so it is **not a result**: it bounds what reading a number off a
    monitored test curve can give, which is what generative-recommenders' trainer offers
    (it evaluates each user's last event every interval; its maintainers say the published
    numbers were read at a chosen epoch, issue #61).
Works on unfinished runs (it reads ``trainer_state.json``, which every epoch rewrites).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_history(run: Path) -> list[dict]:
    for name in ("trainer_state.json", "results.json"):
        if (run / name).exists():
            return json.loads((run / name).read_text())["history"]
    raise FileNotFoundError(f"{run}: neither trainer_state.json nor results.json")


def summarize(history: list[dict], metric: str) -> dict:
    test = {r["epoch"]: r["test_monitor"][metric] for r in history if "test_monitor" in r}
    if not test:
        raise ValueError("no epoch has a test_monitor record: train with eval.monitor_test: true")
    epochs = list(test)
    valid = {r["epoch"]: r["valid"][metric] for r in history if r.get("valid")}
    out = {"epochs": len(history), "at_last": {"epoch": epochs[-1], metric: test[epochs[-1]]}}
    peek = max(test, key=lambda e: (test[e], -e))  # the first epoch reaching the maximum
    out["peek_best"] = {"epoch": peek, metric: test[peek]}
    # a refit-only run validates on events it trains on, once, at its last epoch: no selection
    if len(valid) > 1:
        best = max(valid, key=lambda e: (valid[e], -e))  # as fit: a later epoch must be strictly better
        out["at_valid_best"] = {"epoch": best, metric: test.get(best), "valid": valid[best]}
    out["curve"] = {"epoch": epochs, "test": [test[e] for e in epochs], "valid": [valid.get(e) for e in epochs]}
    return out


def plot(summaries: dict, metric: str, path: Path, published: float | None = None, ymin: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, s) in enumerate(summaries.items()):
        color, c = f"C{i % 10}", s["curve"]
        ax.plot(c["epoch"], c["test"], color=color, label=f"{name}: test (monitored)")
        if any(v is not None for v in c["valid"]) and "at_valid_best" in s:
            ax.plot(c["epoch"], c["valid"], color=color, ls=":", label=f"{name}: validation")
            b = s["at_valid_best"]
            ax.plot([b["epoch"]], [b[metric]], "o", color=color, label=f"test at validation's best epoch ({b[metric]:.4f})")
        p = s["peek_best"]
        ax.plot([p["epoch"]], [p[metric]], "x", color=color, ms=9, label=f"highest test, epoch {p['epoch']} ({p[metric]:.4f}, not a result)")
    if published is not None:
        ax.axhline(published, color="k", lw=0.8, ls="--", label=f"published ({published})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_ylim(bottom=ymin)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders trained with eval.monitor_test: true")
    ap.add_argument("--metric", default="ndcg@10")
    ap.add_argument("--out", type=Path, required=True, help="output stem: writes <out>.json and <out>.png")
    ap.add_argument("--published", type=float, help="a published figure to draw as a dashed line")
    ap.add_argument("--ymin", type=float, help="lower end of the plot's y axis (default: the lowest value)")
    args = ap.parse_args()
    summaries = {run.name: summarize(load_history(run), args.metric) for run in args.runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"metric": args.metric, "runs": summaries}, indent=1))
    plot(summaries, args.metric, args.out.with_suffix(".png"), args.published, args.ymin)
    for name, s in summaries.items():
        parts = [f"last epoch {s['at_last']['epoch']}: {s['at_last'][args.metric]:.4f}"]
        if "at_valid_best" in s:
            parts.insert(0, f"at validation's best epoch {s['at_valid_best']['epoch']}: {s['at_valid_best'][args.metric]:.4f}")
        parts.append(f"highest (peek, not a result) epoch {s['peek_best']['epoch']}: {s['peek_best'][args.metric]:.4f}")
        print(f"{name}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
