"""Measure the quickstart's budget (issue 23) on this machine and write
benchmarks/results/quickstart.json:

  (a) `perseq quickstart` wall time, in a fresh process with empty numba and perseq caches
      (NUMBA_CACHE_DIR, PERSEQ_CACHE_DIR pointing at new folders), as a new user meets it;
  (b) the same beside one single-thread ML-1M training (`BACKGROUND`, started first, given
      --warmup seconds to load its data and reach training, stopped afterwards);
  (c) one ML-1M SASRec training epoch (`perseq bench epoch`), idle and beside that training.

    python benchmarks/quickstart.py                     # ~5 minutes on 2 cores
    python benchmarks/quickstart.py --repeat 3          # medians of 3 of each

The numbers mean something only on an otherwise idle machine: the script measures how busy
the CPUs are before it starts (``busy_cores_before``) and says so when they are not idle. Every
measured process chooses its own thread count (perseq/runtime.py); PERSEQ_THREADS and
OMP_NUM_THREADS are removed from their environment so that the policy is what is measured.
It checks (``met``): wall_s <= 90, ratio_loaded <= 2.5, epoch_ratio_loaded <= 2.5, the test
NDCG@10 of the (first) idle run at least the pre-issue-23 quickstart's, and every model of
every run stopped early (its best epoch is not its last).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from perseq.quickstart import MODELS
from perseq.report import cpu_name
from perseq.runtime import busy_cores

ROOT = Path(__file__).resolve().parents[1]
PERSEQ = [sys.executable, "-m", "perseq.cli"]
BACKGROUND = ["train", "--set", "data.dataset=ml-1m", "--set", "train.threads=1", "--out", "{tmp}/bg"]
EPOCH = ["bench", "epoch", "--dataset", "ml-1m", "--model", "sasrec"]
LIMITS = {"wall_s": 90.0, "ratio_loaded": 2.5, "epoch_ratio_loaded": 2.5}
#: test NDCG@10 of the quickstart before issue 23 (SASRec at its epoch cap), which it must keep
NDCG_BAR = {"sasrec": 0.2714, "gru4rec": 0.2863}


def _env(tmp: Path, fresh_caches: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PERSEQ_THREADS", "OMP_NUM_THREADS")}
    if fresh_caches:  # a new, empty folder each time: numba compiles its kernels again
        caches = Path(tempfile.mkdtemp(prefix="caches-", dir=tmp))
        env.update(NUMBA_CACHE_DIR=str(caches / "numba"), PERSEQ_CACHE_DIR=str(caches / "perseq"))
    return env


def _threads_lines(text: str) -> list[str]:
    return sorted({line.strip() for line in text.splitlines() if line.strip().startswith("threads:")})


def quickstart(tmp: Path, epochs: int | None) -> dict:
    """One `perseq quickstart` in a fresh process with empty caches: wall time, per-model
    best epoch / epochs run / test NDCG@10 (from its run folders), the threads it chose."""
    out = Path(tempfile.mkdtemp(prefix="quickstart-", dir=tmp))
    cmd = PERSEQ + ["quickstart", "--out", str(out)] + ([] if epochs is None else ["--epochs", str(epochs)])
    t = time.perf_counter()
    p = subprocess.run(cmd, env=_env(tmp, True), capture_output=True, text=True, cwd=tmp)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"quickstart failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    res = {m: json.loads((out / m / "results.json").read_text()) for m in MODELS}
    return {"wall_s": wall, "threads": _threads_lines(p.stdout),
            "models": {m: {"best_epoch": r["best_epoch"], "epochs": r["epochs"], "test_ndcg@10": r["test"]["ndcg@10"]}
                       for m, r in res.items()}}


def epoch(tmp: Path, extra: list[str]) -> dict:
    """One `perseq bench epoch` (ML-1M SASRec): its last epoch's seconds and thread choice."""
    path = Path(tempfile.mkdtemp(prefix="epoch-", dir=tmp)) / "epoch.json"
    p = subprocess.run(PERSEQ + EPOCH + extra + ["--out", str(path)], env=_env(tmp, False), capture_output=True,
                       text=True, cwd=tmp)
    if p.returncode != 0:
        raise SystemExit(f"bench epoch failed ({p.returncode}):\n{p.stderr[-3000:]}")
    r = json.loads(path.read_text())
    return {"epoch_s": r["epoch_seconds"], "each": r["epoch_seconds_each"], "threads": r["torch_threads"],
            "threads_reason": r.get("threads_reason")}


class Background:
    """The single-thread ML-1M training, running for the duration of a ``with`` block."""

    def __init__(self, tmp: Path, warmup: float):
        self.cmd = PERSEQ + [a.format(tmp=tmp) for a in BACKGROUND]
        self.log = open(tmp / "background.log", "w")
        self.warmup, self.p = warmup, None

    def __enter__(self):
        self.p = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=_env(Path(self.log.name).parent, False))
        time.sleep(self.warmup)
        self.check()
        self.busy = busy_cores(interval=1.0)  # what the measured processes will find
        return self

    def check(self):
        if self.p.poll() is not None:
            raise SystemExit(f"the background training exited ({self.p.returncode}); see {self.log.name}")

    def __exit__(self, *exc):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)  # stops at the next batch
            try:
                self.p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()


def _median(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 2)


def _git() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or "unknown",
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quickstart.json"))
    ap.add_argument("--repeat", type=int, default=1, help="runs of each measurement; the medians are reported")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds the background training runs before measuring")
    ap.add_argument("--epoch-epochs", type=int, default=2, help="epochs `bench epoch` times back to back; the "
                    "last one's time is used (the first pays one-off costs)")
    ap.add_argument("--quickstart-epochs", type=int, help="cap the quickstart's epochs (only to check this script "
                    "quickly: the result then is not the quickstart's, and says so)")
    ap.add_argument("--epoch-args", default="", help="extra `bench epoch` arguments (same caveat), e.g. '--max-len 50'")
    a = ap.parse_args(argv)

    busy_before = busy_cores(interval=1.0)
    if busy_before is not None and busy_before > 0.3:
        print(f"warning: {busy_before:.1f} cores busy before starting; the numbers need an idle machine", file=sys.stderr)
    extra = ["--epochs", str(a.epoch_epochs)] + shlex.split(a.epoch_args)
    with tempfile.TemporaryDirectory(prefix="perseq-quickstart-bench-") as d:
        tmp = Path(d)
        idle = [quickstart(tmp, a.quickstart_epochs) for _ in range(a.repeat)]
        print(f"quickstart idle: {[round(r['wall_s'], 1) for r in idle]} s", file=sys.stderr)
        ep_idle = [epoch(tmp, extra) for _ in range(a.repeat)]
        print(f"epoch idle: {[r['epoch_s'] for r in ep_idle]} s", file=sys.stderr)
        with Background(tmp, a.warmup) as bg:
            loaded = [quickstart(tmp, a.quickstart_epochs) for _ in range(a.repeat)]
            print(f"quickstart loaded: {[round(r['wall_s'], 1) for r in loaded]} s", file=sys.stderr)
            ep_loaded = [epoch(tmp, extra) for _ in range(a.repeat)]
            print(f"epoch loaded: {[r['epoch_s'] for r in ep_loaded]} s", file=sys.stderr)
            bg.check()  # it ran throughout
            busy_loaded = bg.busy
    res = {
        "wall_s": _median(idle, "wall_s"),
        "wall_s_loaded": _median(loaded, "wall_s"),
        "epoch_s": _median(ep_idle, "epoch_s"),
        "epoch_s_loaded": _median(ep_loaded, "epoch_s"),
    }
    res["ratio_loaded"] = round(res["wall_s_loaded"] / res["wall_s"], 2)
    res["epoch_ratio_loaded"] = round(res["epoch_s_loaded"] / res["epoch_s"], 2)
    first = idle[0]
    res["test_ndcg@10"] = {m: v["test_ndcg@10"] for m, v in first["models"].items()}
    res["best_epoch"] = {m: v["best_epoch"] for m, v in first["models"].items()}
    res["epochs_run"] = {m: v["epochs"] for m, v in first["models"].items()}
    res["limits"] = {**LIMITS, "test_ndcg@10": NDCG_BAR}
    res["met"] = {k: res[k] <= v for k, v in LIMITS.items()}
    res["met"]["test_ndcg@10"] = all(res["test_ndcg@10"][m] >= v for m, v in NDCG_BAR.items())
    # early stopping ended every model, not the epoch cap: its best epoch is not its last
    res["met"]["converged"] = all(v["best_epoch"] < v["epochs"] for r in idle + loaded for v in r["models"].values())
    res.update({
        "quickstart_idle": idle,
        "quickstart_loaded": loaded,
        "epoch_idle": ep_idle,
        "epoch_loaded": ep_loaded,
        "quickstart_command": "perseq quickstart (fresh NUMBA_CACHE_DIR and PERSEQ_CACHE_DIR)"
                              + (f" --epochs {a.quickstart_epochs} (a check of this script, not the quickstart's budget)"
                                 if a.quickstart_epochs else ""),
        "epoch_command": "perseq " + shlex.join(EPOCH + extra),
        "background": "perseq " + " ".join(x.replace("{tmp}/", "<tmp>/") for x in BACKGROUND),
        "background_warmup_s": a.warmup,
        "busy_cores_before": None if busy_before is None else round(busy_before, 2),
        "busy_cores_with_background": None if busy_loaded is None else round(busy_loaded, 2),
        "repeat": a.repeat,
        "hardware": f"CPU: {cpu_name()} ({os.cpu_count()} cores)",
        **_git(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    })
    text = json.dumps(res, indent=1)
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text + "\n")
    return res


if __name__ == "__main__":
    main()
