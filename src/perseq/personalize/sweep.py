"""Choosing PCRec-simple's β, S and scope for a trained run, on validation only.

``perseq adapt RUN`` evaluates the run's validation stage (leave-one-out: each user's
second-to-last event, ranked from the history before it) without adaptation and under
every configuration of a small grid, writes the table, and stores the best configuration
in the run folder as ``adapt.json``. ``perseq evaluate|predict RUN --adapt`` and the
serving layer then use that stored choice. The test event plays no part in the choice.
When no configuration beats the unadapted model on validation, the stored choice is "no
adaptation" (steps 0), and ``--adapt`` changes nothing: that is what validation says.
A comparison under the reference protocol (no validation split) uses the choice made
here, under the standard one, unchanged.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

from ..checkpoint import commit, read_json
from ..config import from_dict
from ..report import mean_breakdown, summarize_seeds, write_benchmark_json
from ..evaluate import EvalConfig, evaluate
from .simple import AdaptConfig, Personalized

CHOICE_FILE = "adapt.json"


def grid(steps, lrs, scopes, optimizer: str = "sgd", objective: str = "ce", temperature: float = 1.0,
         users_per_batch: int = 64) -> list[AdaptConfig]:
    """Every combination of ``steps`` × ``lrs`` × ``scopes``, as AdaptConfigs."""
    return [AdaptConfig(steps=s, lr=lr, scope=sc, optimizer=optimizer, objective=objective, temperature=temperature,
                        users_per_batch=users_per_batch)
            for s, lr, sc in itertools.product(steps, lrs, scopes)]


def sweep(model, split, eval_cfg: EvalConfig, configs: list[AdaptConfig], log=print) -> dict:
    """Validation metrics without adaptation and under each of ``configs``; the best by
    ``eval_cfg.metric`` (the unadapted model included) is the choice."""
    metric = eval_cfg.metric
    base = evaluate(model, split, "valid", eval_cfg)
    rows = [{"adapt": None, **_metrics(base)}]
    log(f"no adaptation: valid {metric} {base[metric]:.4f}")
    for c in configs:
        r = evaluate(Personalized(model, c), split, "valid", eval_cfg)
        rows.append({"adapt": c.to_dict(), **_metrics(r)})
        log(f"steps {c.steps} lr {c.lr:g} scope {c.scope} {c.optimizer} {c.objective}: valid {metric} {r[metric]:.4f} "
            f"({r[metric] - base[metric]:+.4f})")
    best = max(rows, key=lambda r: r[metric])  # the first of equals: no adaptation wins ties
    # no configuration beat the unadapted model: store "no adaptation" (steps 0)
    choice = best["adapt"] or (AdaptConfig(steps=0) if not configs else configs[0]).to_dict() | {"steps": 0}
    return {"metric": metric, "stage": "valid", "split": split.kind, "exclude_seen": eval_cfg.exclude_seen,
            "choice": choice, "improves": best["adapt"] is not None, "rows": rows}


def _metrics(result: dict) -> dict:
    return {k: v for k, v in result.items() if isinstance(v, float)}


def save_choice(run_dir: str | Path, result: dict) -> Path:
    run_dir = Path(run_dir)
    commit(run_dir, {CHOICE_FILE: lambda p: p.write_text(json.dumps(result, indent=1))})
    return run_dir / CHOICE_FILE


def load_choice(run_dir: str | Path) -> AdaptConfig | None:
    """The configuration ``perseq adapt`` stored for this run, or None when it has none."""
    run_dir = Path(run_dir)
    if not (run_dir / CHOICE_FILE).exists():
        return None
    return AdaptConfig(**read_json(run_dir, CHOICE_FILE)["choice"])


def stored_sweep(run_dir: str | Path, configs: list[AdaptConfig]) -> dict | None:
    """The run's stored ``sweep`` result when it ran exactly ``configs`` (so that tuning on
    one seed, then confirming on the others, does not run the grid twice), else None."""
    run_dir = Path(run_dir)
    if not (run_dir / CHOICE_FILE).exists():
        return None
    stored = read_json(run_dir, CHOICE_FILE)
    if "tuned_on" in stored or [r["adapt"] for r in stored["rows"][1:]] != [c.to_dict() for c in configs]:
        return None
    return {k: v for k, v in stored.items() if k != "test_paired"}


def adopt(result: dict, tuned_on: str | Path) -> dict:
    """Another run's ``sweep`` result as this run's choice (tune on one seed, apply to the
    others): the same choice, with where it was made instead of a grid of this run's own."""
    return {**{k: v for k, v in result.items() if k not in ("rows", "test_paired")}, "rows": [],
            "tuned_on": str(tuned_on)}


def write_benchmark(run_dirs, name: str, out_dir: str | Path = "benchmarks/results") -> Path:
    """benchmarks/results/<name>.json from run folders (seeds of one config) with
    results.json and adapt.json (with ``test_paired``): the adapted model's test metrics as
    ``metrics`` (mean ± std over seeds, as every result file), the backbone's on the same
    checkpoints as ``backbone_metrics``, each seed's paired gain with its interval, the
    breakdowns, the validation grid of the tuning run, and the protocol."""
    run_dirs = [Path(d) for d in run_dirs]
    results, plain, gains, cfgs, choices = [], [], [], [], []
    for d in run_dirs:
        res, adapt = read_json(d, "results.json"), read_json(d, CHOICE_FILE)
        if "test_paired" not in adapt:
            raise ValueError(f"{d / CHOICE_FILE} has no test_paired: run 'perseq adapt {d} --test' first")
        t = adapt["test_paired"]
        results.append({**res, "test": t["adapted"]})
        plain.append({**res, "test": t["plain"]})
        gains.append({"seed": res["seed"], **t["gain"]})
        choices.append(adapt["choice"])
        run = read_json(d, "config.json")["run"]
        run["train"].pop("seed", None)
        run["train"].pop("threads", None)
        cfgs.append({k: v for k, v in from_dict(run).to_dict().items() if k != "federated"})  # predated keys: defaults
    if any(c != cfgs[0] for c in cfgs) or any(c != choices[0] for c in choices):
        raise ValueError("the runs differ in more than the seed, or in their adaptation choice: refusing to average them")
    first = read_json(run_dirs[0], CHOICE_FILE)
    cfg = from_dict(cfgs[0])
    return write_benchmark_json(name, cfg, results, out_dir, extra={
        "model": f"{cfg.model['name']}+pcrec-simple",
        "backbone": cfg.model["name"],
        "protocol": {"split": cfg.data.split, "ranking": "full", "exclude_seen": cfg.eval.exclude_seen,
                     "max_len": cfg.data.max_len, "train_windows": cfg.data.windows, "loss": cfg.loss.name,
                     "refit": False,
                     "selection": "backbone: early stopping on validation; adaptation: grid on the first seed's "
                                  "validation event, applied unchanged to the other seeds"},
        "backbone_metrics": summarize_seeds(plain)["metrics"],
        "backbone_breakdown": mean_breakdown(plain),
        "paired_gains": gains,
        "choice": choices[0],
        "tuned_on": str(run_dirs[0]),
        "validation_grid": first["rows"],
    })
