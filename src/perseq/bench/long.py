"""Long-history comparison of trained runs (issue 26): all users and the long-history
subset, with ``exclude_seen`` on and off, seeds averaged, 95% bootstrap intervals.

    perseq bench long --variant full=runs/ml-1m-sasrec-full1024-s0,runs/ml-1m-sasrec-full1024-s1 \\
        --variant recent=runs/ml-1m-sasrec-recent128-s0,... --variant persrec=runs/... \\
        --min-history 512 --name ml-1m_sasrec_long

Each run is evaluated at the test stage through its model's own scoring path (PerSRec's is
compress-then-recommend). ``exclude_seen`` masks the same set for every variant: the user's
whole known history, whatever part of it the model reads. The long-history subset is the
users whose known history before the test event is longer than ``--min-history`` events
(P + R for PerSRec). Per variant and setting: the mean over seeds ± their std, and for the
subset also a 95% bootstrap interval over users of the seed-averaged per-user metric.
Writes ``benchmarks/results/<name>.json`` and prints a markdown table.

Per-user files: the three variants × three seeds of a comparison can take longer to train
than a machine keeps its scratch space. ``--export RUN ...`` writes each finished run's
per-user test metrics (both ``exclude_seen`` settings, with the users and their history
lengths; about 100 KB) to ``--per-user-dir`` as ``<run folder name>.npz``, to be committed
beside the result files. A comparison reads a run from that file when the file is newer than
the run's results.json or the folder is gone, else evaluates the folder (and writes the file):

    perseq bench long --export runs/ml-1m-sasrec+persrec-s0      # right after it trains
    perseq bench long --variant persrec=runs/ml-1m-sasrec+persrec-s0,... --min-history 512 --name ...
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from ..metrics import per_user_metrics
from ..models.base import ScoringWrapper
from ..personalize.compare import bootstrap_ci
from ..report import write_result_file

METRICS = ("ndcg@10", "hr@10")


PER_USER_DIR = "benchmarks/results/per_user"
SETTINGS = {True: "exclude_seen", False: "seen_kept"}


def _evaluate(run: str) -> dict:
    """One run at the test stage, both ``exclude_seen`` settings: {"users", "hist_len",
    "<setting>/<metric>": per-user values (users sorted)} and the run's config as "meta"."""
    from ..checkpoint import load_model
    from ..cli import _check_vocab, _rebuild_split
    from ..evaluate import rank_targets

    model, meta, items = load_model(run)
    cfg, split = _rebuild_split(meta)
    _check_vocab(items, split.data)
    out = {}
    for excl, setting in SETTINGS.items():
        ecfg = dataclasses.replace(cfg.eval, exclude_seen=excl)
        ranks, users, hist_len, _ = rank_targets(model, split, "test", ecfg)
        per = per_user_metrics(ranks, ecfg.ks)
        order = np.argsort(users)
        out |= {"users": users[order], "hist_len": hist_len[order], **{f"{setting}/{m}": per[m].numpy()[order] for m in METRICS}}
    out["meta"] = np.array(json.dumps({"run": str(run), "config": meta.get("run"), "commit": meta.get("commit")}))
    return out


def per_user(run: str, per_user_dir: str | None = PER_USER_DIR) -> dict:
    """A run's per-user arrays: read from ``per_user_dir/<folder name>.npz`` when its folder
    is gone or the file was written after the run's results.json (an export right after
    training: the run is not evaluated twice), else evaluated from its folder and written there."""
    cached = None if per_user_dir is None else Path(per_user_dir) / f"{Path(run).name}.npz"
    done = Path(run, "results.json")
    fresh = cached is not None and cached.exists() and done.exists() and cached.stat().st_mtime > done.stat().st_mtime
    if Path(run).exists() and not fresh:
        arrays = _evaluate(run)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(cached, **arrays)
        return arrays
    if cached is not None and cached.exists():
        with np.load(cached) as z:
            return {k: z[k] for k in z.files}
    raise SystemExit(f"error: {run} does not exist, and there is no per-user file {cached} to read it from")


def compare(variants: dict[str, list[str]], min_history: int, n_boot: int = 2000, per_user_dir: str | None = None) -> dict:
    out = {}
    for name, runs in variants.items():
        out[name] = {}
        arrays = {run: per_user(run, per_user_dir) for run in runs}
        for excl in (True, False):
            per_seed, users0, hl0 = [], None, None
            for run in runs:
                a = arrays[run]
                users, hl, per = a["users"], a["hist_len"], {m: a[f"{SETTINGS[excl]}/{m}"] for m in METRICS}
                if users0 is not None and not np.array_equal(users, users0):
                    raise ValueError(f"{run} scores other users than {runs[0]}")
                users0, hl0 = users, hl
                per_seed.append(per)
            long = hl0 > min_history
            row = {"n_users": int(len(users0)), "n_long": int(long.sum())}
            for m in METRICS:
                alls = np.array([p[m].mean() for p in per_seed])
                longs = np.array([p[m][long].mean() for p in per_seed])
                avg = np.mean([p[m] for p in per_seed], 0)  # per user, over seeds
                row[m] = {"mean": float(alls.mean()), "std": float(alls.std(ddof=1)) if len(alls) > 1 else 0.0,
                          "values": alls.tolist()}
                row[f"long_{m}"] = {"mean": float(longs.mean()), "std": float(longs.std(ddof=1)) if len(longs) > 1 else 0.0,
                                    "values": longs.tolist(), "ci95": list(bootstrap_ci(avg[long], n_boot))}
            out[name][SETTINGS[excl]] = row
    return out


def markdown(result: dict, reference: str) -> str:
    lines = ["| variant | setting | NDCG@10 all | NDCG@10 long (95% CI) | HR@10 all | HR@10 long | vs " + reference + " (all) |",
             "|---|---|---|---|---|---|---|"]
    for name, settings in result.items():
        for setting, r in settings.items():
            ref = result[reference][setting]["ndcg@10"]["mean"]
            lo, hi = r["long_ndcg@10"]["ci95"]
            lines.append(f"| {name} | {setting} | {r['ndcg@10']['mean']:.4f} ± {r['ndcg@10']['std']:.4f} | "
                         f"{r['long_ndcg@10']['mean']:.4f} ({lo:.4f}–{hi:.4f}) | {r['hr@10']['mean']:.4f} | "
                         f"{r['long_hr@10']['mean']:.4f} | {r['ndcg@10']['mean'] / ref:.3f}× |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="perseq bench long", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", metavar="NAME=RUN[,RUN...]",
                    help="a variant and its run folders (one per seed); the first is the reference")
    ap.add_argument("--min-history", type=int, help="the long-history subset: known history longer than this")
    ap.add_argument("--name", help="writes benchmarks/results/<name>.json")
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--per-user-dir", default=PER_USER_DIR,
                    help="where each run's per-user metrics are kept (<run folder name>.npz): written for every run "
                         "folder evaluated, read for a run whose folder is gone or whose file is newer than its results.json "
                         "(default %(default)s)")
    ap.add_argument("--export", nargs="+", metavar="RUN", help="only write these finished runs' per-user files")
    a = ap.parse_args(argv)
    if a.export:
        for run in a.export:
            if not Path(run, "results.json").exists():
                raise SystemExit(f"error: {run} has no results.json (unfinished run?)")
            per_user(run, a.per_user_dir)
            print(f"wrote {Path(a.per_user_dir) / Path(run).name}.npz")
        return
    if not (a.variant and a.min_history is not None and a.name):
        ap.error("a comparison needs --variant (at least one), --min-history and --name; or use --export RUN ...")
    variants = {}
    for v in a.variant:
        name, sep, runs = v.partition("=")
        if not sep or not runs:
            raise SystemExit(f"--variant {v!r}: expected NAME=RUN[,RUN...]")
        variants[name] = runs.split(",")
    result = compare(variants, a.min_history, per_user_dir=a.per_user_dir)
    table = markdown(result, next(iter(variants)))
    print(table)
    write_result_file(f"{a.out_dir}/{a.name}.json", {"benchmark": "long_history", "min_history": a.min_history,
                                                      "runs": variants, "variants": result, "table": table})


# -- drift: PerSRec over a user's whole history, folded in as it would be when serving -----

DRIFT_DOC = """Drift of PerSRec's cache over many folds (issue 26).

    perseq bench drift runs/ml-1m-sasrec+persrec-s0 --name ml-1m_sasrec+persrec_drift

Scores the test event of every user three ways: ``window``, the trained layout (the last
P + R events: the run's own evaluation); ``chained``, the whole known history compressed in
segments of P events, then the last R events; ``folds``, serving from an empty cache with the
history appended ``fold`` events at a time (the model's ``fold``), so every event older than
the recent part reached the cache through a fold of ``fold`` events. Reports all users and the users with
more than P + R known events. Writes ``benchmarks/results/<name>.json``.
"""


class _WholeHistory(ScoringWrapper):
    """A PerSRec model scoring from a user's whole history (up to ``max_history`` events),
    chained in P-event segments or folded in ``fold`` events at a time."""

    def __init__(self, model, mode: str, max_history: int):
        super().__init__(model)
        self.mode, self.fold, self.max_history = mode, model.fold, max_history

    @property
    def max_input_len(self) -> int:
        return self.max_history

    def scores(self, items, lengths, times=None, target_time=None):
        import torch

        m = self.model
        with torch.no_grad():
            if self.mode == "chained":
                n_rec = lengths.clamp(max=m.R)
                n_hist = lengths - n_rec
                t = torch.arange(items.shape[1])[None]
                hist = torch.where(t < n_hist[:, None], items, 0)[:, : max(1, int(n_hist.max()))]
                j = torch.arange(m.R)[None]
                recent = torch.where(j < n_rec[:, None], items.gather(1, (n_hist[:, None] + j).clamp(max=items.shape[1] - 1)), 0)
                h = m.recommend_hidden(m.compress(hist), recent)
            else:  # folds: from an empty cache, `fold` events per append
                cache, recent = m.compress(items[:, :0]), items[:, :0]
                for s in range(0, items.shape[1], self.fold):
                    cache, recent = m.append(cache, recent, items[:, s : s + self.fold])
                h = m.recommend_hidden(cache, recent)
            s = h @ m.output_embeddings().T
        s[:, 0] = float("-inf")
        return s


def drift(run: str, max_history: int) -> dict:
    from ..checkpoint import load_model
    from ..cli import _check_vocab, _rebuild_split
    from ..evaluate import rank_targets

    model, meta, items = load_model(run)
    if not hasattr(model, "append"):
        raise SystemExit(f"{run} is not a PerSRec run (model {meta.get('run', {}).get('model', {}).get('name')})")
    cfg, split = _rebuild_split(meta)
    _check_vocab(items, split.data)
    model.eval()
    long_from = model.P * model.cfg.segments + model.R
    out = {"P": model.P, "K": model.K, "R": model.R, "fold": model.fold, "long_history": long_from}
    for mode in ("window", "chained", "folds"):
        scorer = model if mode == "window" else _WholeHistory(model, mode, max_history)
        ranks, users, hl, _ = rank_targets(scorer, split, "test", cfg.eval)
        per = per_user_metrics(ranks, cfg.eval.ks)
        long = hl > long_from
        out[mode] = {"n_users": int(len(users)), "n_long": int(long.sum()),
                     **{m: float(per[m].mean()) for m in METRICS}, **{f"long_{m}": float(per[m][long].mean()) for m in METRICS}}
        print(f"{mode:8s} " + "  ".join(f"{k} {v:.4f}" for k, v in out[mode].items() if isinstance(v, float)), flush=True)
    return out


def drift_main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="perseq bench drift", description=DRIFT_DOC,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a trained PerSRec run folder")
    ap.add_argument("--max-history", type=int, default=4096, help="longest known history read (events)")
    ap.add_argument("--name", required=True, help="writes benchmarks/results/<name>.json")
    ap.add_argument("--out-dir", default="benchmarks/results")
    a = ap.parse_args(argv)
    result = drift(a.run, a.max_history)
    write_result_file(f"{a.out_dir}/{a.name}.json", {"benchmark": "persrec_drift", "run": a.run, **result})
