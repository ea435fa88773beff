"""Run a set of configs × seeds as a queue of `perseq train` processes, a few at a time,
collecting each config into benchmarks/results/<dataset>_<config>.json as soon as all its seeds
have finished (not only at the end: a long campaign leaves finished rows behind as it goes).

    python benchmarks/campaign.py --jobs 2 --threads 1 --seeds 0,1,2 \\
        configs/ml-1m/gru4rec.yaml configs/ml-1m/bert4rec.yaml

Every run goes to runs/bench/<dataset>-<config>-s<seed> with --resume, so a campaign that
was stopped (or a session that ended) continues where each run was: finished runs only
re-read their results. One log per run under logs/. On the 2-core CPU machine, two
one-thread runs at a time is the best throughput; on a GPU use --jobs 1 --threads 0 (automatic)
(torch's default).

--order rows finishes each config's seeds before the next config (complete table rows
early); --order seeds runs every config's seed 0 first (an early look at every model).

Each finished run's results.json and config.json are also kept under --keep
(benchmarks/results/seeds/<run>/, a few KB, committed): a session whose checkout starts
without runs/ restores those instead of training the seed again, so a 3-seed row can be
completed over several sessions. The collected row then averages exactly the files the
runs wrote.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def run_name(config: Path) -> tuple[str, str]:
    """(run-folder stem, result name) as `perseq train` names them: <dataset>-<config stem>."""
    from perseq.config import load_config

    cfg = load_config(str(config), [])
    stem = cfg.name or f"{cfg.data.dataset}-{config.stem}"
    return stem, f"{cfg.data.dataset}_{config.stem}"


KEPT_FILES = ("results.json", "config.json")


def _copy_kept(src: Path, dst: Path) -> None:
    """Copy a run's result files (not its checkpoints) from src to dst."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in KEPT_FILES:
        shutil.copy2(src / f, dst / f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+", type=Path)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="threads per run; 0 = automatic, the cores not busy (perseq/runtime.py) (default 1)")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--logs", default="logs")
    ap.add_argument("--results", default="benchmarks/results", help="where collected result files go")
    ap.add_argument("--keep", default="benchmarks/results/seeds",
                    help="where each finished run's results.json + config.json are kept and restored from ('' = off)")
    ap.add_argument("--order", choices=["rows", "seeds"], default="rows")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override for every run (note: resuming refuses runs trained under other settings)")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    for c in a.configs:
        if not c.exists():
            raise SystemExit(f"error: no config {c}")
    names = {c: run_name(c) for c in a.configs}
    jobs = [(c, s) for c in a.configs for s in seeds] if a.order == "rows" else [(c, s) for s in seeds for c in a.configs]
    Path(a.logs).mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    failed, collected = [], set()

    def collect_if_complete(c):
        stem, result = names[c]
        dirs = [str(Path(a.out) / f"{stem}-s{s}") for s in seeds]
        if c not in collected and all((Path(d) / "results.json").exists() for d in dirs):
            collected.add(c)
            subprocess.run([sys.executable, "-m", "perseq.cli", "bench", "collect", "--name", result,
                            "--out-dir", a.results, *dirs], check=False)

    def run(job):
        c, s = job
        stem = names[c][0]
        log = Path(a.logs) / f"{stem}-s{s}.log"
        run_dir, kept = Path(a.out) / f"{stem}-s{s}", Path(a.keep) / f"{stem}-s{s}" if a.keep else None
        if kept is not None and not (run_dir / "results.json").exists() and (kept / "results.json").exists():
            # Restore a seed finished in an earlier session rather than train it again.
            _copy_kept(kept, run_dir)
            with lock:
                print(f"[{time.strftime('%H:%M:%S')}] restored {stem}-s{s} from {kept}", flush=True)
                collect_if_complete(c)
            return
        # the campaign names its runs (and result rows) by config: its --set overrides apply to
        # every config alike, so they are part of the campaign, not of one run's name
        cmd = [sys.executable, "-m", "perseq.cli", "train", "--config", str(c), "--seeds", str(s), "--out", a.out,
               "--name", stem, "--resume", "--no-progress"]
        if a.threads:
            cmd += ["--set", f"train.threads={a.threads}"]
        for o in a.overrides:
            cmd += ["--set", o]
        t0 = time.time()
        with lock:
            print(f"[{time.strftime('%H:%M:%S')}] start {stem}-s{s} (log {log})", flush=True)
        with open(log, "a") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        with lock:
            print(f"[{time.strftime('%H:%M:%S')}] {'done' if rc == 0 else f'FAILED (exit {rc})'} {stem}-s{s} "
                  f"after {(time.time() - t0) / 60:.1f} min", flush=True)
            if rc:
                failed.append(f"{stem}-s{s}")
            elif kept is not None:
                _copy_kept(run_dir, kept)
            collect_if_complete(c)

    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(run, jobs))
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
