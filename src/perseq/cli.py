"""perseq command line: thin — parse arguments, call the library."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXAMPLES = """examples:
  perseq quickstart                                   synthetic data, SASRec + GRU4Rec, vs the Bayes-optimal ceiling
  perseq train --config configs/ml-1m/sasrec.yaml --seeds 0,1,2
  perseq train --set data.dataset=amazon-beauty --set model.name=sasrec --set data.max_len=50
  perseq evaluate runs/ml-1m-sasrec-s0 --breakdown
  perseq predict runs/ml-1m-sasrec-s0 --out top10.csv --k 10
  perseq data stats ml-1m
"""


def _add_config_args(p):
    p.add_argument("--config", "-c", help="YAML run config (sections: data, model, train, loss, eval)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, dotted, e.g. --set train.lr=3e-4 (repeatable)")


def _parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"error: --seeds expects comma-separated integers, got {text!r}")


def cmd_train(args) -> int:
    from .config import load_config
    from .data.loading import load_data
    from .data.sequences import make_split
    from .report import after_refit, summarize_seeds, write_benchmark_json
    from .train import fit, init_distributed_from_env

    init_distributed_from_env()
    cfg = load_config(args.config, args.overrides)
    t0 = time.perf_counter()
    data, gen = load_data(cfg.data)
    split = make_split(data, cfg.data.split)
    print(f"data {data.name}: {data.n_users} users, {data.n_items} items, {data.n_interactions} events "
          f"({time.perf_counter() - t0:.1f}s); split {split.kind}; model {cfg.model['name']}")
    seeds = _parse_seeds(args.seeds) or [cfg.train.seed]
    # a config file names its runs (two configs of one model must never share a folder)
    name = cfg.name or (f"{data.name}-{Path(args.config).stem}" if args.config else f"{data.name}-{cfg.model['name']}")
    results = []
    for seed in seeds:
        run_cfg = load_config(args.config, list(args.overrides) + [f"train.seed={seed}"])
        out = Path(args.out) / f"{name}-s{seed}"
        r = fit(run_cfg, split, out_dir=out, resume=args.resume, progress=None if not args.no_progress else False)
        r.pop("model_obj")
        results.append(r)
        only = r.get("refit", {}).get("only", False)
        note = f" (refit only: {r['refit']['epochs']} epochs on training + validation)" if only else ""
        print(f"seed {seed}: test{note} {_metrics_line(r['test'])}  -> {out}")
        if "refit" in r and not only:
            print(f"seed {seed}: test after refit {_metrics_line(r['refit']['test'])}")
    summary = {"test": summarize_seeds(results)["metrics"]}
    if all("refit" in r and not r["refit"].get("only") for r in results):
        summary["test_after_refit"] = summarize_seeds(after_refit(results))["metrics"]
    print(json.dumps(summary, indent=1))
    if args.bench_name:
        path = write_benchmark_json(args.bench_name, cfg, results)
        print(f"wrote {path}")
    return 0


def _metrics_line(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _rebuild_split(meta: dict):
    from .config import from_dict
    from .data.loading import load_data
    from .data.sequences import make_split

    cfg = from_dict(meta["run"])
    data, _ = load_data(cfg.data)
    return cfg, make_split(data, cfg.data.split)


def _check_vocab(items_ckpt, data) -> None:
    if len(items_ckpt) != len(data.item_ids) or (items_ckpt != data.item_ids.astype(str).astype(object)).any():
        raise SystemExit("error: the data's item vocabulary differs from the checkpoint's; was the data file changed?")


def cmd_evaluate(args) -> int:
    import dataclasses

    from .checkpoint import load_model
    from .config import parse_override
    from .evaluate import evaluate

    model, meta, items = load_model(args.run)
    cfg, split = _rebuild_split(meta)
    _check_vocab(items, split.data)
    ecfg = cfg.eval
    for o in args.overrides:
        k, v = parse_override(o)
        if not k.startswith("eval."):
            raise SystemExit(f"error: evaluate only takes eval.* overrides, got {k}")
        ecfg = dataclasses.replace(ecfg, **{k[5:]: tuple(v) if isinstance(v, list) else v})
    res = evaluate(model, split, args.stage, ecfg, breakdown=args.breakdown)
    print(json.dumps(res, indent=1))
    return 0


def cmd_predict(args) -> int:
    from .checkpoint import load_model
    from .predict import predict_topk

    model, meta, items = load_model(args.run)
    cfg, split = _rebuild_split(meta)
    _check_vocab(items, split.data)
    n = predict_topk(model, split, args.stage, args.k, args.out, exclude_seen=not args.include_seen)
    print(f"wrote top-{args.k} for {n} users to {args.out}")
    return 0


def cmd_data(args) -> int:
    from .config import DataConfig
    from .data.loading import load_data

    kw = {"dataset": args.dataset}
    if args.path:
        kw.update(dataset="file", path=args.path, format=args.format, times_path=args.times)
        if args.columns:
            try:
                kw["columns"] = dict(part.split("=", 1) for part in args.columns.split(","))
            except ValueError:
                raise SystemExit(f"error: --columns expects role=column pairs, e.g. user=userId,item=movieId; got {args.columns!r}")
    cfg = DataConfig(**kw, min_user=args.min_user, min_item=args.min_item, download=args.download)
    t0 = time.perf_counter()
    data, _ = load_data(cfg)
    secs = time.perf_counter() - t0
    if args.action == "prepare":
        from .data.registry import cache_dir

        out = Path(args.out) if args.out else cache_dir() / "prepared" / data.name
        data.save(out)
        print(f"prepared {data.name} in {secs:.2f}s -> {out}  (train with --set data.dataset={out})")
    print(json.dumps(data.stats(), indent=1))
    return 0


def cmd_quickstart(args) -> int:
    from .quickstart import run_quickstart

    run_quickstart(epochs=args.epochs, out=args.out)
    return 0


def cmd_bench(args) -> int:
    from .bench import collect, curves, epoch, scan, speed

    mains = {"speed": speed.main, "epoch": epoch.main, "scan": scan.main, "collect": collect.main, "curves": curves.main}
    mains[args.kind](args.rest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="perseq",
        description="Sequential recommendation: train, evaluate (full ranking) and predict.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (early stopping on validation, test once at the best epoch)")
    _add_config_args(p)
    p.add_argument("--out", default="runs", help="parent folder of the run folders (default: runs)")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (default: train.seed)")
    p.add_argument("--resume", action="store_true", help="continue interrupted runs found in the run folders")
    p.add_argument("--bench-name", help="also write benchmarks/results/<name>.json with mean ± std over seeds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a trained run folder")
    p.add_argument("run", help="run folder written by 'perseq train'")
    p.add_argument("--stage", choices=["test", "valid"], default="test")
    p.add_argument("--breakdown", action="store_true", help="also by head/tail target and history length")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="eval.KEY=VALUE",
                   help="override evaluation settings, e.g. --set eval.exclude_seen=false")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="write top-K recommendations per user as CSV (user_id,rank,item_id,score)")
    p.add_argument("run", help="run folder written by 'perseq train'")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--stage", choices=["test", "valid", "next"], default="test",
                   help="inputs: test (history before the test item), valid, or next (the whole history)")
    p.add_argument("--include-seen", action="store_true", help="allow items already in the history")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("data", help="prepare a dataset or print its statistics")
    p.add_argument("action", choices=["prepare", "stats"])
    p.add_argument("dataset", nargs="?", default="synthetic", help="registry name (ml-1m, ml-20m, ml-100k, amazon-beauty, amazon-sports, steam, yelp, ...) or 'synthetic'")
    p.add_argument("--path", help="read this file instead of a registry dataset")
    p.add_argument("--format", help="reader for --path (user-per-line, pairs, movielens, recbole, table, amazon-json)")
    p.add_argument("--times", help="timestamps file aligned with a user-per-line --path")
    p.add_argument("--columns", help="column mapping for --format table, e.g. user=userId,item=movieId,time=timestamp")
    p.add_argument("--min-user", type=int, default=0, help="k-core: minimum events per user")
    p.add_argument("--min-item", type=int, default=0, help="k-core: minimum events per item")
    p.add_argument("--out", help="output folder for 'prepare' (default: the cache dir)")
    p.add_argument("--download", action="store_true", help="download a registry dataset missing from the cache")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("bench", help="benchmarks: 'speed' (vs sequence length, all backbones), 'epoch' (one training epoch), "
                       "'scan' (Mamba's selective scan alone), 'collect' (runs of several seeds -> benchmarks/results/<name>.json), "
                       "'curves' (validation metric per epoch and per training minute of run folders -> PNG + CSV)",
                       description="perseq bench speed|epoch|scan|collect|curves [--help]")
    p.add_argument("kind", choices=["speed", "epoch", "scan", "collect", "curves"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of that benchmark (see its --help)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("quickstart", help="train on embedded synthetic data and compare with the Bayes-optimal ceiling")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--out", default="runs/quickstart")
    p.set_defaults(func=cmd_quickstart)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        # user errors (bad config, malformed data, missing files): one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
