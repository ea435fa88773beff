"""Aggregating runs over seeds and writing benchmark result files
(``benchmarks/results/<run>.json``, the format every benchmark row uses)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import numpy as np

METRIC_KEYS = ("ndcg@10", "hr@10", "ndcg@50", "hr@50", "mrr")


def after_refit(results: list[dict]) -> list[dict]:
    """The per-seed results with the refitted models' test metrics as ``test``."""
    return [{**r, "test": r["refit"]["test"]} for r in results]


def summarize_seeds(results: list[dict], stage: str = "test") -> dict:
    """Mean and sample standard deviation (ddof=1; 0 for one seed) of every metric."""
    keys = [k for k, v in results[0][stage].items() if isinstance(v, float)]
    metrics = {}
    for k in keys:
        vals = np.array([r[stage][k] for r in results], dtype=float)
        metrics[k] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0, "values": vals.tolist()}
    return {"metrics": metrics, "seeds": [r["seed"] for r in results]}


def mean_breakdown(results: list[dict]) -> dict:
    """Test metrics by head/tail target and history-length bucket, averaged over seeds."""
    groups = results[0]["test"].get("breakdown", {})
    out = {}
    for g, first in groups.items():
        runs = [r["test"]["breakdown"][g] for r in results if g in r["test"].get("breakdown", {})]
        out[g] = {"n_users": first["n_users"], **{k: float(np.mean([x[k] for x in runs])) for k in first if k != "n_users"}}
    return out


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_name(device=None) -> str:
    """What produced a number, as every result file and benchmark row names it: the GPU's
    name, or the CPU's with its core count and torch's thread count (the setting that
    decides CPU timings)."""
    import torch  # lazy: report is imported by light-weight tools too

    if device is not None and torch.device(device).type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    return f"CPU: {cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def git_commit() -> str:
    """HEAD's short hash in the working directory, with "+dirty" when tracked files differ
    from it: a number measured on uncommitted code (or on a copied tree whose git metadata
    is older than its files) does not claim a commit it did not run."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if changed.strip() else "")


def hardware_of(results: list[dict]) -> str:
    """Every machine/thread setting that trained any of the seeds, in order of first use (a
    run's own ``hardware`` is already "A + B" when it was resumed under another setting)."""
    return " + ".join(dict.fromkeys(h for r in results for h in r["hardware"].split(" + ")))


def _persrec_protocol(cfg) -> dict:
    """{"persrec": {P, K, R, segments}} for a model in PerSRec form, else {}."""
    from .models.registry import model_class

    params = {k: v for k, v in cfg.model.items() if k != "name"}
    mcls = model_class(cfg.model["name"]).Config
    if not hasattr(mcls, "persrec_sizes"):
        return {}
    mc = mcls(n_items=1, **{"max_len": cfg.data.max_len, **params})
    P, K, R = mc.persrec_sizes()
    return {"persrec": {"P": P, "K": K, "R": R, "segments": mc.segments}}


def write_benchmark_json(run: str, cfg, results: list[dict], out_dir: str | Path = "benchmarks/results", extra: dict | None = None) -> Path:
    """With ``train.refit`` the headline metrics are the refitted models' (protocol
    ``refit: true``) and the early-stopped models' test metrics stay under
    ``metrics_before_refit``; refit-only runs (``train.refit_epochs``) have no
    early-stopped models, and the protocol names their fixed epoch count."""
    # refit-only is read from the results: a refit-only run folder's config.json holds the
    # config its single phase trained under (training + validation events, refit off)
    only = [bool(r.get("refit", {}).get("only")) for r in results]
    if len(set(only)) > 1:
        raise ValueError("some runs are refit-only (train.refit_epochs) and some are not: they are two protocols")
    only = only[0]
    refit = only or bool(getattr(cfg.train, "refit", False))
    if refit and not all("refit" in r for r in results):
        raise ValueError("train.refit is on but some runs have no refit results (unfinished?)")
    headline = after_refit(results) if refit else results
    s = summarize_seeds(headline)
    payload = {
        "run": run,
        "dataset": cfg.data.dataset,
        "model": results[0].get("model", cfg.model["name"]),  # a federated run names its method: mamba4rec+fedavg
        "protocol": {
            "split": cfg.data.split,
            "ranking": "full",
            "exclude_seen": cfg.eval.exclude_seen,
            "max_len": cfg.data.max_len,
            "train_windows": cfg.data.windows,
            "loss": cfg.loss.name,
            "refit": refit,
            **({"refit_epochs": results[0]["refit"]["epochs"]} if only else {}),
            **({"federated": {k: v for k, v in results[0]["federated"].items() if k != "privacy"}}
               if "federated" in results[0] else {}),
            **_persrec_protocol(cfg),
        },
        "seeds": s["seeds"],
        "metrics": s["metrics"],
        **({"metrics_before_refit": summarize_seeds(results)["metrics"]} if refit and not only else {}),
        "best_epochs": [r["best_epoch"] for r in results],
        "epoch_seconds": float(np.mean([r["epoch_seconds"] for r in results if r.get("epoch_seconds")])),
        "hardware": hardware_of(results),
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
        "breakdown": mean_breakdown(headline),
        **({"federated_runs": [federated_run_summary(r) for r in results]} if "federated" in results[0] else {}),
        "config": cfg.to_dict(),
        **(extra or {}),
    }
    p = Path(out_dir) / f"{run}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=1))
    return p


def write_result_file(path: str | Path, result: dict) -> None:
    """A benchmark's JSON result at ``path`` (its folder made), stamped with the commit,
    the hardware (as ``hardware_name`` sees this process's threads) and the date, and named on stderr."""
    import sys
    import time

    result |= {"hardware": hardware_name("cpu"), "commit": git_commit(), "date": time.strftime("%Y-%m-%d")}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def federated_run_summary(result: dict) -> dict:
    """A federated seed's cost and curve for a benchmark file: the seconds of its rounds
    (training, and with their validation), the privacy spent, and the validation metric
    after every evaluated round."""
    curve = [[h["round"], {k: v for k, v in h["valid"].items() if k in ("ndcg@10", "hr@10")}]
             for h in result.get("history", []) if "valid" in h]
    return {"seed": result.get("seed"), "rounds": result["federated"]["rounds"],
            "train_seconds": result.get("train_seconds"), "wall_seconds": result.get("wall_seconds"),
            **({"privacy": result["federated"]["privacy"]} if "privacy" in result["federated"] else {}),
            "valid_curve": curve}


def markdown_table(rows: list[dict], keys=METRIC_KEYS) -> str:
    """rows: {"name": str, metric: float or {"mean", "std"}} -> a markdown table."""
    head = "| | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys) + "\n"
    lines = []
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            if isinstance(v, dict):
                cells.append(f"{v['mean']:.4f} ± {v['std']:.4f}")
            elif v is None:
                cells.append("")
            else:
                cells.append(f"{v:.4f}")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines)
