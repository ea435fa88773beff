"""Speed versus sequence length for every backbone: training-step time, inference latency
(full re-encode of the history vs one incremental ``step``) and peak memory.

    perseq bench speed --lengths 64,256,1024,2048,8192 --out benchmarks/results/speed

Each (model, length) point runs in its own process so that peak memory (max RSS on CPU,
max allocated on CUDA) belongs to that point alone. Writes ``<out>.json``, ``<out>.md``
and ``<out>.png``; every row names the device that produced it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..losses import sampled_softmax
from ..models import MODELS, build_model
from ..train import select_device
from ..report import git_commit, hardware_name
from ..runtime import tune_malloc_for_training

N_ITEMS = 10_000


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, dev, repeat: int) -> float:
    fn()  # warm-up
    _sync(dev)
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(dev)
    return (time.perf_counter() - t) / repeat


@torch.no_grad()
def _step_latency(model, history: int, repeat: int, dev) -> float:
    """Median seconds per new event (step + scoring the catalogue) after ``history`` events."""
    seq = torch.randint(1, N_ITEMS + 1, (1, history + repeat), device=dev)
    seq_t = torch.cumsum(torch.randint(1, 1000, (1, history + repeat), device=dev), 1)
    state = model.init_state(1, device=dev)
    for t in range(history):  # reach the history length the honest way: event by event
        state, _ = model.step(state, seq[:, t], seq_t[:, t])
    per_event = []
    for t in range(history, history + repeat):
        _sync(dev)
        t0 = time.perf_counter()
        state, h = model.step(state, seq[:, t], seq_t[:, t])
        h @ model.output_embeddings().T  # score the catalogue, as serving does
        _sync(dev)
        per_event.append(time.perf_counter() - t0)
    # median: robust to the odd scheduler hiccup on a shared machine
    return float(torch.tensor(per_event).median())


def measure_step(model_name: str, history: int, device: str, repeat: int) -> dict:
    """Per-event serving latency after a long history (recurrent models: O(1) per event)."""
    dev = select_device(device)
    torch.manual_seed(0)
    model = build_model(model_name, N_ITEMS, max_len=history + repeat + 2, d=64).to(dev).eval()
    return {"model": model_name, "history": history, "device": hardware_name(dev), "repeat": repeat,
            "step_latency_s": _step_latency(model, history, repeat, dev)}


def measure_point(model_name: str, length: int, batch: int, device: str, repeat: int) -> dict:
    """One (model, length) point, in this process."""
    dev = select_device(device)
    torch.manual_seed(0)
    params = {"d": 64}
    if model_name in ("hstu", "hstu-large"):
        params = {"d": 50}
    # room for the history plus the timed steps (SASRec's absolute positions end at max_len)
    model = build_model(model_name, N_ITEMS, max_len=length + repeat + 2, **params).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    items = torch.randint(1, N_ITEMS + 1, (batch, length), device=dev)
    times = torch.cumsum(torch.randint(1, 1000, (batch, length), device=dev), 1)

    def train_step():
        model.train()
        inp = items
        if model.objective == "cloze":
            inp, _ = model.cloze_mask(items)
        h = model(inp, times)  # (B, L, D)
        loss = sampled_softmax(h.reshape(-1, h.shape[-1]), items.reshape(-1), model.output_embeddings(), n_neg=128)
        opt.zero_grad()
        loss.backward()
        opt.step()

    out = {"model": model_name, "length": length, "batch": batch, "device": hardware_name(dev),
           "malloc_tuned": tune_malloc_for_training()}
    out["train_step_s"] = _timed(train_step, dev, repeat)
    model.eval()
    with torch.no_grad():
        one = items[:1]
        lengths = torch.tensor([length], device=dev)
        out["reencode_latency_s"] = _timed(lambda: model.scores(one, lengths, times[:1]), dev, repeat)
        if model.incremental:
            out["step_latency_s"] = _step_latency(model, length, repeat, dev)
    if dev.type == "cuda":
        out["peak_memory_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        out["peak_memory_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _run_point(args, model: str, length: int, step: bool = False) -> dict:
    cmd = [sys.executable, "-m", "perseq.bench.speed", "--worker-step" if step else "--worker", model, str(length), "--batch", str(args.batch),
           "--device", args.device, "--repeat", str(args.repeat)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    key = "history" if step else "length"
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"model": model, key: length, "error": f"timeout after {args.timeout}s"}
    if p.returncode != 0:
        if p.returncode < 0:  # killed by a signal, with nothing on stderr: say which
            sig = -p.returncode
            last = f"killed by signal {sig}" + (" (SIGKILL: most likely the kernel's out-of-memory killer)" if sig == 9 else "")
        else:
            last = (p.stderr.strip().splitlines() or [f"failed with exit code {p.returncode}"])[-1]
        return {"model": model, key: length, "error": last[-300:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def provenance() -> dict:
    """What produced a sweep: the code (``+dirty`` when tracked files differ from it), the
    torch build, libgomp's spin setting (``perseq.runtime.limit_openmp_spin``) and the day.
    The points are measured in subprocesses that import the working tree as it is then, so a
    sweep is only one commit's if nothing is committed or edited while it runs."""
    return {"commit": git_commit(), "torch": torch.__version__, "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
            "date": time.strftime("%Y-%m-%d")}


def _write_json(rows: list[dict], steps, out: Path, meta: dict | None, **extra) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"points": rows, "step_vs_history": list(steps), **extra, "provenance": provenance() if meta is None else meta}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))


def _save_partial(rows: list[dict], steps: list[dict], out: Path, meta: dict | None = None) -> None:
    """The JSON so far, after every point: a sweep stopped early (a time limit, ^C) keeps what
    it measured, and ``--render`` draws the table and plot from it."""
    _write_json(rows, steps, out, meta, complete=False)


def write_outputs(rows: list[dict], out: Path, steps: list[dict] = (), meta: dict | None = None) -> None:
    """JSON, markdown table and PNG plot of a sweep; ``meta``: its provenance (``--render``
    passes the earlier run's; None = this process's, ``provenance()``)."""
    _write_json(rows, steps, out, meta)
    lines = ["| model | length | device | train step (s) | re-encode (ms) | step (ms) | peak MiB |", "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['length']} | | {r['error']} | | | |")
            continue
        step = f"{1000 * r['step_latency_s']:.2f}" if "step_latency_s" in r else "n/a"
        lines.append(f"| {r['model']} | {r['length']} | {r['device']} | {r['train_step_s']:.3f} | {1000 * r['reencode_latency_s']:.2f} | {step} | {r['peak_memory_mib']:.0f} |")
    if steps:
        lines += ["", "| model | history | device | step + scoring (ms) |", "|---|---:|---|---:|"]
        for r in steps:
            cell = r["error"] if "error" in r else f"{1000 * r['step_latency_s']:.3f}"
            lines.append(f"| {r['model']} | {r['history']} | {r.get('device', '')} | {cell} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(dict.fromkeys(r["model"] for r in rows)):
        c = colors[i % len(colors)]  # one colour per model on every panel
        pts = [r for r in rows if r["model"] == name and "error" not in r]
        if not pts:
            continue
        L = [r["length"] for r in pts]
        axes[0].plot(L, [r["train_step_s"] for r in pts], marker="o", color=c, label=name)
        axes[1].plot(L, [1000 * r["reencode_latency_s"] for r in pts], marker="o", color=c, label=f"{name} re-encode")
        st = [r for r in pts if "step_latency_s" in r]
        if st:
            axes[1].plot([r["length"] for r in st], [1000 * r["step_latency_s"] for r in st], ls="--", marker="x", color=c, label=f"{name} step")
        axes[2].plot(L, [r["peak_memory_mib"] for r in pts], marker="o", color=c, label=name)
    for ax, title in zip(axes, ["training step (s)", "next-item latency (ms)", "peak memory (MiB)"]):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=6)
    devices = sorted({r["device"] for r in rows if "device" in r})
    fig.suptitle("perseq speed vs length — " + "; ".join(devices), fontsize=9)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="perseq bench speed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated registry names")
    ap.add_argument("--lengths", default="64,256,1024,2048,8192")
    ap.add_argument("--batch", type=int, default=4, help="sequences per training step (fixed across lengths)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per point")
    ap.add_argument("--out", default="benchmarks/results/speed")
    ap.add_argument("--step-histories", default="100,10000",
                    help="also time one incremental step after these history lengths ('' to skip)")
    ap.add_argument("--step-models", default="mamba4rec,gru4rec,ttt4rec",
                    help="models for --step-histories (KV-cache models grow O(history) per step by design)")
    ap.add_argument("--render", metavar="JSON", help="only redraw the markdown table and plot of an earlier run's JSON into --out")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "LENGTH"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-step", nargs=2, metavar=("MODEL", "HISTORY"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_malloc_for_training()  # as fit() trains (each measurement runs in its own worker process)
    if args.worker:
        print(json.dumps(measure_point(args.worker[0], int(args.worker[1]), args.batch, args.device, args.repeat)))
        return 0
    if args.worker_step:
        print(json.dumps(measure_step(args.worker_step[0], int(args.worker_step[1]), args.device, max(args.repeat, 200))))
        return 0
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        # an older file has no provenance: {} keeps it unknown rather than stamping today's
        write_outputs(saved["points"], Path(args.out), saved.get("step_vs_history", []), saved.get("provenance", {}))
        print(f"wrote {args.out}.json, .md and .png from {args.render}")
        return 0
    meta = provenance()  # at the start: the code the sweep set out to measure
    rows = []
    for model in args.models.split(","):
        if model not in MODELS:
            raise SystemExit(f"error: unknown model {model!r}; valid: {', '.join(MODELS)}")
        for length in [int(x) for x in args.lengths.split(",")]:
            r = _run_point(args, model, length)
            rows.append(r)
            print(json.dumps(r), flush=True)
            _save_partial(rows, [], Path(args.out), meta)
    steps = []
    for model in filter(None, args.step_models.split(",")):
        for hist in [int(x) for x in args.step_histories.split(",") if x]:
            r = _run_point(args, model, hist, step=True)
            steps.append(r)
            print(json.dumps(r), flush=True)
            _save_partial(rows, steps, Path(args.out), meta)
    write_outputs(rows, Path(args.out), steps, meta)
    print(f"wrote {args.out}.json, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
