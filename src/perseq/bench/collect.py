"""Aggregate finished runs (one per seed, possibly trained in separate processes) into a
benchmark result file ``benchmarks/results/<name>.json`` with mean ± std.

    perseq bench collect --name ml-1m_sasrec runs/bench/ml-1m-sasrec-s0 runs/bench/ml-1m-sasrec-s1 ...

Seeds whose run folders are gone (trained on another machine, or in a session whose
scratch space was wiped) can come from an earlier result file of the same configuration:

    perseq bench collect --name ml-1m_pcrec-x --earlier benchmarks/results/ml-1m_pcrec-x.json runs/ml-1m-pcrec-x-s1 ...

Each of its seeds counts as one run: its test metrics, best epoch, epoch seconds and
hardware are taken from the file. Its breakdown is already a mean over its seeds, so it is
given to each of them, which keeps the overall mean exact.
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
    ap.add_argument("--earlier", action="append", default=[], metavar="FILE",
                    help="a result file (benchmarks/results/<name>.json) of the same configuration whose seeds are "
                         "added to the runs'; may be repeated")
    a = ap.parse_args(argv)
    results, cfgs = [], []
    for f in a.earlier:
        rs, c = _earlier_seeds(Path(f))
        results += rs
        cfgs += [c] * len(rs)
    for r in a.runs:
        d = Path(r)
        if not (d / "results.json").exists():
            raise SystemExit(f"error: {d} has no results.json (unfinished run?)")
        results.append(json.loads((d / "results.json").read_text()))
        cfgs.append(comparable_config(json.loads((d / "config.json").read_text())["run"]))
    seeds = [r["seed"] for r in results]
    if len(set(seeds)) < len(seeds):
        raise SystemExit(f"error: a seed appears twice among the inputs ({seeds}); each seed may be counted once")
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


def _earlier_seeds(path: Path) -> tuple[list[dict], dict]:
    """The per-seed results recorded in a benchmark result file, in the form of a run's
    results.json as far as collecting needs it, and the file's config (seed and threads out)."""
    if not path.exists():
        raise SystemExit(f"error: {path} does not exist")
    f = json.loads(path.read_text())
    if f.get("protocol", {}).get("refit"):
        raise SystemExit(f"error: {path} is a refit result; its early-stopped phase's records are not in it, so it "
                         "cannot be merged from the file")
    seeds = f["seeds"]
    results = [{"seed": s, "model": f["model"],
                "test": {**{k: v["values"][i] for k, v in f["metrics"].items()}, "breakdown": f.get("breakdown", {})},
                "best_epoch": f["best_epochs"][i], "epoch_seconds": f["epoch_seconds"], "hardware": f["hardware"]}
               for i, s in enumerate(seeds)]
    if "federated" in f["protocol"]:  # a federated seed: its rounds, seconds, privacy and validation curve
        proto = f["protocol"]["federated"]
        for r, fr in zip(results, f["federated_runs"]):
            r["federated"] = {**proto, "rounds": fr["rounds"],
                              "passes": fr["rounds"] * proto["local_epochs"] * proto["clients_per_round"] / proto["clients"],
                              **({"privacy": fr["privacy"]} if "privacy" in fr else {})}
            r |= {"train_seconds": fr["train_seconds"], "wall_seconds": fr["wall_seconds"],
                  "history": [{"round": t, "valid": m} for t, m in fr["valid_curve"]]}
    return results, comparable_config(f["config"])


def comparable_config(cfg: dict) -> dict:
    """A run's config as seeds of one row must share it: without the seed and the thread count
    (an execution detail, not a hyper-parameter), through from_dict so that a config written
    before a section or key existed compares as its default."""
    return from_dict({**cfg, "train": {k: v for k, v in cfg["train"].items() if k not in ("seed", "threads")}}).to_dict()
