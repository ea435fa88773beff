"""What PCRec-simple costs at inference: the latency of scoring one batch of users plain,
with each user's adaptation batched (vmap over users), and with the same functional code
run one user at a time; the batched and one-at-a-time scores are compared.

    perseq bench adapt --model hstu --lengths 50,200 --batch 128 --out benchmarks/results/adapt_speed_cpu.json

``--versus hstu`` also times another model's plain scoring at the same sizes, alternating
the two call by call (so a busy machine slows both alike), and reports the latency ratio:
how PCRec's inference cost compares with its backbone's.

The weights are random at the ML-1M size (3,706 items): the cost depends on the shapes, not
on the values.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..models import build_model
from ..personalize import AdaptConfig, Personalized
from ..report import git_commit, hardware_name
from ..runtime import use_threads

# the ML-1M sizes of the configs in configs/ml-1m/
SIZES = {"hstu": {"d": 50, "n_blocks": 2, "n_heads": 1}, "hstu-large": {"d": 50, "n_blocks": 8, "n_heads": 2},
         "sasrec": {"d": 64}, "mamba4rec": {"d": 64}}
SIZES |= {"pcrec": SIZES["hstu"], "pcrec-large": SIZES["hstu-large"], "sasrec-pc": SIZES["sasrec"]}


def _time(fn, repeat: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up (and the scores)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def _time_alternately(fns, repeat: int) -> list[float]:
    """Median seconds of each of ``fns``, called in turn ``repeat`` times after a warm-up."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [sorted(t)[len(t) // 2] for t in times]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="perseq bench adapt", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="hstu", help=f"registry name (ML-1M sizes known for: {', '.join(SIZES)})")
    ap.add_argument("--lengths", default="50,200", help="history lengths to time")
    ap.add_argument("--batch", type=int, default=128, help="users per batch")
    ap.add_argument("--n-items", type=int, default=3706)
    ap.add_argument("--steps", type=int, default=1, help="adaptation steps S")
    ap.add_argument("--scope", default="all")
    ap.add_argument("--objective", default="ce", choices=["ce", "kl"],
                    help="ce: softmax over the whole catalogue at every position; kl: over the d embedding dimensions")
    ap.add_argument("--one-by-one", type=int, default=16,
                    help="users timed one at a time (the per-user time is scaled to the batch)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--versus", help="another registry model whose plain scoring is timed alternately (e.g. hstu)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", help="JSON file to write")
    a = ap.parse_args(argv)
    threads = use_threads(a.threads)
    torch.manual_seed(0)
    rows = []
    for L in [int(x) for x in a.lengths.split(",")]:
        model = build_model(a.model, a.n_items, max_len=L, **SIZES.get(a.model, {})).eval()
        items = torch.randint(1, a.n_items + 1, (a.batch, L))
        lengths = torch.full((a.batch,), L)
        cfg = AdaptConfig(steps=a.steps, lr=0.01, scope=a.scope, objective=a.objective, users_per_batch=a.batch)
        with torch.no_grad():
            plain_s, _ = _time(lambda: model.scores(items, lengths), a.repeat)
            if a.versus:
                other = build_model(a.versus, a.n_items, max_len=L, **SIZES.get(a.versus, {})).eval()
                pair = _time_alternately([lambda: model.scores(items, lengths), lambda: other.scores(items, lengths)],
                                         max(a.repeat, 7))
        batched_s, batched = _time(lambda: Personalized(model, cfg).scores(items, lengths), a.repeat)
        n1 = min(a.one_by_one, a.batch)
        single = Personalized(model, AdaptConfig(**{**cfg.to_dict(), "users_per_batch": 1}))
        one_s, one = _time(lambda: single.scores(items[:n1], lengths[:n1]), max(1, a.repeat // 2))
        one_s *= a.batch / n1
        fin = torch.isfinite(batched[:n1])
        rows.append({"length": L, "batch": a.batch, "plain_ms": plain_s * 1e3, "adapted_batched_ms": batched_s * 1e3,
                     "adapted_one_by_one_ms": one_s * 1e3, "speedup_batched": one_s / batched_s,
                     "added_ms_per_batch": (batched_s - plain_s) * 1e3,
                     "added_ms_per_user": (batched_s - plain_s) * 1e3 / a.batch,
                     "max_abs_diff_batched_vs_one": float((batched[:n1][fin] - one[fin]).abs().max())})
        r = rows[-1]
        print(f"L {L}: plain {r['plain_ms']:.1f} ms, adapted batched {r['adapted_batched_ms']:.1f} ms, one by one "
              f"{r['adapted_one_by_one_ms']:.0f} ms ({r['speedup_batched']:.1f}x), |diff| {r['max_abs_diff_batched_vs_one']:.1e}")
        if a.versus:
            rows[-1] |= {"versus": a.versus, "plain_alternating_ms": pair[0] * 1e3, "versus_plain_ms": pair[1] * 1e3,
                         "plain_ratio": pair[0] / pair[1]}
            print(f"L {L}: plain {a.model} {pair[0] * 1e3:.1f} ms vs {a.versus} {pair[1] * 1e3:.1f} ms "
                  f"({pair[0] / pair[1]:.2f}x), timed alternately")
    result = {"model": a.model, "sizes": SIZES.get(a.model, {}), "n_items": a.n_items, "steps": a.steps, "scope": a.scope,
              "objective": a.objective,
              "threads": threads.n, "hardware": hardware_name(torch.device("cpu")), "commit": git_commit(), "rows": rows}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {a.out}")
    return result
