"""The PCRec paper's two breakdowns, for our runs: NDCG@10 of HSTU, HSTU + PCRec-simple and
PCRec by the test target's popularity (head: the 20% most frequent training items; tail:
the rest) and by the user's history length, from benchmarks/results/*.json.

    python benchmarks/plot_pcrec.py          # -> benchmarks/results/pcrec_breakdown.png

Each bar is the mean over the result file's seeds. HSTU's bars come from the
PCRec-simple file's ``backbone_breakdown`` (the same checkpoints, unadapted) when it
exists, else from HSTU's own file. A missing file leaves its bars out (named on stdout),
so the plot can be redrawn while the runs are still coming in.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DATASETS = {"ml-1m": "MovieLens-1M", "amazon-beauty": "Amazon Beauty"}
METRIC = "ndcg@10"


def _load(name: str) -> dict | None:
    p = RESULTS / f"{name}.json"
    if not p.exists():
        print(f"missing: {p.name}")
        return None
    return json.loads(p.read_text())


def series(ds: str) -> dict[str, dict]:
    """{label: breakdown} of the three models on ``ds`` (those with a result file)."""
    out = {}
    adapted, plain, pc = _load(f"{ds}_hstu+pcrec-simple"), _load(f"{ds}_hstu"), _load(f"{ds}_pcrec")
    if adapted is not None:
        out["HSTU"] = adapted["backbone_breakdown"]
    elif plain is not None:
        out["HSTU"] = plain["breakdown"]
    if adapted is not None:
        out["HSTU + PCRec-simple"] = adapted["breakdown"]
    if pc is not None:
        out["PCRec"] = pc["breakdown"]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS / "pcrec_breakdown.png"))
    a = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(DATASETS), 2, figsize=(12, 3.6 * len(DATASETS)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2.4]})
    for row, (ds, title) in zip(axes, DATASETS.items()):
        s = series(ds)
        for ax, kind in zip(row, ("popularity", "length")):
            if not s:
                ax.set_axis_off()
                continue
            groups = [g for g in next(iter(s.values())) if (g in ("head", "tail")) == (kind == "popularity")]
            x = np.arange(len(groups))
            w = 0.8 / len(s)
            base = s.get("HSTU", {})
            for i, (label, br) in enumerate(s.items()):
                vals = [br[g][METRIC] if g in br else np.nan for g in groups]
                xs = x + (i - (len(s) - 1) / 2) * w
                ax.bar(xs, vals, w, label=label)
                if label != "HSTU":  # the change against HSTU, which bars of these heights hide
                    for xi, g, v in zip(xs, groups, vals):
                        if g in base and base[g][METRIC] > 0 and not np.isnan(v):
                            ax.text(xi, v, f"{100 * (v / base[g][METRIC] - 1):+.0f}%", ha="center", va="bottom",
                                    fontsize=7)
            first = next(iter(s.values()))
            ax.set_xticks(x, [f"{g}\n{first[g]['n_users']} users" for g in groups], fontsize=8)
            ax.set_ylabel("test NDCG@10")
            ax.set_title(f"{title}: by {'target popularity' if kind == 'popularity' else 'history length'}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
