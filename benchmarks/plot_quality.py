"""Plot NDCG@10 of every issue-3 backbone on ML-1M and Amazon Beauty: our mean ± std over
seeds (one dot per seed) next to the published figures, from benchmarks/results/*.json.

    python benchmarks/plot_quality.py                 # -> benchmarks/results/quality_ndcg10.png

A picture of what the two quality tables of BENCHMARKS.md say: where each backbone stands
against SASRec under our protocol (leave-one-out, full ranking, exclude_seen), and how far
that is from what the papers report. Rows whose result file is missing are left out (and
named on stdout), so the plot can be redrawn while a campaign is still filling them in.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

# (label, result file). A refit result is drawn by its early-stopped phase
# ("metrics_before_refit"), the protocol of every other early-stopped row.
ROWS = {
    "ml-1m": [
        ("SASRec", "ml-1m_sasrec"),
        ("GRU4Rec", "ml-1m_gru4rec"),
        ("BERT4Rec", "ml-1m_bert4rec"),
        ("Mamba4Rec", "ml-1m_mamba4rec"),
        ("TTT4Rec", "ml-1m_ttt4rec"),
        ("LLaMA", "ml-1m_llama"),
        ("HSTU", "ml-1m_hstu-ce"),
        ("HSTU, ref. protocol", "ml-1m_hstu-101"),
        ("HSTU-large, ref. protocol", "ml-1m_hstu-large-101"),
    ],
    "amazon-beauty": [
        ("SASRec", "amazon-beauty_sasrec-cosine-refit"),
        ("GRU4Rec", "amazon-beauty_gru4rec"),
        ("BERT4Rec", "amazon-beauty_bert4rec"),
        ("Mamba4Rec", "amazon-beauty_mamba4rec"),
        ("TTT4Rec", "amazon-beauty_ttt4rec"),
        ("LLaMA", "amazon-beauty_llama"),
        ("HSTU", "amazon-beauty_hstu"),
        ("HSTU-large", "amazon-beauty_hstu-large"),
    ],
}

# Published NDCG@10. PCRec's Table 2 (../shared/references/003_*.txt, "6.1 Core Results"), read
# in row order from the extracted text (its TTT4Rec and HSTU labels share a line; the first of
# those two rows is taken as TTT4Rec's). The HSTU paper's own ML-1M figures are the issue's
# targets (HSTU 0.1720, HSTU-large 0.1893, both with timestamps).
PCREC = {
    "ml-1m": {"SASRec": 0.1592, "GRU4Rec": 0.1017, "BERT4Rec": 0.1579, "Mamba4Rec": 0.1713, "TTT4Rec": 0.1711,
              "LLaMA": 0.1623, "HSTU": 0.1564, "HSTU-large, ref. protocol": 0.1902},
    "amazon-beauty": {"SASRec": 0.0632, "GRU4Rec": 0.0510, "BERT4Rec": 0.0577, "Mamba4Rec": 0.0647, "TTT4Rec": 0.0649,
                      "LLaMA": 0.0642, "HSTU": 0.0649, "HSTU-large": 0.0667},
}
HSTU_PAPER = {"ml-1m": {"HSTU, ref. protocol": 0.1720, "HSTU-large, ref. protocol": 0.1893}}
TITLES = {"ml-1m": "MovieLens-1M", "amazon-beauty": "Amazon Beauty"}


def load_rows(dataset: str, results: Path) -> tuple[list[tuple[str, list[float]]], list[str]]:
    """[(label, per-seed NDCG@10)] for the rows whose file exists, and the missing files."""
    rows, missing = [], []
    for label, name in ROWS[dataset]:
        path = results / f"{name}.json"
        if not path.exists():
            missing.append(name)
            continue
        r = json.loads(path.read_text())
        rows.append((label, r.get("metrics_before_refit", r["metrics"])["ndcg@10"]["values"]))
    return rows, missing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=RESULTS / "quality_ndcg10.png")
    a = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(ROWS), figsize=(13, 5.6))
    for ax, dataset in zip(axes, ROWS):
        rows, missing = load_rows(dataset, a.results)
        if missing:
            print(f"{dataset}: no result yet for {', '.join(missing)}")
        y = np.arange(len(rows))[::-1]
        for yi, (label, vals) in zip(y, rows):
            v = np.asarray(vals)
            # points, not bars: the axis does not start at 0, and a bar's length would mislead
            ax.errorbar(v.mean(), yi, xerr=v.std() if len(v) > 1 else None, fmt="o", color="#4c72b0", ms=7,
                        capsize=4, label="perseq, mean ± std over seeds")
            ax.scatter(v, np.full(len(v), yi - 0.18), s=8, color="black", zorder=3, label="perseq, each seed")
            for src, marker, color, name in ((PCREC, "D", "#dd8452", "PCRec's Table 2"), (HSTU_PAPER, "*", "#c44e52", "HSTU paper")):
                pub = src.get(dataset, {}).get(label)
                if pub is not None:
                    ax.scatter([pub], [yi], marker=marker, s=60 if marker == "*" else 30, color=color, zorder=4, label=name)
        sas = dict(rows).get("SASRec")
        if sas is not None:
            ax.axvline(np.mean(sas), color="grey", ls=":", lw=1)
        ax.set_yticks(y, [label for label, _ in rows])
        ax.set_xlabel("test NDCG@10 (full ranking, exclude_seen)")
        ax.set_title(TITLES[dataset])
        lo = min(min(min(v) for _, v in rows), *PCREC[dataset].values())
        ax.set_xlim(lo * 0.9, None)
        ax.set_ylim(y[-1] - 0.6, y[0] + 0.6)
        ax.grid(alpha=0.3)
        handles = dict(zip(*reversed(ax.get_legend_handles_labels())))  # one entry per label
        ax.legend(handles.values(), handles.keys(), loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    fig.text(0.5, 0.01, "dotted line: our SASRec. Published figures come from other protocols (see BENCHMARKS.md).",
             ha="center", fontsize=8, color="grey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
