"""dropout(GELU(h + bias)) as one fused CPU kernel pair: the inside of Mamba4Rec's 4d FFN.

    y = GELU(h + b) · keep · 1/(1-p),   GELU(s) = s Φ(s)     h (…, C), b (C,)

with the exact (erf) GELU of ``F.gelu`` and the counter-based mask of ``hash_dropout``:
the same seed keeps the same elements, so ``bias_gelu_dropout(h, b, p)`` equals
``hash_dropout(F.gelu(h + b), p)`` to float32 rounding (tests/test_dropout.py).

Why: at an ML-1M batch (B=128, L=116, 4d=256; 3.8 M elements) the bias add, ``F.gelu``,
the dropout and their backwards were five passes over the (B, L, 4d) tensor and ~8 ms of
a ~94 ms Mamba4Rec encoder step (2 threads). Here the forward is one pass (read h, write y)
and the backward one (read h and ∂y, write ∂h and the bias gradient); the mask is recomputed
from the seed, never stored, as in ``hash_dropout``.

* Φ(s) = erfc(-s/√2) / 2 with Abramowitz & Stegun 7.1.26 (the form of torch's own
  vectorized CPU ``erf``): t = 1/(1 + p a), erfc(a) = t P(t) exp(-a²) for a ≥ 0, degree-4
  P, absolute error ≤ 1.5e-7; erfc(-a) = 2 - erfc(a). One vectorizable exp
  (``scan_numba._exp_nonpos``), no libm call (LLVM does not vectorize libm's erff). The
  bound is absolute: far in the left tail Φ is off by a factor (GELU(-6) ≈ -6e-9 may come
  out as -8e-9), which is what torch's kernel does too; Numerical Recipes' erfcc
  (relative 1.2e-7 everywhere, degree 9) cost 0.6 ms more per forward pass (3.8 M floats).
* GELU'(s) = Φ(s) + s φ(s), φ(s) = exp(-s²/2) / √(2π).
* rows of C elements; parallel over blocks of rows (one per ~16 K elements), each block
  writes its own bias-gradient partial (no races), summed by torch. Below ``SERIAL_BELOW``
  elements one serial call (numba's pool launch costs more than such a call).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from . import reference_only
from .dropout import _BLOCK, SERIAL_BELOW, check_p, draw_seed, hash_dropout, mask_params, njit, seed_halves

if njit is not None:
    from numba import prange

    from .dropout import _hash_keeps
    from .scan_numba import _exp_nonpos, kernel_threads

    # Abramowitz & Stegun 7.1.26: erfc(a) ≈ t (a1 + a2 t + ... + a5 t⁴) exp(-a²), t = 1/(1 + p a)
    _P = np.float32(0.3275911)
    _A = tuple(np.float32(c) for c in (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429))
    _RSQRT2 = np.float32(1 / math.sqrt(2))
    _RSQRT2PI = np.float32(1 / math.sqrt(2 * math.pi))
    _ONE, _HALF, _ZERO = np.float32(1), np.float32(0.5), np.float32(0)

    #: exp(-a²) is taken as 0 beyond a² = 40 (|s| > 8.9, where Φ(s) < 1e-18): below that the
    #: products in these kernels reach float32's denormals, and x86 handles each denormal
    #: in a slow microcode path (s ~ N(0, 64): 52 ms per forward+backward instead of 9)
    _A2_MAX = np.float32(40)

    @njit(inline="always", fastmath=True)
    def _gauss_tail(s):
        """(Φ(-|s|), exp(-s²/2)) with exp(-s²/2) = 0 beyond |s| ≈ 8.9; vectorizable, absolute
        error of Φ ≤ 1e-7. φ(s) = exp(-s²/2)/√(2π) comes from the same exp."""
        a = abs(s) * _RSQRT2
        t = _ONE / (_ONE + _P * a)
        poly = _A[0] + t * (_A[1] + t * (_A[2] + t * (_A[3] + t * _A[4])))
        e = _exp_nonpos(-a * a) if a * a < _A2_MAX else _ZERO
        return _HALF * t * poly * e, e

    @njit(inline="always", fastmath=True)
    def _gauss_cdf(s, half_erfc):
        """Φ(s) from Φ(-|s|)"""
        return half_erfc if s < 0 else _ONE - half_erfc

    # error_model="numpy": with numba's default ("python") the division in _gauss_cdf gets a
    # zero check that keeps the loop from vectorizing (5x slower); parallel=True kernels
    # have the numpy model already
    @njit(fastmath=True, cache=True, inline="never", error_model="numpy")
    def _fwd_rows(h, bias, y, base, lo_seed, hi_seed, threshold, scale):
        """One block of rows: h, y (R, C) are its own rows, base the flat index of h[0, 0]."""
        R, C = h.shape
        for r in range(R):
            hr, yr = h[r], y[r]
            i0 = base + r * C
            for c in range(C):
                s = hr[c] + bias[c]
                keep = _hash_keeps(np.uint64(i0 + c), lo_seed, hi_seed, threshold)
                half_erfc, _ = _gauss_tail(s)
                yr[c] = s * _gauss_cdf(s, half_erfc) * (scale if keep else _ZERO)  # NaN stays NaN, like x * 0

    @njit(fastmath=True, cache=True, inline="never", error_model="numpy")
    def _bwd_rows(h, bias, g, gh, gb, base, lo_seed, hi_seed, threshold, scale):
        """gh = g · keep · scale · GELU'(h + bias) for one block of rows; gb (C,) += its column sums."""
        R, C = h.shape
        for r in range(R):
            hr, gr, ghr = h[r], g[r], gh[r]
            i0 = base + r * C
            for c in range(C):
                s = hr[c] + bias[c]
                keep = _hash_keeps(np.uint64(i0 + c), lo_seed, hi_seed, threshold)
                half_erfc, e = _gauss_tail(s)  # GELU'(s) = Φ(s) + s φ(s)
                v = gr[c] * (scale if keep else _ZERO) * (_gauss_cdf(s, half_erfc) + s * _RSQRT2PI * e)
                ghr[c] = v
                gb[c] += v

    @njit(parallel=True, fastmath=True, cache=True)
    def _fwd(h, bias, y, rows, seed, threshold, scale):
        R, C = h.shape
        lo_seed, hi_seed = seed & np.uint64(0xFFFFFFFF), seed >> np.uint64(32)
        for blk in prange((R + rows - 1) // rows):
            r0 = blk * rows
            r1 = min(R, r0 + rows)
            _fwd_rows(h[r0:r1], bias, y[r0:r1], r0 * C, lo_seed, hi_seed, threshold, scale)

    @njit(parallel=True, fastmath=True, cache=True)
    def _bwd(h, bias, g, gh, gb, rows, seed, threshold, scale):
        """gb (number of blocks, C): one bias-gradient partial per block."""
        R, C = h.shape
        lo_seed, hi_seed = seed & np.uint64(0xFFFFFFFF), seed >> np.uint64(32)
        for blk in prange((R + rows - 1) // rows):
            r0 = blk * rows
            r1 = min(R, r0 + rows)
            _bwd_rows(h[r0:r1], bias, g[r0:r1], gh[r0:r1], gb[blk], r0 * C, lo_seed, hi_seed, threshold, scale)


def _kernel_args(h, p):
    """(h as (R, C) numpy, rows per block, threshold, scale, serial?)"""
    h2 = h.reshape(-1, h.shape[-1]).numpy()
    return (h2, max(1, _BLOCK // h2.shape[1]), *mask_params(p), h2.size < SERIAL_BELOW)


class _BiasGeluDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, bias, p: float, seed: int):
        h, bias = h.contiguous(), bias.detach().contiguous()
        y = torch.empty_like(h)
        h2, rows, thr, scale, serial = _kernel_args(h, p)
        y2, b = y.view(h2.shape).numpy(), bias.numpy()
        if serial:
            _fwd_rows(h2, b, y2, 0, *seed_halves(seed), thr, scale)
        else:
            with kernel_threads():
                _fwd(h2, b, y2, rows, np.uint64(seed), thr, scale)
        ctx.save_for_backward(h, bias)
        ctx.p, ctx.seed = p, seed
        return y

    @staticmethod
    def backward(ctx, g):
        h, bias = ctx.saved_tensors
        g = g.contiguous()
        gh = torch.empty_like(h)
        h2, rows, thr, scale, serial = _kernel_args(h, ctx.p)
        g2, gh2, b = g.view(h2.shape).numpy(), gh.view(h2.shape).numpy(), bias.numpy()
        if serial:
            gb = bias.new_zeros(1, bias.shape[0])
            _bwd_rows(h2, b, g2, gh2, gb[0].numpy(), 0, *seed_halves(ctx.seed), thr, scale)
        else:
            gb = bias.new_zeros(-(-h2.shape[0] // rows), bias.shape[0])
            with kernel_threads():
                _bwd(h2, b, g2, gh2, gb.numpy(), rows, np.uint64(ctx.seed), thr, scale)
        return gh, gb.sum(0), None, None


def bias_gelu_dropout(h: torch.Tensor, bias: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``hash_dropout(F.gelu(h + bias), p, training)``, fused on float32 CPU tensors in
    training (h (…, C), bias (C,)); everything else takes that torch line."""
    check_p(p)
    if bias.shape != h.shape[-1:]:
        raise ValueError(f"bias of shape ({h.shape[-1]},) expected for h of shape {tuple(h.shape)}, got {tuple(bias.shape)}")
    fused = (training and 0.0 < p < 1.0 and njit is not None and h.device.type == "cpu" and h.dtype == bias.dtype == torch.float32
             and not reference_only())
    if not fused:
        return hash_dropout(F.gelu(h + bias), p, training)
    return _BiasGeluDropout.apply(h, bias, p, draw_seed())  # the seed hash_dropout would draw
