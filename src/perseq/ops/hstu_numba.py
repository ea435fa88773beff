"""HSTU's pointwise attention weights as one fused CPU kernel pair (numba): the CPU fast path
of ``A = SiLU(S + bias) / n ⊙ causal`` in ``models/hstu.py`` (same values, same gradients;
tests/test_hstu_llama.py).

Why a kernel: in torch that line is four passes over a (B, H, T, T) tensor forward (add,
SiLU, divide, mask) and four backward, plus the bias gradient, a sum of the (B, H, T, T)
gradient over batch and heads that the broadcast leaves to a strided reduction. In a
one-thread profile of an HSTU-large ML-1M training step (B 128, H 2, T 200, 8 blocks; two
other trainings on the machine) those ops took 1.05 s of 2.5 s. Here the forward is one pass
and the backward one pass that also accumulates the bias gradient, both over the causal
lower triangle only (the upper one is written as zeros): 0.30 s in the same profile, and an
epoch 88 -> 71 s (BENCHMARKS.md, "HSTU on CPU").

* the backward recomputes z = S + bias from the saved S and bias (nothing extra is stored:
  torch's SiLU keeps its input too);
* rows (batch entries) run in parallel, one contiguous share per thread. A bias shared by
  the batch (position bias only: shape (1, T, T)) gets one partial gradient per share,
  summed by torch afterwards; a per-row bias (with the time bias: (B, T, T)) is written
  only by the share that owns the row: no races either way.
* SiLU'(z) = σ(z) (1 + z (1 - σ(z))), with the scan's σ (``scan_numba._sigmoid``: exp(-|z|)
  by a polynomial LLVM vectorizes; with libm's scalar exp the pair measured ~15% slower).
"""
from __future__ import annotations

import numpy as np
import torch
from numba import get_num_threads, njit, prange
from torch.autograd.function import once_differentiable

from .scan_numba import _ONE, _sigmoid, kernel_threads


@njit(parallel=True, fastmath=True, cache=True)
def _fwd(s, bias, inv_n, n_parts, a):
    """a[b, h, i, j] = silu(s + bias[b or 0]) * inv_n for j <= i, else 0."""
    B, H, T, _ = s.shape
    per_row = bias.shape[0] > 1
    share = (B + n_parts - 1) // n_parts
    for blk in prange(n_parts):
        for b in range(blk * share, min(B, (blk + 1) * share)):
            bb = b if per_row else 0
            for h in range(H):
                for i in range(T):
                    srow, brow, arow = s[b, h, i], bias[bb, i], a[b, h, i]
                    for j in range(i + 1):
                        z = srow[j] + brow[j]
                        arow[j] = z * _sigmoid(z) * inv_n
                    for j in range(i + 1, T):
                        arow[j] = 0


@njit(parallel=True, fastmath=True, cache=True)
def _bwd(s, bias, inv_n, n_parts, g, gs, gbias_parts):
    """gs = g * silu'(s + bias) * inv_n on the lower triangle (0 above); gbias_parts
    (n_parts, 1, T, T) for a shared bias (each share's sum over its rows and heads) or
    (1, B, T, T) for a per-row bias (each row's sum over heads)."""
    B, H, T, _ = s.shape
    per_row = bias.shape[0] > 1
    share = (B + n_parts - 1) // n_parts
    for blk in prange(n_parts):
        for b in range(blk * share, min(B, (blk + 1) * share)):
            bb = b if per_row else 0
            gpart = gbias_parts[0, b] if per_row else gbias_parts[blk, 0]
            for h in range(H):
                for i in range(T):
                    srow, brow, grow, gsrow, gbrow = s[b, h, i], bias[bb, i], g[b, h, i], gs[b, h, i], gpart[i]
                    for j in range(i + 1):
                        z = srow[j] + brow[j]
                        sig = _sigmoid(z)
                        v = grow[j] * sig * (_ONE + z * (_ONE - sig)) * inv_n
                        gsrow[j] = v
                        gbrow[j] += v
                    for j in range(i + 1, T):
                        gsrow[j] = 0


class CausalSiluAttention(torch.autograd.Function):
    """A = SiLU(S + bias) / n ⊙ tril(1): S (B, H, T, T); bias (1, T, T) shared by the batch
    or (B, T, T) per row (shared by the heads either way); float32 CPU tensors."""

    @staticmethod
    def forward(ctx, s, bias, n):
        s, bias = s.contiguous(), bias.contiguous()
        a = torch.empty_like(s)
        inv_n = np.float32(1.0 / n)
        with kernel_threads():
            _fwd(s.numpy(), bias.numpy(), inv_n, get_num_threads(), a.numpy())
        ctx.save_for_backward(s, bias)
        ctx.inv_n = inv_n
        return a

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        s, bias = ctx.saved_tensors
        g = g.contiguous()
        gs = torch.empty_like(s)
        with kernel_threads():
            per_row = bias.shape[0] > 1
            parts = s.new_zeros(1 if per_row else get_num_threads(), *bias.shape)  # see _bwd
            _bwd(s.numpy(), bias.numpy(), ctx.inv_n, get_num_threads(), g.numpy(), gs.numpy(), parts.numpy())
        return gs, parts.sum(0), None


def applicable(s: torch.Tensor, bias: torch.Tensor) -> bool:
    return s.device.type == "cpu" and s.dtype == torch.float32 and bias.dtype == torch.float32
