"""What one serving request costs against history length: PerSRec from its per-user cache
next to full re-encoding, the backbone's growing KV cache, recent-only, and Mamba4Rec's
recurrent step (issue 26's cost table).

    perseq bench persrec --lengths 1024,4096,16384,65536 --out benchmarks/results/persrec_cost

A request is one new event followed by scoring the whole catalogue, batch 1, one thread.
Per method and history length n:

* ``persrec``: ``append`` the event to the user's (cache, recent) — folding the oldest
  ``fold`` events into the cache whenever the recent part passes R, so the mean over
  ``--requests`` requests includes the folds — then ``recommend``. The cache was compressed
  from the n − R older events once beforehand (that one-time cost is reported apart).
  This is the paper's serving: the recent part is re-encoded on every request.
* ``persrec_stream``: ``stream_step``, which also caches the recent part's keys and values,
  so a request encodes one event against K + r cached positions (folds, and re-encoding
  the recent part after each, included in the mean).
* ``reencode``: the backbone encodes all n events (its position table sized to n).
* ``kv_step``: the backbone's ``step`` against a KV cache of n past events: O(n) per
  request. Filling that cache event by event would cost O(n²) before the first timing,
  and the step's cost does not depend on the cached values, so the cache holds random
  keys and values of the right shape.
* ``recent``: the backbone encodes the last R events only.
* ``mamba4rec_step``: Mamba4Rec's recurrent ``step`` (state independent of n).

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and
attention; element-wise work is not counted). Re-encoding stops at ``--max-reencode``
events; longer points are extrapolated quadratically from the longest measured one and
marked ``extrapolated``. Writes ``<out>.json`` and ``<out>.png``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..models import build_model
from ..models.persrec import cache_bytes
from ..report import write_result_file

N_ITEMS = 10_000
METHODS = ("persrec", "persrec_stream", "reencode", "kv_step", "recent", "mamba4rec_step")


def _flops(fn) -> int:
    # the math attention kernel: FlopCounterMode counts its matrix products, not the fused ones
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def _mean_seconds(fn, repeat: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def _score(model, h):
    return h @ model.output_embeddings().T


@torch.no_grad()
def measure(n: int, backbone: str, P: int, K: int, R: int, fold: int, requests: int, max_reencode: int,
            d: int = 64, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(1, N_ITEMS + 1, (1, n), generator=g)
    new = torch.randint(1, N_ITEMS + 1, (1, requests + 1), generator=g)
    rows = []

    # PerSRec: compress once, then append + recommend per request (folds included)
    torch.manual_seed(seed)
    m = build_model(f"{backbone}+persrec", N_ITEMS, max_len=P + R, recent=R, tokens=K, fold=fold, d=d).eval()
    t0 = time.perf_counter()
    cache = m.compress(hist[:, : n - R])
    compress_s = time.perf_counter() - t0
    state = {"cache": cache, "recent": hist[:, n - R :], "i": 0}

    def persrec_request():
        i = state["i"] % requests
        state["cache"], state["recent"] = m.append(state["cache"], state["recent"], new[:, i : i + 1])
        state["i"] += 1
        return m.recommend(state["cache"], state["recent"])

    flops = [_flops(persrec_request) for _ in range(fold)]  # one fold in every `fold` requests
    sec = _mean_seconds(persrec_request, requests)
    rows.append({"method": "persrec", "history": n, "seconds": sec, "flops": sum(flops) / len(flops),
                 "cache_bytes": cache_bytes(state["cache"]) + R * 8, "compress_seconds_once": compress_s})

    # PerSRec streaming: the recent part's keys/values cached as well
    stream = {"s": m.stream_state(cache, hist[:, n - R :]), "i": 0}

    def stream_request():
        i = stream["i"] % requests
        stream["s"], h = m.stream_step(stream["s"], new[0, i : i + 1])
        stream["i"] += 1
        return _score(m, h)

    flops = [_flops(stream_request) for _ in range(fold)]
    sec = _mean_seconds(stream_request, requests)
    s = stream["s"]
    rows.append({"method": "persrec_stream", "history": n, "seconds": sec, "flops": sum(flops) / len(flops),
                 "cache_bytes": cache_bytes({k: s[k] for k in ("k", "v")}) + R * 8 + cache_bytes({k: s[k] for k in ("rk", "rv")})
                 * R // max(1, s["recent"].shape[1])})

    # full re-encode of all n events
    base = build_model(backbone, N_ITEMS, max_len=n + 2, d=d).eval()  # room for the KV step after n
    if n <= max_reencode:
        enc = lambda: _score(base, base.encode(hist)[:, -1])  # noqa: E731
        rows.append({"method": "reencode", "history": n, "seconds": _mean_seconds(enc, max(1, min(requests, 4096 * 8 // n))),
                     "flops": _flops(enc), "cache_bytes": n * 8})
    else:
        rows.append({"method": "reencode", "history": n, "extrapolated": True, "cache_bytes": n * 8})

    # the backbone's growing KV cache: one step against n cached events
    st = base.init_state(1)
    if "blocks" in st:  # SASRec: per-block dicts
        H, hs = base.blocks[0].attn.n_heads, d // base.blocks[0].attn.n_heads
        st = {"pos": n, "blocks": [{"k": torch.randn(1, H, n, hs), "v": torch.randn(1, H, n, hs)} for _ in base.blocks]}
    else:  # HSTU / LLaMA: stacked (n_blocks, B, H, t, ·)
        st = {k: (torch.randn(*v.shape[:3], n, v.shape[4]) if k in ("k", "v") else torch.zeros(1, n, dtype=torch.long))
              for k, v in st.items()}
    item = new[:, 0]

    def kv_request():
        s = {"pos": st["pos"], "blocks": [dict(b) for b in st["blocks"]]} if "blocks" in st else st
        return _score(base, base.step(s, item)[1])

    rows.append({"method": "kv_step", "history": n, "seconds": _mean_seconds(kv_request, requests),
                 "flops": _flops(kv_request), "cache_bytes": sum(t.numel() * 4 for b in st.get("blocks", [st]) for k, t in b.items() if k in ("k", "v"))})

    # recent only: re-encode the last R events
    rec = build_model(backbone, N_ITEMS, max_len=R, d=d).eval()
    last = hist[:, -R:]
    enc_r = lambda: _score(rec, rec.encode(last)[:, -1])  # noqa: E731
    rows.append({"method": "recent", "history": n, "seconds": _mean_seconds(enc_r, requests), "flops": _flops(enc_r),
                 "cache_bytes": R * 8})

    # Mamba4Rec's recurrent step: its state does not grow with n
    mb = build_model("mamba4rec", N_ITEMS, max_len=R, d=d).eval()
    ms = mb.init_state(1)
    for t in range(8):
        ms, _ = mb.step(ms, hist[:, t])
    mamba = lambda: _score(mb, mb.step(ms, item)[1])  # noqa: E731
    state_bytes = sum(t.numel() * t.element_size() for t in _tensors(ms))
    rows.append({"method": "mamba4rec_step", "history": n, "seconds": _mean_seconds(mamba, requests), "flops": _flops(mamba),
                 "cache_bytes": state_bytes})
    return rows


def _tensors(state):
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for v in state.values():
            yield from _tensors(v)
    elif isinstance(state, (list, tuple)):
        for v in state:
            yield from _tensors(v)


def _extrapolate(rows: list[dict]) -> None:
    """Re-encoding points past --max-reencode: quadratic in n from the longest measured one."""
    done = [r for r in rows if r["method"] == "reencode" and not r.get("extrapolated")]
    if not done:
        return
    ref = max(done, key=lambda r: r["history"])
    for r in rows:
        if r["method"] == "reencode" and r.get("extrapolated"):
            f = (r["history"] / ref["history"]) ** 2
            r["seconds"], r["flops"] = ref["seconds"] * f, ref["flops"] * f


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in METHODS:
        pts = sorted((r for r in rows if r["method"] == method and "seconds" in r), key=lambda r: r["history"])
        if not pts:
            continue
        for ax, key, scale in ((axes[0], "seconds", 1e3), (axes[1], "flops", 1e-6)):
            xs = [p["history"] for p in pts]
            ax.plot(xs, [p[key] * scale for p in pts], marker="o", label=method)
            ex = [p for p in pts if p.get("extrapolated")]
            if ex:
                ax.plot([p["history"] for p in ex], [p[key] * scale for p in ex], "x", color="k")
    for ax, label in ((axes[0], "ms per request"), (axes[1], "MFLOPs per request")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("history length (events)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].set_title("x: re-encoding extrapolated (n²)", fontsize=8)
    fig.suptitle("One request (new event + full-catalogue scores), batch 1, one CPU thread")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="perseq bench persrec", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,4096,16384,65536", help="history lengths (events), comma-separated")
    ap.add_argument("--backbone", default="sasrec", choices=["sasrec", "hstu", "llama"])
    ap.add_argument("--history", type=int, default=384, help="P, events per compressed segment")
    ap.add_argument("--tokens", type=int, default=4, help="K, compression tokens")
    ap.add_argument("--recent", type=int, default=128, help="R, recent events encoded per request")
    ap.add_argument("--fold", type=int, default=64, help="events folded into the cache at once")
    ap.add_argument("--requests", type=int, default=256, help="requests timed per point (a multiple of --fold)")
    ap.add_argument("--max-reencode", type=int, default=16384, help="longest history re-encoded for real")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/persrec_cost")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    for n in [int(x) for x in a.lengths.split(",")]:
        if n <= a.recent:
            raise SystemExit(f"history length {n} must exceed --recent {a.recent}")
        rows += measure(n, a.backbone, a.history, a.tokens, a.recent, a.fold, a.requests, a.max_reencode)
        for r in rows[-len(METHODS):]:
            print(f"n={n:>6} {r['method']:<15} {r.get('seconds', float('nan')) * 1e3:9.2f} ms", flush=True)
    _extrapolate(rows)
    out = Path(a.out)
    write_result_file(out.with_suffix(".json"), {
        "benchmark": "persrec_cost", "backbone": a.backbone, "d": 64, "n_items": N_ITEMS, "threads": a.threads,
        "protocol": {"P": a.history, "K": a.tokens, "R": a.recent, "fold": a.fold, "batch": 1, "requests": a.requests},
        "rows": rows})
    plot(rows, out.with_suffix(".png"))
