"""perseq command line: thin — parse arguments, call the library."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

EXAMPLES = """examples:
  perseq quickstart                                   synthetic data, SASRec + GRU4Rec, vs the Bayes-optimal ceiling
  perseq models                                       the models, one line each
  perseq config show --config configs/ml-1m/sasrec.yaml   every setting, its value, default and meaning
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


def _add_adapt_args(p) -> None:
    g = p.add_argument_group("per-user adaptation (PCRec-simple)")
    g.add_argument("--adapt", action="store_true",
                   help="adapt the model to each user's own history before scoring, with the choice 'perseq adapt' "
                        "stored in the run folder (adapt.json)")
    g.add_argument("--adapt-steps", type=int, help="S: optimizer steps per user (overrides the stored choice)")
    g.add_argument("--adapt-lr", type=float, help="β: their learning rate (overrides the stored choice)")
    g.add_argument("--adapt-scope", help="which parameters adapt: all | last_block | norms | bias | lora:<r>")
    g.add_argument("--adapt-optimizer", choices=["sgd", "adam"])
    g.add_argument("--adapt-objective", choices=["ce", "kl"],
                   help="ce: next-item CE over the catalogue (default); kl: the authors' KL over embedding dimensions")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _parse_seeds(text: str | None) -> list[int] | None:
    return None if text is None else _number_list(text, int, "--seeds", "integers such as 0,1,2")


def _number_list(text: str, kind, flag: str, what: str = "numbers") -> list:
    """'1,3' -> [1, 3] (``kind`` per item); anything else is one line naming ``flag``."""
    try:
        vals = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals:
        raise ValueError(f"{flag} expects comma-separated {what}; got {text!r}")
    return vals


def run_folder_base(cfg, cfg_file, config_path: str | None, data_label: str) -> str:
    """The run folder's name before ``-s<seed>``. ``name`` (the config's, or ``--name``) is
    used as given. Otherwise: ``<data>-<config file stem>`` (or ``<data>-<model>`` without a
    file), plus a 6-hex hash of the settings ``--set`` changed, so two runs that differ in
    config never share a folder. Settings ``--resume`` may change (threads, device, epochs,
    patience, checkpoint_minutes, refit, eval.monitor_test) and the seed leave the name alone."""
    import hashlib

    from .train import RESUMABLE_CHANGES

    if cfg.name:
        return cfg.name
    base = f"{data_label}-{Path(config_path).stem}" if config_path else f"{data_label}-{cfg.model['name']}"
    now, given = _flat(json.loads(cfg.to_json())), _flat(json.loads(cfg_file.to_json()))
    free = {".".join(k) for k in RESUMABLE_CHANGES} | {"train.seed"}
    changed = sorted((k, now.get(k)) for k in set(now) | set(given) if k not in free and now.get(k) != given.get(k))
    if not changed:
        return base
    return f"{base}-{hashlib.sha256(json.dumps(changed, default=str).encode()).hexdigest()[:6]}"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "synthetic" and k != "columns":
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _data_label(dc) -> str:
    """The data's short name in run folders, from a resolved DataConfig: a registry name as
    is, a data file or prepared folder by its stem."""
    from .data.registry import DATASETS

    if dc.dataset == "file":
        return Path(dc.path).stem
    return dc.dataset if dc.dataset in DATASETS or dc.dataset == "synthetic" else Path(dc.dataset).stem


def cmd_train(args) -> int:
    from .config import load_config
    from .checkpoint import read_json
    from .data.loading import check_fingerprint, data_fingerprint, load_data, resolve_data_config
    from .data.synthetic import bayes_ceilings
    from .data.sequences import make_split
    from .models.registry import check_params
    from .report import after_refit, summarize_seeds, write_benchmark_json
    from .train import fit, init_distributed_from_env, prepare_run_folder

    # everything that can be wrong with the arguments is reported before the data loads
    seeds = _parse_seeds(args.seeds)
    cfg_file = load_config(args.config, [])
    overrides = list(args.overrides) + ([f"name={args.name}"] if args.name else [])
    cfg = load_config(args.config, overrides)
    check_params(cfg.model["name"], {k: v for k, v in cfg.model.items() if k != "name"})
    data_cfg = resolve_data_config(cfg.data)  # paths absolute, so evaluate/predict work from any directory
    name = run_folder_base(cfg, cfg_file, args.config, _data_label(data_cfg))
    cfg = dataclasses.replace(cfg, data=data_cfg)
    seeds = seeds or [cfg.train.seed]
    outs = {seed: Path(args.out) / f"{name}-s{seed}" for seed in seeds}
    for out in outs.values():
        prepare_run_folder(out, args.resume, args.overwrite, dry_run=True)
        if args.resume and (out / "config.json").exists():  # resuming on other data would mix two runs
            check_fingerprint(cfg.data, read_json(out, "config.json").get("data_fingerprint"))

    init_distributed_from_env()
    t0 = time.perf_counter()
    data, gen = load_data(cfg.data)
    split = make_split(data, cfg.data.split)
    fingerprint = data_fingerprint(cfg.data)
    print(f"data {data.name}: {data.n_users} users, {data.n_items} items, {data.n_interactions} events "
          f"({time.perf_counter() - t0:.1f}s); split {split.kind}; model {cfg.model['name']}")
    ceilings = bayes_ceilings(gen, data, split, cfg.eval.exclude_seen) if gen is not None else {}
    for name, c in ceilings.items():
        print(f"Bayes-optimal ceiling, {name}: {_metrics_line(c)}")
    results = []
    for seed, out in outs.items():
        run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
        print(f"seed {seed}: run folder {out}")
        if getattr(args, "federated", False):
            from .federated.simulate import simulate

            r = simulate(run_cfg, split, out_dir=out, resume=args.resume, overwrite=args.overwrite,
                         extra_meta={"data_fingerprint": fingerprint})
        else:
            r = fit(run_cfg, split, out_dir=out, resume=args.resume, overwrite=args.overwrite,
                    progress=None if not args.no_progress else False, extra_meta={"data_fingerprint": fingerprint})
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
        path = write_benchmark_json(args.bench_name, cfg, results, extra={"bayes_ceiling": ceilings} if ceilings else None)
        print(f"wrote {path}")
    return 0


def _metrics_line(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _rebuild_split(meta: dict):
    """The run's data and split, from its config.json; the data is checked against the
    fingerprint the run recorded, so a moved or changed file is named, not mis-scored."""
    from .config import from_dict
    from .data.loading import check_fingerprint, load_data
    from .data.sequences import make_split

    cfg = from_dict(meta["run"])
    check_fingerprint(cfg.data, meta.get("data_fingerprint"))
    data, _ = load_data(cfg.data)
    return cfg, make_split(data, cfg.data.split)


def _check_vocab(items_ckpt, data) -> None:
    if len(items_ckpt) != len(data.item_ids) or (items_ckpt != data.item_ids.astype(str).astype(object)).any():
        raise ValueError("the data's item vocabulary differs from the run's (vocab/items.parquet): "
                         "the data file was changed since training")


def _adapted(model, args, run: str, cfg):
    """The model, or with ``--adapt``/``--adapt-*`` the model under PCRec-simple: the choice
    ``perseq adapt`` stored in the run folder, with any ``--adapt-*`` flag overriding it."""
    given = {k: getattr(args, f"adapt_{k}") for k in ("steps", "lr", "scope", "optimizer", "objective")}
    given = {k: v for k, v in given.items() if v is not None}
    if not args.adapt and not given:
        return model
    from .personalize import AdaptConfig, Personalized
    from .personalize.sweep import load_choice

    if getattr(model, "wants_users", False):
        # PCRec-simple adapts one shared model per user; a federated run's users each have
        # their own personal parameters, which the adaptation would have to start from
        raise ValueError(f"{run} scores each user with their own personal parameters (a federated run): "
                         "--adapt does not combine with them yet; evaluate or predict it without --adapt")
    stored = load_choice(run)
    if stored is None and not {"steps", "lr"} <= set(given):
        raise ValueError(f"{run} has no stored adaptation (adapt.json): choose one on validation with "
                         f"'perseq adapt {run}', or give --adapt-steps and --adapt-lr")
    base = stored.to_dict() if stored is not None else {"temperature": cfg.loss.temperature}
    chosen = AdaptConfig(**{**base, **given})
    print(f"PCRec-simple: steps {chosen.steps}, lr {chosen.lr:g}, scope {chosen.scope}, {chosen.optimizer}, "
          f"{chosen.objective} ({'stored in adapt.json' if stored is not None and not given else 'as given'})",
          file=sys.stderr)
    return Personalized(model, chosen)


def cmd_adapt(args) -> int:
    from .checkpoint import load_model
    from .personalize import AdaptConfig, Personalized
    from .personalize.compare import paired
    from .personalize.sweep import adopt, grid, save_choice, stored_sweep, sweep, write_benchmark

    if args.bench_name and not args.test:
        raise ValueError("--bench-name writes the paired test comparison: add --test")
    if args.bench_name:  # a result row compares finished runs (a run still training has no results.json)
        unfinished = [r for r in args.runs if not (Path(r) / "results.json").exists()]
        if unfinished:
            raise ValueError(f"--bench-name needs finished runs; no results.json in {', '.join(unfinished)}")
    result = None
    for i, run in enumerate(args.runs):
        model, meta, items = load_model(run)
        cfg, split = _rebuild_split(meta)
        _check_vocab(items, split.data)
        if result is None:  # the first run: the grid on its validation event
            configs = grid(_number_list(args.steps, int, "--steps", "integers"), _number_list(args.lr, float, "--lr"),
                           args.scope.split(","), args.optimizer, args.objective,
                           cfg.loss.temperature if args.temperature is None else args.temperature, args.users_per_batch)
            result = stored_sweep(run, configs)  # the same grid already run there: reuse it
            if result is None:
                result = sweep(model, split, cfg.eval, configs, log=print)
            else:
                print(f"{run}: reusing the validation grid stored in its adapt.json")
            this = result
        else:  # the others take the first run's choice unchanged
            this = adopt(result, args.runs[0])
        if args.test:
            # the choice is made on validation; the test only measures it, paired per user
            this["test_paired"] = t = paired(model, Personalized(model, AdaptConfig(**this["choice"])), split, "test", cfg.eval)
            g = t["gain"]
            print(f"{run}: test {g['metric']}: plain {t['plain'][g['metric']]:.4f}, adapted {t['adapted'][g['metric']]:.4f}, "
                  f"gain {g['mean']:+.4f} (95% CI {g['ci95'][0]:+.4f} .. {g['ci95'][1]:+.4f}, {t['n_users']} users)")
        path = save_choice(run, this)
        if i == 0:
            c = result["choice"]
            verdict = (f"steps {c['steps']}, lr {c['lr']:g}, scope {c['scope']}" if result["improves"]
                       else "no adaptation (none of the grid beat the unadapted model on validation)")
            print(f"chosen on validation: {verdict} -> {path}")
        else:
            print(f"{run}: the same choice -> {path}")
    if args.bench_name:
        print(f"wrote {write_benchmark(args.runs, args.bench_name)}")
    return 0


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
        try:
            ecfg = dataclasses.replace(ecfg, **{k[5:]: tuple(v) if isinstance(v, list) else v})
        except TypeError:
            raise ValueError(f"unknown evaluation setting {k}; valid: "
                             f"{', '.join('eval.' + f.name for f in dataclasses.fields(ecfg))}") from None
    from .federated.personal import with_personal

    model = with_personal(model, args.run, meta, split.data.n_users)  # a federated run: each user's own personal.*
    res = evaluate(_adapted(model, args, args.run, cfg), split, args.stage, ecfg, breakdown=args.breakdown)
    print(json.dumps(res, indent=1))
    return 0


def cmd_predict(args) -> int:
    from .checkpoint import load_model
    from .predict import predict_topk

    model, meta, items = load_model(args.run)
    if args.k > len(items) - 1:
        raise ValueError(f"--k {args.k} is more than the run's catalogue of {len(items) - 1} items")
    cfg, split = _rebuild_split(meta)
    _check_vocab(items, split.data)
    from .federated.personal import with_personal

    model = with_personal(model, args.run, meta, split.data.n_users)  # a federated run: each user's own personal.*
    n = predict_topk(_adapted(model, args, args.run, cfg), split, args.stage, args.k, args.out, exclude_seen=not args.include_seen)
    print(f"wrote top-{args.k} for {n} users to {args.out}")
    return 0


def cmd_data(args) -> int:
    from .config import DataConfig
    from .data.loading import load_data

    columns = None
    if args.columns:
        pairs = [part.split("=", 1) for part in args.columns.split(",") if part.strip()]
        if any(len(pr) != 2 or not pr[0].strip() or not pr[1].strip() for pr in pairs):
            raise ValueError(f"--columns expects role=column pairs, e.g. user=userId,item=movieId,time=timestamp; "
                             f"got {args.columns!r}")
        columns = {k.strip(): v.strip() for k, v in pairs}
    # --kcore N is min_user = min_item = N; an explicit --min-user/--min-item wins for its side
    min_user = args.min_user if args.min_user is not None else (args.kcore or 0)
    min_item = args.min_item if args.min_item is not None else (args.kcore or 0)
    cfg = DataConfig(dataset="file" if args.path else args.dataset, path=args.path, format=args.format,
                     times_path=args.times, columns=columns, on_error="skip" if args.skip_bad_lines else "raise",
                     min_rating=args.min_rating, min_user=min_user, min_item=min_item, dedup=args.dedup,
                     download=args.download)
    t0 = time.perf_counter()
    data, _ = load_data(cfg)
    secs = time.perf_counter() - t0
    if args.action == "prepare":
        from .data.registry import cache_dir

        out = (Path(args.out) if args.out else cache_dir() / "prepared" / data.name).expanduser().absolute()
        data.save(out)
        print(f"prepared {data.name} in {secs:.2f}s -> {out}  (train with --set data.dataset={out})")
    print(json.dumps(data.stats(), indent=1))
    return 0


def cmd_quickstart(args) -> int:
    from .quickstart import DEMOS

    DEMOS[args.method](epochs=args.epochs, out=args.out)
    return 0


def cmd_config(args) -> int:
    from .config import describe, load_config

    cfg = load_config(args.config, args.overrides)
    rows = describe(cfg)
    if args.section:
        sections = sorted({key.split(".")[0] for key, *_ in rows})
        if args.section not in sections:
            raise ValueError(f"no config section {args.section!r}; the sections are {', '.join(sections)}")
        rows = [r for r in rows if r[0].split(".")[0] == args.section]
    for key, value, default, help_ in rows:
        mark = "" if value == default or (isinstance(value, tuple) and list(value) == default) else f"   (default {default!r})"
        print(f"{key} = {json.dumps(value, default=str)}{mark}")
        if help_:
            print(f"    {help_}")
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from .checkpoint import load_model

    load_model(args.run)  # a bad run folder is a clear error here, not in every worker
    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            raise ValueError(f"--token-env {args.token_env}: that environment variable is empty or unset")
    os.environ.update({"PERSEQ_SERVE_RUN": args.run, "PERSEQ_SERVE_STORE": args.store, "PERSEQ_SERVE_TOKEN": token or "",
                       "PERSEQ_SERVE_UNKNOWN": args.unknown_items, "PERSEQ_SERVE_THREADS": str(args.threads),
                       "PERSEQ_SERVE_DURABILITY": args.durability, "PERSEQ_SERVE_STEP": args.step})
    print(f"serving {args.run} on http://{args.host}:{args.port} ({args.workers} worker(s), state in {args.store})",
          file=sys.stderr)
    metrics_dir = None
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        import tempfile

        # /metrics sums every worker's counts (app.py); the folder lives as long as the server
        metrics_dir = tempfile.TemporaryDirectory(prefix="perseq-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir.name
    uvicorn.run("perseq.serve.app:app_from_env", factory=True, host=args.host, port=args.port, workers=args.workers,
                timeout_graceful_shutdown=30, log_level="warning")
    return 0


def cmd_export(args) -> int:
    from .serve.export import export_onnx

    info = export_onnx(args.run, args.onnx, args.user)
    mine = f" + {args.user or 'default'}'s personal parameters" if "personal" in info else ""
    print(f"wrote {args.onnx} ({info['model']}: item{mine} + {len(info['state_shapes'])} state tensors -> scores + new state) "
          f"and {Path(args.onnx).with_suffix('.json')}", file=sys.stderr)
    return 0


def cmd_models(args) -> int:
    from .models.registry import describe_models

    rows = describe_models()
    width = max(len(n) for n, _ in rows)
    for name, line in rows:
        print(f"{name:<{width}}  {line}")
    return 0


def cmd_bench(args) -> int:
    from .bench import adapt, collect, curves, epoch, federated, leakage, long, persrec, scan, serve, speed

    mains = {"speed": speed.main, "epoch": epoch.main, "scan": scan.main, "collect": collect.main, "curves": curves.main,
             "adapt": adapt.main, "federated": federated.main,
             "leakage": leakage.main, "persrec": persrec.main, "long": long.main,
             "drift": long.drift_main, "serve": serve.main}
    mains[args.kind](args.rest)
    return 0


def _add_run_args(p) -> None:
    """The arguments of a training command (train, federated simulate)."""
    _add_config_args(p)
    p.add_argument("--out", default="runs", help="parent folder of the run folders (default: runs)")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (default: train.seed)")
    p.add_argument("--resume", action="store_true",
                   help="continue the runs in their folders (an interrupted run goes on where its last checkpoint "
                        "left it; a finished one is evaluated again). Settings that may change on resuming: "
                        "train.threads, device, epochs, patience, checkpoint_minutes, refit, eval.monitor_test")
    p.add_argument("--overwrite", action="store_true", help="delete a run already in the folder and train from scratch")
    p.add_argument("--name", help="run folder name (the folder is <out>/<name>-s<seed>); default: <data>-<config stem "
                                  "or model>, plus a short hash of the settings --set changed")
    p.add_argument("--bench-name", help="also write benchmarks/results/<name>.json with mean ± std over seeds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="perseq",
        description="Sequential recommendation: train, evaluate (full ranking) and predict.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (early stopping on validation, test once at the best epoch)")
    _add_run_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("federated", help="federated training: 'simulate' runs clients and server in one process",
                       description="Federated training of the config's model under its 'federated' section (rounds, "
                                   "clients per round, local epochs, aggregator, server optimizer, dropout, client-level "
                                   "DP; 'perseq config show federated' lists them). 'simulate' runs every client and the "
                                   "server in this process, one round at a time; the run folder resumes after a kill and "
                                   "is read by 'perseq evaluate' and 'predict' like any other. Raw events never leave a "
                                   "simulated client: only weight updates, the target count and the loss do.")
    p.add_argument("action", choices=["simulate"], help="simulate: the in-process simulator")
    _add_run_args(p)
    p.set_defaults(func=cmd_train, federated=True)

    p = sub.add_parser("evaluate", help="evaluate a trained run folder")
    p.add_argument("run", help="run folder written by 'perseq train'")
    p.add_argument("--stage", choices=["test", "valid"], default="test",
                   help="test (default): each user's last event, ranked from the history before it; valid: the one before")
    p.add_argument("--breakdown", action="store_true", help="also by head/tail target and history length")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="eval.KEY=VALUE",
                   help="override evaluation settings, e.g. --set eval.exclude_seen=false")
    _add_adapt_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="write top-K recommendations per user as CSV (user_id,rank,item_id,score)",
                       description="Top-K recommendations per user, with raw item ids, as CSV (user_id,rank,item_id,score).")
    p.add_argument("run", help="run folder written by 'perseq train'")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--k", type=_positive_int, default=10, help="recommendations per user (default 10)")
    p.add_argument("--stage", choices=["next", "test", "valid"], default="next",
                   help="which history to recommend from. next (default): each user's whole history, i.e. what to "
                        "recommend now; test: the history before the held-out test event (what evaluate scores); "
                        "valid: the history before the validation event")
    p.add_argument("--include-seen", action="store_true", help="allow items already in the history")
    _add_adapt_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("adapt", help="choose PCRec-simple's steps, rate and scope for a run on validation",
                       description="Per-user adaptation at inference (PCRec-simple): evaluate the run's validation "
                                   "stage without adaptation and for every steps x lr x scope of the grid, print the "
                                   "table, and store the best (or 'no adaptation' when nothing beats it) in the run "
                                   "folder as adapt.json, which 'evaluate --adapt' and 'predict --adapt' use. The test "
                                   "event plays no part. More run folders (other seeds) take the first one's choice: "
                                   "tune on one seed, confirm on three, e.g. 'perseq adapt runs/ml-1m-hstu-s0 "
                                   "runs/ml-1m-hstu-s1 runs/ml-1m-hstu-s2 --scope last_block --test --bench-name "
                                   "ml-1m_hstu+pcrec-simple'.")
    p.add_argument("runs", nargs="+", metavar="run",
                   help="run folder(s) written by 'perseq train': the grid runs on the first; the others (e.g. its "
                        "other seeds) take the first one's choice unchanged")
    p.add_argument("--steps", default="1,3", help="comma-separated step counts S (default 1,3)")
    p.add_argument("--lr", default="0.0001,0.001,0.01",
                   help="comma-separated learning rates β (default 0.0001,0.001,0.01; a model trained with a "
                        "logit temperature τ has gradients 1/τ times larger, so it wants smaller rates)")
    p.add_argument("--scope", default="all", help="comma-separated scopes: all, last_block, norms, bias, lora:<r> (default all)")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    p.add_argument("--objective", default="ce", choices=["ce", "kl"])
    p.add_argument("--temperature", type=float, help="CE logit temperature (default: the run's loss.temperature)")
    p.add_argument("--users-per-batch", type=int, default=64, help="users adapted at once (memory)")
    p.add_argument("--test", action="store_true",
                   help="after choosing, also score the test event with and without the choice, paired per user "
                        "(mean gain with a 95%% bootstrap interval), stored in adapt.json as test_paired")
    p.add_argument("--bench-name", help="with --test: also write benchmarks/results/<name>.json (plain vs adapted "
                                        "over the runs' seeds, each seed's paired gain, the grid, the protocol)")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("data", help="prepare a dataset or print its statistics",
                       description="Read a dataset, filter it, and print its statistics ('stats') or also save it as a "
                       "prepared folder ('prepare') that training reads with --set data.dataset=FOLDER. Filters run in "
                       "this order: --min-rating, --dedup, then the k-core.")
    p.add_argument("action", choices=["prepare", "stats"], help="stats: print statistics; prepare: also save the result to --out")
    p.add_argument("dataset", nargs="?", default="synthetic",
                   help="first match wins: a registry name (ml-1m, ml-20m, ml-100k, amazon-beauty, amazon-sports, steam, yelp, "
                   "..., or 'synthetic'), a folder written by 'perseq data prepare', or a data file (format guessed) "
                   "(default: synthetic)")
    p.add_argument("--path", help="read this data file (the same as giving it as DATASET)")
    p.add_argument("--format", help="reader for the file, instead of guessing it: user-per-line, pairs, movielens, "
                   "recbole, table, amazon-json")
    p.add_argument("--times", help="timestamps file aligned token for token with a user-per-line file")
    p.add_argument("--columns", metavar="ROLE=COL,...",
                   help="column mapping of a table, e.g. user=userId,item=movieId,time=timestamp,rating=rating (default: "
                   "guessed from the header: user/userId/user_id, item/itemId/movieId/product_id/asin, time/timestamp/date, ...)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed lines and report how many, instead of stopping at the first (data.on_error=skip)")
    p.add_argument("--dedup", action="store_true",
                   help="keep only the earliest event of each (user, item) pair; without it, repeated pairs are kept and counted")
    p.add_argument("--min-rating", type=float, metavar="X",
                   help="keep only events rated X or more (MovieLens, RecBole, Amazon JSON 'overall', tables with a rating column)")
    p.add_argument("--kcore", type=int, metavar="N",
                   help="k-core: repeatedly drop users and items with fewer than N events (sets --min-user and --min-item)")
    p.add_argument("--min-user", type=int, metavar="N", help="k-core: minimum events per user (overrides --kcore for users)")
    p.add_argument("--min-item", type=int, metavar="N", help="k-core: minimum events per item (overrides --kcore for items)")
    p.add_argument("--out", help="output folder for 'prepare' (default: <cache dir>/prepared/<name>)")
    p.add_argument("--download", action="store_true", help="download a registry dataset missing from the cache")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("bench", help="benchmarks: 'speed' (vs sequence length, all backbones), 'epoch' (one training epoch), "
                       "'scan' (Mamba's selective scan alone), 'collect' (runs of several seeds -> benchmarks/results/<name>.json), "
                       "'curves' (validation metric per epoch and per training minute of run folders -> PNG + CSV), "
                       "'adapt' (PCRec-simple's cost: plain, batched and one-user-at-a-time scoring), "
                       "'federated' (seconds per round and peak memory of the simulator's engines and of Flower), "
                       "'leakage' (how many of a client's items its update, the SecAgg+ sum or the DP release gives away), "
                       "'persrec' (one request's cost against history length: PerSRec's cache vs re-encoding, KV cache, "
                       "recent-only, Mamba's step), 'long' (trained runs on all users and on the long-history subset, "
                       "exclude_seen on and off, bootstrap intervals), 'drift' (a PerSRec run scored from the whole "
                       "history, chained or folded in as when serving), 'serve' (perseq serve's latency and throughput "
                       "under wrk)",
                       description="perseq bench speed|epoch|scan|collect|curves|adapt|federated|leakage|persrec|long|drift|serve "
                                   "[--help]")
    p.add_argument("kind", choices=["speed", "epoch", "scan", "collect", "curves", "adapt", "federated", "leakage", "persrec",
                                    "long", "drift", "serve"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of that benchmark (see its --help)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("config", help="show every setting with its value, default and meaning",
                       description="perseq config show [SECTION] [--config F] [--set K=V ...]: every key a run config "
                                   "takes, its value (from F and --set, else the default), and what it means. The model "
                                   "section lists the keys of model.name's model.")
    p.add_argument("action", choices=["show"])
    p.add_argument("section", nargs="?", help="only this section: data, model, train, loss, eval or federated")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("serve", help="serve a run folder over HTTP: per-user incremental state, durable store",
                       description="A recommendation service for a trained run folder (FastAPI + uvicorn). Endpoints: "
                                   "POST /v1/recommend, POST /v1/users/{id}/events?k=, GET /v1/users/{id}/recommendations, "
                                   "DELETE /v1/users/{id}, /healthz, /readyz, /metrics, /docs. See README 'Serving'.")
    p.add_argument("run", help="run folder written by 'perseq train'")
    p.add_argument("--store", default="perseq-state.sqlite",
                   help="where users' events and states live: a SQLite file (default perseq-state.sqlite; created if "
                        "missing) or redis://host:port/db for replicas on several machines")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=_positive_int, default=1, help="uvicorn worker processes sharing the store")
    p.add_argument("--threads", type=_positive_int, default=1, help="torch threads per worker")
    p.add_argument("--token-env", help="name of an environment variable holding a bearer token every /v1 call must carry")
    p.add_argument("--unknown-items", choices=["ignore", "reject"], default="ignore",
                   help="item ids the model does not know: ignore (skip and list them; default) or reject (422)")
    p.add_argument("--durability", choices=["process", "power"], default="process",
                   help="what an acknowledged event survives: process (default; a crash or kill -9 of the server: "
                        "SQLite synchronous=NORMAL) or power (also a power loss: synchronous=FULL, an fsync per request)")
    p.add_argument("--step", choices=["auto", "torch", "onnx"], default="auto",
                   help="how GRU4Rec/Mamba4Rec/PFSR states advance: onnx (onnxruntime, ~7x less time per event), torch "
                        "(the reference step), auto (default: onnx when onnxruntime is installed); other models use torch")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="export a recurrent model's incremental step for on-device inference (ONNX)",
                       description="Write the step (item, state) -> (scores, new state) of a GRU4Rec, Mamba4Rec or PFSR "
                                   "run as an ONNX graph, and <out>.json with the state's shapes and the item ids in "
                                   "score order (PFSR: the graph also takes the user's personal parameters).")
    p.add_argument("run", help="run folder written by 'perseq train' or 'perseq federated simulate'")
    p.add_argument("--onnx", required=True, help="the .onnx file to write")
    p.add_argument("--user", help="PFSR: the raw user id whose personal parameters go into <out>.json (default: "
                                  "none, the model's own: the identity response)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("models", help="list the models (model.name values) with one line each")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("quickstart", help="train on embedded synthetic data and compare with the Bayes-optimal ceiling",
                       description="A demo on the embedded synthetic data (no download): about 35 s on 2 idle CPU cores.")
    # one demo per method, by name (perseq.quickstart.DEMOS; kept here too so --help needs no torch import)
    p.add_argument("method", nargs="?", default="baselines", choices=["baselines", "pcrec", "federated"],
                   help="which demo (default: baselines: SASRec and GRU4Rec vs the Bayes-optimal ceiling; "
                        "pcrec: HSTU, HSTU + PCRec-simple and PCRec; federated: Mamba4Rec centralized, FedAvg "
                        "and PFSR, one user per client)")
    p.add_argument("--epochs", type=int, default=None,
                   help="cap on epochs per model (default 100; early stopping ends both models near 20)")
    p.add_argument("--out", default="runs/quickstart",
                   help="parent of the models' run folders, replaced on every quickstart (default: runs/quickstart)")
    p.set_defaults(func=cmd_quickstart)
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse matches positionals in one block, so `config show --config F model` would leave
    # the section over: take it here; anything else left over is the usual error
    if extra and getattr(args, "func", None) is cmd_config and args.section is None and len(extra) == 1 \
            and not extra[0].startswith("-"):
        args.section, extra = extra[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from .train import TrainingInterrupted  # after parsing: --help and argument errors need no torch
    # line by line even into a file or pipe (nohup, CI): progress must show as it happens
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        # user errors (bad config, malformed data, damaged run files): one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        again = "the same command plus --resume" if args.command == "train" else "the same command"
        print(f"{e}; continue with {again}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside training (loading, testing)
        print("interrupted" + ("; the last checkpoint stands: continue with --resume" if args.command == "train" else ""),
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # `perseq config show | head`: the reader left, nothing is wrong
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
