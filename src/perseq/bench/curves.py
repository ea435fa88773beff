"""Learning curves of run folders, finished or still training: the validation metric per
epoch (left) and against training wall time (right), one line per run (named by its folder), the best
epoch marked. Reads each folder's ``trainer_state.json`` (written after every epoch), so it is
safe to run while the trainings go on.

    perseq bench curves runs/bench/ml-1m-sasrec-s0 runs/bench/ml-1m-hstu-ce-s0 --out benchmarks/results/ml-1m_curves

writes <out>.png and <out>.csv (run, epoch, seconds, metric): the numbers behind the plot.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def read_curve(run: str | Path, metric: str = "ndcg@10") -> dict:
    """One run's validation ``metric`` per epoch and the cumulative training seconds at the
    end of each epoch (evaluation excluded, as ``epoch_seconds`` in results.json)."""
    d = Path(run)
    path = d / "trainer_state.json"
    if not path.exists():
        raise SystemExit(f"error: {d} has no trainer_state.json (not a run folder, or no epoch finished yet)")
    hist = json.loads(path.read_text())["history"]
    scored = [rec for rec in hist if "valid" in rec]  # a federated run validates every eval_every rounds
    if scored and metric not in scored[0]["valid"]:
        raise SystemExit(f"error: {d}: no validation metric {metric!r}; it has {sorted(scored[0]['valid'])}")
    epochs, values, seconds, total = [], [], [], 0.0
    for rec in hist:
        total += rec["seconds"]
        if "valid" in rec:
            epochs.append(rec["epoch"] if "epoch" in rec else rec["round"])  # a federated run counts rounds
            values.append(rec["valid"][metric])
            seconds.append(total)
    finished = (d / "results.json").exists()
    unit = "round" if hist and "round" in hist[0] else "epoch"
    return {"run": d.name, "epoch": epochs, "value": values, "seconds": seconds, "finished": finished, "unit": unit}


def plot(curves: list[dict], metric: str, out: Path, title: str | None = None, ymin: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for c in curves:
        if not c["epoch"]:
            continue
        label = c["run"] + ("" if c["finished"] else " (unfinished)")
        best = max(range(len(c["value"])), key=c["value"].__getitem__)
        for ax, x in zip(axes, (c["epoch"], [s / 60 for s in c["seconds"]])):
            (line,) = ax.plot(x, c["value"], label=label, lw=1.4)
            ax.plot([x[best]], [c["value"][best]], "o", color=line.get_color(), ms=5)
    units = {c.get("unit", "epoch") for c in curves}
    axes[0].set_xlabel(" / ".join(sorted(units)))
    axes[1].set_xlabel("training time (min, evaluation excluded)")
    axes[0].set_ylabel(f"validation {metric}")
    for ax in axes:
        ax.grid(alpha=0.3)
    if ymin is not None:  # the first epochs compress the interesting end of the curves
        axes[0].set_ylim(bottom=ymin)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title or f"validation {metric} (dot: best {' / '.join(sorted(units))})")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="perseq bench curves", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders (with trainer_state.json)")
    ap.add_argument("--out", required=True, help="output path without suffix: writes <out>.png and <out>.csv")
    ap.add_argument("--metric", default="ndcg@10", help="validation metric to plot (default: ndcg@10)")
    ap.add_argument("--title", help="plot title")
    ap.add_argument("--ymin", type=float, help="lower end of the metric axis (default: the data's)")
    a = ap.parse_args(argv)
    curves = [read_curve(r, a.metric) for r in a.runs]
    names = [c["run"] for c in curves]
    for c, r in zip(curves, a.runs):
        if names.count(c["run"]) > 1:  # same config and seed from two experiment folders
            c["run"] = "/".join(Path(r).resolve().parts[-2:])
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "epoch", "seconds", a.metric])
        for c in curves:
            for e, s, v in zip(c["epoch"], c["seconds"], c["value"]):
                w.writerow([c["run"], e, f"{s:.1f}", f"{v:.6f}"])
    plot(curves, a.metric, out, a.title, a.ymin)
    for c in curves:
        if c["value"]:
            i = max(range(len(c["value"])), key=c["value"].__getitem__)
            state = "finished" if c["finished"] else "unfinished"
            print(f"{c['run']}: {len(c['epoch'])} epochs ({state}), best {a.metric} {c['value'][i]:.4f} at epoch {c['epoch'][i]}")
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.csv')}")
    return 0
