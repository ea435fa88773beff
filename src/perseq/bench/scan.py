"""Time the selective scan alone, forward and backward, for every CPU implementation
(chunked PyTorch scan, fused numba kernels, the AVX-512 C kernels where they load; the
sequential reference on request), on one random batch of Mamba-shaped inputs; writes a
JSON result.

    perseq bench scan --batch 128 --length 200 --threads 2 --out benchmarks/results/scan_cpu.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..ops import native
from ..ops.selective_scan import selective_scan_chunked, selective_scan_numba, selective_scan_ref
from ..report import git_commit, hardware_name


def _fused(use_native: bool):
    """selective_scan_numba with its kernels pinned: the numba pair or the C pair (the
    backward follows the forward's choice)."""
    if selective_scan_numba is None:
        return None
    from ..ops import scan_numba

    def run(*args):
        prev, scan_numba.USE_NATIVE = scan_numba.USE_NATIVE, use_native
        try:
            return selective_scan_numba(*args)
        finally:
            scan_numba.USE_NATIVE = prev

    return run


IMPLEMENTATIONS = {"torch": selective_scan_chunked, "numba": _fused(False), "native": _fused(True),
                   "reference": selective_scan_ref}


def inputs(batch: int, length: int, E: int, N: int, seed: int = 0):
    """Mamba-like magnitudes: Δ = softplus(·) around Mamba's init range, A = -(1..N)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, E, generator=g)
    delta = F.softplus(torch.randn(batch, length, E, generator=g) - 3)
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)
    B, C = torch.randn(batch, length, N, generator=g), torch.randn(batch, length, N, generator=g)
    D = torch.ones(E)
    return x, delta, A, B, C, D


def time_impl(fn, args, repeat: int) -> dict:
    leaves = [t.clone().requires_grad_() for t in args]
    gy = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(1))
    fwd = bwd = 0.0
    for i in range(repeat + 1):  # the first round warms up (and compiles the numba kernels)
        t0 = time.perf_counter()
        y = fn(*leaves)
        t1 = time.perf_counter()
        y.backward(gy)
        t2 = time.perf_counter()
        if i:
            fwd, bwd = fwd + t1 - t0, bwd + t2 - t1
        for t in leaves:
            t.grad = None
    return {"forward_s": fwd / repeat, "backward_s": bwd / repeat}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="perseq bench scan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--length", type=int, default=200)
    ap.add_argument("--inner", type=int, default=128, help="E = expand * d")
    ap.add_argument("--state", type=int, default=32, help="N = d_state")
    ap.add_argument("--impls", default=None, help=f"comma-separated: {', '.join(IMPLEMENTATIONS)} (default: "
                    "torch, numba and native where the C kernels load)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", help="JSON file to write")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    args = inputs(a.batch, a.length, a.inner, a.state)
    res = {"batch": a.batch, "length": a.length, "inner": a.inner, "state": a.state, "impls": {}}
    impls = a.impls or "torch,numba" + (",native" if native.library() is not None else "")
    for name in impls.split(","):
        if name not in IMPLEMENTATIONS:
            raise SystemExit(f"error: unknown implementation {name!r}; valid: {', '.join(IMPLEMENTATIONS)}")
        fn = IMPLEMENTATIONS[name]
        if fn is None:
            raise SystemExit(f"error: {name!r} is unavailable here (is numba installed?)")
        if name == "native" and native.library() is None:
            raise SystemExit("error: the AVX-512 C kernels do not load here (no AVX-512, no C compiler, or "
                             "PERSEQ_NATIVE=0); leave 'native' out of --impls")
        res["impls"][name] = time_impl(fn, args, a.repeat)
        print(f"{name}: forward {res['impls'][name]['forward_s']:.4f} s, backward {res['impls'][name]['backward_s']:.4f} s", flush=True)
    res.update(hardware=hardware_name(), torch=torch.__version__, commit=git_commit())
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0
