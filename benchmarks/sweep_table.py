"""One tuning sweep's table, chosen on validation: for each run folder, its best validation
NDCG@10 (from trainer_state.json, epochs or federated rounds), the epoch or round it was
reached, and its test NDCG@10 (results.json, the best validation checkpoint's); the winner
is the run with the best validation score. Writes the rows as JSON and prints a markdown table.

    python benchmarks/sweep_table.py --out benchmarks/results/ml-1m_pcrec_sweep.json \\
        base=runs/ml-1m-pcrec-s0 f-tanh=runs/ml-1m-pcrec-f-tanh-s0 ...
    python benchmarks/sweep_table.py --upto 240 --out benchmarks/results/ml-1m_pfsr_sweep.json \\
        fedavg=runs/ml-1m-mamba4rec-fedavg-s0 base=runs/ml-1m-pfsr-sweep-base-s0 ...

``--upto N`` reads each curve up to epoch/round N only (a screening budget: a full-budget
reference run read at the sweep's budget) and then leaves the test column empty, since the
test score belongs to the whole run's best checkpoint. ``--reference NAME`` names rows that
are shown but never win (e.g. FedAvg beside PFSR's variants). Missing or unfinished runs are
listed as such, so the table can be drawn while the sweep is running.

A row may also be a single-seed result file (``NAME=benchmarks/results/<name>.json``) of a
federated run, whose ``valid_curve`` stands in for the run folder's history: a finished
run whose folder is gone still has its place in the table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

METRIC = "ndcg@10"


def curve(run: Path) -> list[tuple[int, float]]:
    """[(epoch or round, validation NDCG@10)] of a run folder."""
    hist = json.loads((run / "trainer_state.json").read_text())["history"]
    return [(h.get("round", h.get("epoch")), h["valid"][METRIC]) for h in hist if "valid" in h]


def file_row(name: str, path: Path, upto: int | None) -> dict:
    """A row from a finished single-seed federated result file."""
    f = json.loads(path.read_text())
    if len(f["seeds"]) != 1 or "federated_runs" not in f:
        raise SystemExit(f"{path}: a row from a result file needs one seed of a federated run (its valid_curve)")
    points = [(t, m[METRIC]) for t, m in f["federated_runs"][0]["valid_curve"] if upto is None or t <= upto]
    if not points:
        return {"name": name, "run": str(path), "status": "no validation yet"}
    at, best = max(points, key=lambda p: p[1])
    test = f["metrics"][METRIC]["values"][0] if upto is None else None
    return {"name": name, "run": str(path), "status": "finished", "valid": best, "at": at, "test": test}


def row(name: str, run: Path, upto: int | None) -> dict:
    if run.suffix == ".json" and run.is_file():
        return file_row(name, run, upto)
    if not (run / "trainer_state.json").exists():
        return {"name": name, "run": str(run), "status": "missing"}
    full = curve(run)
    points = [(t, v) for t, v in full if upto is None or t <= upto]
    if not points:
        return {"name": name, "run": str(run), "status": "no validation yet"}
    at, best = max(points, key=lambda p: p[1])
    done = (run / "results.json").exists()
    test = None
    if done and upto is None:
        test = json.loads((run / "results.json").read_text())["test"][METRIC]
    return {"name": name, "run": str(run), "status": "finished" if done else f"running (at {full[-1][0]})",
            "valid": best, "at": at, "test": test}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="NAME=RUN_FOLDER, the base first")
    ap.add_argument("--upto", type=int, help="read every curve up to this epoch/round (a screening budget)")
    ap.add_argument("--reference", action="append", default=[], help="a NAME shown for comparison that cannot win")
    ap.add_argument("--out", required=True, help="JSON file of the rows")
    a = ap.parse_args(argv)
    rows = [row(n, Path(p), a.upto) for n, p in (r.split("=", 1) for r in a.runs)]
    candidates = [r for r in rows if "valid" in r and r["name"] not in a.reference]
    winner = max(candidates, key=lambda r: r["valid"])["name"] if candidates else None
    base = next((r.get("valid") for r in rows if r["name"] not in a.reference), None)  # the first candidate
    print(f"| run | validation {METRIC} (at) | vs base | test {METRIC} | status |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        if "valid" not in r:
            print(f"| {r['name']} | | | | {r['status']} |")
            continue
        rel = f"{r['valid'] / base:.3f}×" if base else ""
        test = f"{r['test']:.4f}" if r.get("test") is not None else ""
        mark = "**" if r["name"] == winner else ""
        print(f"| {mark}{r['name']}{mark} | {r['valid']:.4f} ({r['at']}) | {rel} | {test} | {r['status']} |")
    Path(a.out).write_text(json.dumps({"metric": METRIC, "upto": a.upto, "winner": winner, "reference": a.reference,
                                       "rows": rows}, indent=1) + "\n")
    print(f"winner on validation: {winner}; wrote {a.out}")


if __name__ == "__main__":
    main()
