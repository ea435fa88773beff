"""HSTU's pointwise attention weights as one fused CPU kernel pair (numba): the CPU fast path
of ``A = SiLU(S + rab_pos + rab_time) / n ⊙ causal`` in ``models/hstu.py`` (same values, same
gradients; tests/test_hstu_llama.py).

Why a kernel: in torch that line is four passes over a (B, H, T, T) tensor forward (add,
SiLU, divide, mask) and four backward, plus the bias gradient, a sum of the (B, H, T, T)
gradient over batch and heads that the broadcast leaves to a strided reduction. In a
one-thread profile of an HSTU-large ML-1M training step (B 128, H 2, T 200, 8 blocks; two
other trainings on the machine) those ops took 1.05 s of 2.5 s. Here the forward is one pass
and the backward one pass that also accumulates the bias gradient, both over the causal
lower triangle only (the upper one is written as zeros): 0.30 s in the same profile, and an
epoch 88 -> 71 s (BENCHMARKS.md, "HSTU on CPU").

* the relative biases are read from their tables inside the loop (rab_pos[i, j] =
  pos_w[i - j], rab_time[b, i, j] = ts_w[bucket]) and their gradients are summed straight into
  the tables. Materializing the (T, T) / (B, T, T) bias and leaving its gradient to torch's
  indexing backward (a sort-based index_put over B·T² entries) cost more than the attention
  itself at long T: an HSTU training step at T = 2048 (B 4) spent ~55% of its time there.
* the backward recomputes z from the saved S and the tables (nothing extra is stored:
  torch's SiLU keeps its input too);
* rows (batch entries) run in parallel, one contiguous share per thread, each summing its
  bias gradients into its own float64 row, added up by torch afterwards: no races.
* SiLU'(z) = σ(z) (1 + z (1 - σ(z))), with the scan's σ (``scan_numba._sigmoid``: exp(-|z|)
  by a polynomial LLVM vectorizes; with libm's scalar exp the pair measured ~15% slower).
"""
from __future__ import annotations

import numpy as np
import torch
from numba import get_num_threads, njit, prange
from torch.autograd.function import once_differentiable

from .scan_numba import _sigmoid, _silu_grad, kernel_threads


@njit(parallel=True, fastmath=True, cache=True)
def _fwd(s, rpos, ts_w, buckets, inv_n, n_parts, i0, a):
    """a[b, h, r, j] = silu(s + (pos_w[i - j] + ts_w[buckets[b, r, j]])) * inv_n for j <= i,
    else 0, where row r is query i = i0 + r (s (B, H, R, K): R query rows from i0 on, against
    keys 0 … K-1; the whole matrix is i0 = 0, R = K = T); without time bias (buckets of shape
    (0, 0, 0)) the ts_w term is left out. rpos = pos_w reversed (P,): query i's position
    biases rpos[P-1-i : P] run forward in j."""
    B, H, R, K = s.shape
    P = rpos.shape[0]
    timed = buckets.shape[0] > 0
    share = (B + n_parts - 1) // n_parts
    for blk in prange(n_parts):
        for b in range(blk * share, min(B, (blk + 1) * share)):
            for h in range(H):
                for r in range(R):
                    i = i0 + r
                    srow, arow, prow = s[b, h, r], a[b, h, r], rpos[P - 1 - i:]
                    if timed:
                        brow = buckets[b, r]
                        for j in range(i + 1):
                            z = srow[j] + (prow[j] + ts_w[brow[j]])
                            arow[j] = z * _sigmoid(z) * inv_n
                    else:
                        for j in range(i + 1):
                            z = srow[j] + prow[j]
                            arow[j] = z * _sigmoid(z) * inv_n
                    for j in range(i + 1, K):
                        arow[j] = 0


@njit(parallel=True, fastmath=True, cache=True)
def _bwd(s, rpos, ts_w, buckets, inv_n, n_parts, i0, g, gs, grpos_parts, gts_parts):
    """gs = g * silu'(z) * inv_n on the causal part (0 elsewhere), rows as in ``_fwd``; each
    share of rows adds its part of the bias gradients into its own row of grpos_parts
    (n_parts, P) (reversed, as rpos) and gts_parts (n_parts, n_buckets + 1) (by bucket),
    float64 accumulators."""
    B, H, R, K = s.shape
    P = rpos.shape[0]
    timed = buckets.shape[0] > 0
    share = (B + n_parts - 1) // n_parts
    for blk in prange(n_parts):
        grpos, gts = grpos_parts[blk], gts_parts[blk]
        for b in range(blk * share, min(B, (blk + 1) * share)):
            for h in range(H):
                for r in range(R):
                    i = i0 + r
                    srow, grow, gsrow = s[b, h, r], g[b, h, r], gs[b, h, r]
                    prow, gprow = rpos[P - 1 - i:], grpos[P - 1 - i:]
                    if timed:
                        brow = buckets[b, r]
                        for j in range(i + 1):
                            z = srow[j] + (prow[j] + ts_w[brow[j]])
                            sig = _sigmoid(z)
                            v = _silu_grad(grow[j], z, sig) * inv_n
                            gsrow[j] = v
                            gprow[j] += v
                            gts[brow[j]] += v
                    else:
                        for j in range(i + 1):
                            z = srow[j] + prow[j]
                            sig = _sigmoid(z)
                            v = _silu_grad(grow[j], z, sig) * inv_n
                            gsrow[j] = v
                            gprow[j] += v
                    for j in range(i + 1, K):
                        gsrow[j] = 0


def tables(pos_w, ts_w, buckets, T):
    """Checked kernel inputs: (rpos, ts_w, buckets), with empty stand-ins without time bias."""
    if pos_w.shape[0] < T:
        raise ValueError(f"position bias table has {pos_w.shape[0]} entries, sequence length is {T}")
    rpos = pos_w.detach().flip(0)  # flip copies: contiguous
    if buckets is None:
        return rpos, rpos.new_zeros(0), torch.zeros(0, 0, 0, dtype=torch.int32)
    # int32, as models/hstu.time_buckets makes them (another type compiles anew)
    if ts_w is None:
        raise ValueError("time buckets given without the time bias table ts_w")
    lo, hi = torch.aminmax(buckets)  # the kernels index unchecked: refuse what would read or write outside ts_w
    if lo < 0 or hi >= ts_w.shape[0]:
        raise ValueError(f"time buckets span [{lo}, {hi}], the time bias table has {ts_w.shape[0]} entries")
    return rpos, ts_w.detach().contiguous(), buckets.contiguous()


def weights(s, rpos, ts_w, buckets, n, i0: int = 0):
    """A = SiLU(S + rab) / n ⊙ causal for query rows i0 … i0+R-1 (s (B, H, R, K)), inputs as
    ``tables`` returns them."""
    a = torch.empty_like(s)
    with kernel_threads():
        _fwd(s.numpy(), rpos.numpy(), ts_w.numpy(), buckets.numpy(), np.float32(1.0 / n), get_num_threads(), i0, a.numpy())
    return a


class BiasGrads:
    """Per-share float64 accumulators of the two bias tables' gradients, filled by any
    number of ``weights_backward`` calls (the query blocks of one attention), summed once.
    Allocated at the first call, one row per kernel thread then; later calls split their
    rows into that many shares, so nothing accumulated is ever dropped."""

    def __init__(self):
        self.grpos = self.gts = None

    def result(self, dtype, timed: bool):
        """(∂/∂pos_w, ∂/∂ts_w or None)"""
        return self.grpos.sum(0).flip(0).to(dtype), self.gts.sum(0).to(dtype) if timed else None


def weights_backward(s, rpos, ts_w, buckets, n, g, acc: BiasGrads, i0: int = 0):
    """∂loss/∂S from g = ∂loss/∂A (same rows as ``weights``); adds the bias gradients to acc."""
    gs = torch.empty_like(s)
    with kernel_threads():
        if acc.grpos is None:
            acc.grpos = torch.zeros(get_num_threads(), rpos.shape[0], dtype=torch.float64)
            acc.gts = torch.zeros(get_num_threads(), ts_w.shape[0], dtype=torch.float64)
        _bwd(s.numpy(), rpos.numpy(), ts_w.numpy(), buckets.numpy(), np.float32(1.0 / n), acc.grpos.shape[0], i0, g.numpy(),
             gs.numpy(), acc.grpos.numpy(), acc.gts.numpy())
    return gs


class CausalSiluAttention(torch.autograd.Function):
    """A = SiLU(S + rab) / n ⊙ tril(1) with rab[b, i, j] = pos_w[i - j] (+ ts_w[buckets[b, i, j]]):
    S (B, H, T, T) float32 CPU; pos_w (P,) with P ≥ T; ts_w (n_buckets + 1,) and buckets
    (B, T, T) integer, or buckets None (no time bias; ts_w is then ignored and gets no
    gradient). The bias is shared by the heads."""

    @staticmethod
    def forward(ctx, s, pos_w, ts_w, buckets, n):
        s = s.contiguous()
        rpos, ts_k, buckets_k = tables(pos_w, ts_w, buckets, s.shape[-1])
        a = weights(s, rpos, ts_k, buckets_k, n)
        ctx.save_for_backward(s, rpos, ts_k, buckets_k)
        ctx.n = n
        return a

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        s, rpos, ts_w, buckets = ctx.saved_tensors
        acc = BiasGrads()
        gs = weights_backward(s, rpos, ts_w, buckets, ctx.n, g.contiguous(), acc)
        g_pos, g_ts = acc.result(s.dtype, buckets.shape[0] > 0)
        return gs, g_pos, g_ts, None, None


def applicable(s: torch.Tensor) -> bool:
    from . import reference_only

    return s.device.type == "cpu" and s.dtype == torch.float32 and not reference_only()
