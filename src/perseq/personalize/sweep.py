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


def write_benchmark(run_dir: str | Path, name: str, out_dir: str | Path = "benchmarks/results") -> Path:
    """benchmarks/results/<name>.json from a run folder's results.json and adapt.json (with
    its ``test_paired``): the backbone's and the adapted model's test metrics on the same
    checkpoint, the paired gain with its interval, the validation grid, and the protocol."""
    run_dir = Path(run_dir)
    res, adapt = read_json(run_dir, "results.json"), read_json(run_dir, CHOICE_FILE)
    if "test_paired" not in adapt:
        raise ValueError(f"{run_dir / CHOICE_FILE} has no test_paired: run 'perseq adapt {run_dir} --test' first")
    run = read_json(run_dir, "config.json")["run"]
    t = adapt["test_paired"]
    record = {
        "run": name,
        "dataset": res["dataset"],
        "model": f"{res['model']}+pcrec-simple",
        "backbone": res["model"],
        "seed": res["seed"],
        "protocol": {"split": run["data"]["split"], "ranking": "full", "exclude_seen": t["exclude_seen"],
                     "max_len": run["data"]["max_len"], "loss": run["loss"]["name"], "refit": False,
                     "selection": "backbone: early stopping on validation; adaptation: grid on validation"},
        "best_epoch": res["best_epoch"],
        "choice": adapt["choice"],
        "test_plain": t["plain"],
        "test_adapted": t["adapted"],
        "gain": t["gain"],
        "n_users": t["n_users"],
        "validation_grid": adapt["rows"],
        "hardware": res.get("hardware"),
    }
    out = Path(out_dir) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    return out
