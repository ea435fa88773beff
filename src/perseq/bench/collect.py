"""Aggregate finished runs (one per seed, possibly trained in separate processes) into a
benchmark result file ``benchmarks/results/<name>.json`` with mean ± std.

    perseq bench collect --name ml-1m_sasrec runs/bench/ml-1m-sasrec-s0 runs/bench/ml-1m-sasrec-s1 ...
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import from_dict
from ..report import write_benchmark_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="perseq bench collect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders with results.json")
    ap.add_argument("--name", required=True, help="result name: benchmarks/results/<name>.json")
    ap.add_argument("--out-dir", default="benchmarks/results")
    a = ap.parse_args(argv)
    results, cfgs = [], []
    for r in a.runs:
        d = Path(r)
        if not (d / "results.json").exists():
            raise SystemExit(f"error: {d} has no results.json (unfinished run?)")
        results.append(json.loads((d / "results.json").read_text()))
        meta = json.loads((d / "config.json").read_text())["run"]
        meta["train"].pop("seed", None)
        meta["train"].pop("threads", None)  # execution detail, not a hyper-parameter
        # through from_dict: a folder written before a section or key existed compares as its default
        cfgs.append(from_dict(meta).to_dict())
    if not any("federated" in r for r in results):  # centralized runs read no federated setting
        for c in cfgs:
            c.pop("federated")
    if any(c != cfgs[0] for c in cfgs):
        raise SystemExit("error: the runs differ in more than the seed; refusing to average them")
    cfg = from_dict(cfgs[0])
    extra = None
    if cfg.data.dataset == "synthetic":  # the data's own ceilings, next to the rows
        from ..data.loading import load_data
        from ..data.sequences import make_split
        from ..data.synthetic import bayes_ceilings

        data, gen = load_data(cfg.data)
        extra = {"bayes_ceiling": bayes_ceilings(gen, data, make_split(data, cfg.data.split), cfg.eval.exclude_seen)}
    path = write_benchmark_json(a.name, cfg, results, a.out_dir, extra)
    s = json.loads(path.read_text())
    print(f"wrote {path}: " + "  ".join(f"{k} {v['mean']:.4f}±{v['std']:.4f}" for k, v in s["metrics"].items()))
    return 0
