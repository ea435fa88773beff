"""The selective scan as two fused CPU kernels (numba), the CPU fast path of
``selective_scan``: same recurrence, same result as ``selective_scan_ref`` to float32
rounding (tests/test_mamba.py). Also the causal depthwise conv + SiLU in front of it as
one kernel pair (torch's depthwise conv backward took ~22 ms of a ~480 ms Mamba4Rec step on
one thread at B=128, L=200, E=128; the fused pair ~11 ms for forward and backward).

    h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t x_t) ⊗ B_t,   y_t = (h_t · C_t + D ⊙ x_t) ⊙ SiLU(z_t)

(D and the gate z optional, as in mamba_ssm's ``selective_scan_fn``.)

Why a kernel: the torch chunked scan (selective_scan.py) is a loop of whole-tensor ops, each
a pass over a (B, ·, E, N) slice; at a training batch (B=128, L=200, E=128, N=32) those
slices do not stay in cache and the scan's forward+backward took longer than the rest of
the Mamba4Rec step. Here one batch row at a time runs the whole recurrence with its state
(N, E) in L1: per row, per step, per state n, one vector loop over the E channels does
the decay, the update and the read-out. Measured on the 2-core Xeon at that size (2
threads, fwd / bwd): 0.031 / 0.093 s vs 0.117 / 0.268 s for the torch chunked scan.

* layout: x, Δ (B, L, E); A transposed to (N, E) so that the innermost loop (over E) is
  contiguous everywhere; B, C (B, L, N) are read as scalars inside it.
* the forward keeps the state before every SEGMENT-th step; the backward reruns one
  segment from its checkpoint (states and decays into a small buffer) and then walks it
  backwards with the adjoint g_t = gy_t C_t + exp(Δ_{t+1} A) ⊙ g_{t+1}.
* exp: LLVM does not vectorize libm's expf (numba has no SVML on these wheels), so
  ``_exp_nonpos`` computes exp(x) for x ≤ 0 by range reduction x = k ln2 + r, a degree-6
  polynomial for e^r on |r| ≤ ln2/2 and 2^k from the exponent bits; measured relative
  error ≤ 5e-7 for -87 ≤ x ≤ 0 as compiled in the kernels (fastmath; 2.5e-7 without), with
  ln 2 split in two (Cody-Waite); inputs below -87 give ≈ 1.6e-38 instead of underflowing
  to denormals, and x > 0 is out of its domain (``applicable`` checks A ≤ 0). Decays exp(Δ A) are ≤ 1 since Δ ≥ 0 and A < 0.
* gradients of B and C are sums over E and of A sums over the batch: rows run in parallel
  (prange over B) and each writes only its own slice, so there are no races; A's per-row
  partials (B, N, E) are summed afterwards by torch.
* float32 only (the bit tricks are float32's); other dtypes take the torch path.

Compilation happens on first use and is cached on disk (``cache=True``).

On AVX-512 hosts with a C compiler, ``NumbaScan`` runs the same two kernels written in C
instead (``scan_avx512.c``, loaded by ``native.py``; ~1.6x faster at an ML-1M batch, tested against the same
reference; ``PERSEQ_NATIVE=0`` or ``USE_NATIVE = False`` keeps these).
"""
from __future__ import annotations

import contextlib
import math
import os
import threading

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import get_num_threads, njit, prange, set_num_threads, types
from numba.core import codegen as numba_codegen
from numba.extending import intrinsic
from torch.autograd.function import once_differentiable

from . import native

#: run the scan through the C kernels of ``native`` where they load (tests switch it off to
#: check these numba kernels on their own)
USE_NATIVE = True


def _native_lib():
    return native.library() if USE_NATIVE else None


def _native_threads() -> int:
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))

# numba's default OpenMP threading layer brings a second OpenMP runtime next to torch's, and
# its idle workers spin after every parallel region while torch's threads work: a Mamba4Rec
# training step at B=128, L=10 took 1.15 s under it against 0.43 s with the plain
# "workqueue" pool (1 torch thread, busy machine). An explicit NUMBA_THREADING_LAYER wins.
# That pool aborts the process when two Python threads enter it at once, so every perseq
# kernel call holds ``_POOL_LOCK`` (the work inside is parallel already). This is a
# process-wide numba setting: other numba code in the same process that runs parallel
# kernels from several threads should set NUMBA_THREADING_LAYER itself.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"
_POOL_LOCK = threading.Lock()

# On AVX-512 hosts LLVM still prefers 256-bit vectors (its "prefer-256-bit" tuning, against
# the clock throttling of early AVX-512 parts). These kernels are exp/FMA-bound loops over
# 128 channels; 512-bit vectors made the scan 22% faster on the 2-core Xeon here (B=128,
# L=200, one thread: forward 0.067 -> 0.055 s, backward 0.129 -> 0.101 s). Like the
# threading layer this is process-wide and must precede the first numba compilation; an
# explicit NUMBA_CPU_FEATURES wins.
if "NUMBA_CPU_FEATURES" not in os.environ and numba.config.CPU_FEATURES is None:
    _host = numba_codegen.get_host_cpu_features()  # honours NUMBA_ENABLE_AVX=0; "" if LLVM cannot tell
    if "+avx512f" in _host.split(","):
        numba.config.CPU_FEATURES = _host + ",-prefer-256-bit"

#: steps between kept states (forward) = steps rerun at once (backward). The rerun buffers
#: (SEGMENT+1 states and SEGMENT decays of (N, E)) stay in L2 at E=128, N=32 up to about
#: 64; measured backward at B=128, L=200, 2 threads: 8 -> 0.115 s, 16 -> 0.117, 32 -> 0.093.
SEGMENT = 32

_LOG2E = np.float32(1.4426950408889634)
# ln 2 in two parts (Cody-Waite): k · _LN2_HI is exact for the |k| ≤ 126 used here
_LN2_HI = np.float32(0.693145751953125)
_LN2_LO = np.float32(1.428606765330187e-06)
_LOWEST = np.float32(-87.0)  # exp(-87) ≈ 1.6e-38, still a normal float32
_ONE, _HALF = np.float32(1.0), np.float32(0.5)
_C2, _C3, _C4, _C5, _C6 = (np.float32(1 / math.factorial(k)) for k in range(2, 7))


@intrinsic
def _int_bits_as_float32(typingctx, i):
    """Reinterpret the low 32 bits of an integer as a float32 (an LLVM bitcast, which the
    loop vectorizer handles, unlike a call into libm)."""
    if not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if i.bitwidth != 32:
            v = builder.trunc(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(i), codegen


@njit(inline="always", fastmath=True)
def _exp_nonpos(x):
    x = max(x, _LOWEST)
    # nearest integer, |r| ≤ ln2 / 2. np.floor, not math.floor: numba's math.floor returns an
    # int64, so the vectorized loop converted every lane to int64 and back (8-lane halves of
    # a 16-lane vector); that alone cost ~45% of the scan's forward (B=128, L=200, one
    # thread: 56 -> 31 ms), with bitwise the same result
    k = np.floor(x * _LOG2E + _HALF)
    r = (x - k * _LN2_HI) - k * _LN2_LO
    p = _ONE + r * (_ONE + r * (_HALF + r * (_C3 + r * (_C4 + r * (_C5 + r * _C6)))))
    return p * _int_bits_as_float32((np.int32(k) + np.int32(127)) << np.int32(23))  # p · 2^k


@njit(inline="always", fastmath=True)
def _sigmoid(s):
    z = _exp_nonpos(-abs(s))  # exp(-|s|) ∈ (0, 1]: never overflows
    return (_ONE if s >= 0 else z) / (_ONE + z)


@njit(inline="always", fastmath=True)
def _silu_grad(g, s, sig):
    """g · SiLU'(s) with sig = σ(s): SiLU'(s) = σ(s) (1 + s (1 - σ(s))). One place for the
    conv and HSTU attention backwards, each of which has σ(s) at hand already."""
    return g * sig * (_ONE + s * (_ONE - sig))


_L3, _L5, _L7, _L9, _L11, _L13 = (np.float32(1 / k) for k in (3, 5, 7, 9, 11, 13))


@njit(inline="always", fastmath=True)
def _softplus(v):
    """log(1 + e^v) = max(v, 0) + log1p(e^-|v|), vectorizable: with w = e^-|v| ∈ (0, 1] and
    s = w / (2 + w) ≤ 1/3, log1p(w) = 2 atanh(s) = 2 (s + s³/3 + ... + s¹³/13); the next
    term is below 2e-8 relative. (libm's log1p does not vectorize, as expf does not.)"""
    w = _exp_nonpos(-abs(v))
    sv = w / (np.float32(2) + w)
    q = sv * sv
    p = _ONE + q * (_L3 + q * (_L5 + q * (_L7 + q * (_L9 + q * (_L11 + q * _L13)))))
    return max(v, np.float32(0)) + np.float32(2) * sv * p


@njit(inline="always", fastmath=True)
def _delta(dlr, WT, lr, dbias, sp, v, out):
    """out (E,) <- Δ_t = softplus(v) when ``sp``, else v, where v (E,) <- dlr WT + dbias when
    ``lr`` (dlr (R,): Δ's low-rank input, WT (R, E): the dt projection's weight, transposed),
    else dlr + dbias (dlr (E,)). mamba_ssm's delta_bias and delta_softplus, plus the dt
    projection itself: as torch ops those were a rank-R matmul forward and two backward, a
    bias add, a softplus and a bias-gradient sum, each a pass over (B, L, E) per step."""
    E = out.shape[0]
    if lr:
        for e in range(E):
            v[e] = dbias[e]
        for r in range(WT.shape[0]):
            c = dlr[r]
            wr = WT[r]
            for e in range(E):
                v[e] += c * wr[e]
    else:
        for e in range(E):
            v[e] = dlr[e] + dbias[e]
    if sp:
        for e in range(E):
            out[e] = _softplus(v[e])
    else:
        for e in range(E):
            out[e] = v[e]


@njit(parallel=True, fastmath=True, cache=True)
def _scan_fwd(x, dl, WT, lr, dbias, sp, AT, Bm, Cm, D, z, gate, S, y, u, ck):
    """x (B, L, E); dl (B, L, R) with WT (R, E) when ``lr``, else dl (B, L, E); dbias (E,);
    AT (N, E); Bm, Cm (B, L, N); D (E,); z (B, L, E), read only when ``gate`` -> y (B, L, E)
    = (scan + D ⊙ x) [⊙ SiLU(z)] with Δ as ``_delta`` makes it; with the gate, u (B, L, E)
    gets scan + D ⊙ x (for ∂/∂z); ck (B, ⌈L/S⌉, N, E) gets the state before steps 0, S, 2S, ..."""
    Bsz, L, E = x.shape
    N = AT.shape[0]
    for b in prange(Bsz):
        h = np.zeros((N, E), np.float32)
        dx = np.empty(E, np.float32)
        acc = np.empty(E, np.float32)
        dlt = np.empty(E, np.float32)  # Δ_t
        vt = np.empty(E, np.float32)  # Δ_t before the softplus
        for t in range(L):
            if t % S == 0:
                ck[b, t // S] = h
            _delta(dl[b, t], WT, lr, dbias, sp, vt, dlt)
            xt = x[b, t]
            for e in range(E):
                dx[e] = dlt[e] * xt[e]
                acc[e] = D[e] * xt[e]
            for n in range(N):
                hn = h[n]
                An = AT[n]
                bn = Bm[b, t, n]
                cn = Cm[b, t, n]
                for e in range(E):
                    v = _exp_nonpos(dlt[e] * An[e]) * hn[e] + dx[e] * bn
                    hn[e] = v
                    acc[e] += v * cn
            yt = y[b, t]
            if gate:
                zt = z[b, t]
                u[b, t] = acc
                for e in range(E):
                    yt[e] = acc[e] * zt[e] * _sigmoid(zt[e])
            else:
                for e in range(E):
                    yt[e] = acc[e]


@njit(parallel=True, fastmath=True, cache=True)
def _scan_bwd(x, dl, WT, lr, dbias, sp, AT, Bm, Cm, D, z, u, gate, gout, ck, S, gx, gdl, gWT, gbias, gAT, gB, gC, gD,
              gz):
    """Adjoints of ``_scan_fwd`` from gout = ∂loss/∂y: gx (B, L, E), gdl (shaped as dl);
    per-row partials (summed by the caller) gWT (B, R, E), written only when ``lr``, gbias
    (B, E), gAT (B, N, E) and gD (B, E); gB, gC (B, L, N); gz (B, L, E), written only when
    ``gate``."""
    Bsz, L, E = x.shape
    N = AT.shape[0]
    nseg = (L + S - 1) // S
    for b in prange(Bsz):
        hs = np.empty((S + 1, N, E), np.float32)  # states of the segment being walked
        av = np.empty((S, N, E), np.float32)  # its decays
        ds = np.empty((S, E), np.float32)  # and its Δ
        vs = np.empty((S, E), np.float32)  # and Δ before the softplus
        g = np.zeros((N, E), np.float32)  # adjoint of the state
        dx = np.empty(E, np.float32)
        gyt = np.empty(E, np.float32)  # ∂loss/∂(scan + D x) at step t
        sg = np.empty(E, np.float32)  # σ(z_t)
        gdx = np.empty(E, np.float32)  # ∂loss/∂(Δx)
        gd = np.empty(E, np.float32)  # ∂loss/∂Δ through the decays
        gv = np.empty(E, np.float32)  # ∂loss/∂(Δ before the softplus)
        gAb = gAT[b]
        gDb = gD[b]
        gbb = gbias[b]
        for seg in range(nseg - 1, -1, -1):
            t0 = seg * S
            t1 = min(L, t0 + S)
            hs[0] = ck[b, seg]
            for i in range(t1 - t0):  # rerun the segment
                t = t0 + i
                dlt = ds[i]
                _delta(dl[b, t], WT, lr, dbias, sp, vs[i], dlt)
                xt = x[b, t]
                for n in range(N):
                    An = AT[n]
                    bn = Bm[b, t, n]
                    hp = hs[i, n]
                    hc = hs[i + 1, n]
                    an = av[i, n]
                    for e in range(E):
                        a = _exp_nonpos(dlt[e] * An[e])
                        an[e] = a
                        hc[e] = a * hp[e] + dlt[e] * xt[e] * bn
            for i in range(t1 - t0 - 1, -1, -1):  # and walk it backwards
                t = t0 + i
                dlt = ds[i]
                xt = x[b, t]
                go = gout[b, t]
                if gate:  # y = u ⊙ SiLU(z): ∂/∂u = go ⊙ SiLU(z)
                    zt = z[b, t]
                    for e in range(E):
                        sg[e] = _sigmoid(zt[e])
                        gyt[e] = go[e] * zt[e] * sg[e]
                else:
                    for e in range(E):
                        gyt[e] = go[e]
                for e in range(E):
                    dx[e] = dlt[e] * xt[e]
                    gdx[e] = 0
                    gd[e] = 0
                for n in range(N):
                    gn = g[n]
                    An = AT[n]
                    an = av[i, n]
                    hp = hs[i, n]
                    hc = hs[i + 1, n]
                    gAn = gAb[n]
                    bn = Bm[b, t, n]
                    cn = Cm[b, t, n]
                    sc = np.float32(0)
                    sb = np.float32(0)
                    for e in range(E):
                        v = gn[e] + gyt[e] * cn  # total adjoint of h_t
                        sc += gyt[e] * hc[e]  # ∂/∂C_t
                        q = v * an[e] * hp[e]  # ∂/∂(Δ_t A)
                        gd[e] += q * An[e]
                        gAn[e] += q * dlt[e]
                        gdx[e] += v * bn
                        sb += v * dx[e]  # ∂/∂B_t
                        gn[e] = v * an[e]  # handed back to step t - 1
                    gC[b, t, n] = sc
                    gB[b, t, n] = sb
                vt = vs[i]
                for e in range(E):
                    gx[b, t, e] = gdx[e] * dlt[e] + D[e] * gyt[e]
                    gde = gdx[e] * xt[e] + gd[e]  # ∂loss/∂Δ_t
                    # through the softplus when there is one: softplus'(v) = σ(v)
                    gve = gde * _sigmoid(vt[e]) if sp else gde
                    gv[e] = gve
                    gbb[e] += gve
                    gDb[e] += gyt[e] * xt[e]
                gdlt = gdl[b, t]
                if lr:  # v = dl WT + dbias
                    dlr = dl[b, t]
                    for r in range(WT.shape[0]):
                        wr = WT[r]
                        gwr = gWT[b, r]
                        c = dlr[r]
                        sr = np.float32(0)
                        for e in range(E):
                            sr += gv[e] * wr[e]
                            gwr[e] += c * gv[e]
                        gdlt[r] = sr
                else:
                    for e in range(E):
                        gdlt[e] = gv[e]
                if gate:
                    zt = z[b, t]
                    ut = u[b, t]
                    gzt = gz[b, t]
                    for e in range(E):
                        # g · SiLU'(z) as _silu_grad, written out: through the helper
                        # LLVM contracts it differently (last bits of ∂/∂z change)
                        gzt[e] = go[e] * ut[e] * sg[e] * (_ONE + zt[e] * (_ONE - sg[e]))


@njit(inline="always", fastmath=True)
def _conv_pre(x, wT, bias, b, t, acc):
    """acc (E,) <- the causal depthwise conv at (b, t) before the activation: bias + Σ_k
    wT[k] ⊙ x[b, t-(W-1)+k] over the taps that fall inside the sequence."""
    E, W = x.shape[2], wT.shape[0]
    for e in range(E):
        acc[e] = bias[e]
    for k in range(max(0, W - 1 - t), W):
        xr = x[b, t - (W - 1) + k]
        wk = wT[k]
        for e in range(E):
            acc[e] += wk[e] * xr[e]


@njit(parallel=True, fastmath=True, cache=True)
def _conv_silu_fwd(x, wT, bias, y):
    """y = SiLU(causal depthwise conv): x (B, L, E), wT (W, E), bias (E,) -> y (B, L, E);
    output t reads inputs t-W+1..t, zeros before the start."""
    Bsz, L, E = x.shape
    for b in prange(Bsz):
        acc = np.empty(E, np.float32)
        for t in range(L):
            _conv_pre(x, wT, bias, b, t, acc)
            yr = y[b, t]
            for e in range(E):
                yr[e] = acc[e] * _sigmoid(acc[e])


@njit(parallel=True, fastmath=True, cache=True)
def _conv_silu_bwd(x, wT, bias, gy, gs, gx, gwT):
    """Adjoints of ``_conv_silu_fwd``: gs (B, L, E) = ∂loss/∂(conv output before the SiLU),
    whose sum is the bias gradient; gx (B, L, E); gwT (B, W, E) per-row partials."""
    Bsz, L, E = x.shape
    W = wT.shape[0]
    for b in prange(Bsz):
        acc = np.empty(E, np.float32)
        gwb = gwT[b]
        for t in range(L):  # recompute the pre-activation s; SiLU'(s) = σ(s)(1 + s(1 - σ(s)))
            _conv_pre(x, wT, bias, b, t, acc)
            gr = gy[b, t]
            gsr = gs[b, t]
            for e in range(E):
                gsr[e] = _silu_grad(gr[e], acc[e], _sigmoid(acc[e]))
        for t in range(L):  # input t feeds output t + j through tap W-1-j
            xr = x[b, t]
            gxr = gx[b, t]
            for e in range(E):
                gxr[e] = 0
            for j in range(min(W, L - t)):
                gsr = gs[b, t + j]
                wk = wT[W - 1 - j]
                gwk = gwb[W - 1 - j]
                for e in range(E):
                    gxr[e] += wk[e] * gsr[e]
                    gwk[e] += gsr[e] * xr[e]


@contextlib.contextmanager
def kernel_threads():
    """Run numba kernels with torch's thread count (train.threads), one caller at a time."""
    with _POOL_LOCK:
        prev = get_num_threads()
        set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        try:
            yield
        finally:
            set_num_threads(prev)


class NumbaScan(torch.autograd.Function):
    """y = (scan(x, Δ, A, B, C) + D ⊙ x) [⊙ SiLU(z)] with Δ = delta W_Δᵀ + delta_bias, through
    softplus when ``delta_softplus``; float32 CPU tensors x (B, L, E), delta (B, L, R) with
    delta_proj W_Δ (E, R), or delta (B, L, E) and delta_proj None (W_Δ = identity), A (E, N),
    B, C (B, L, N), D (E,) or None, z (B, L, E) or None, delta_bias (E,) or None.

    The D term and the gate are inside the kernels (as in mamba_ssm's ``selective_scan_fn``
    with ``z``): as separate torch ops they were ~6 passes over (B, L, E) forward and ~10
    backward; here they cost one pass at the end of each step. The forward keeps the
    pre-gate output u for ∂/∂z (B·L·E floats); recomputing it in the backward's walk instead
    cost a load and a store per state element there, 10-15% of the backward."""

    @staticmethod
    def forward(ctx, x, delta, A, B, C, D, z, delta_bias, delta_softplus, delta_proj):
        x, delta, B, C = (t.contiguous() for t in (x, delta, B, C))
        bias = x.new_zeros(x.shape[2]) if delta_bias is None else delta_bias.detach().contiguous()
        WT = x.new_empty(0, x.shape[2]) if delta_proj is None else delta_proj.detach().t().contiguous()  # (R, E)
        AT = A.t().contiguous()  # (N, E)
        Bsz, L, E = x.shape
        Dk = x.new_zeros(E) if D is None else D.detach().contiguous()
        zk = x.new_empty(0, 0, 0) if z is None else z.contiguous()
        y, u = x.new_empty(Bsz, L, E), torch.empty_like(zk)
        S = SEGMENT
        ck = x.new_empty(Bsz, -(-L // S), AT.shape[0], E)
        lib = _native_lib()
        if lib is not None:
            native.scan_fwd(lib, x, delta, WT, delta_proj is not None, bias, bool(delta_softplus), AT, B, C, Dk, zk,
                            z is not None, S, y, u, ck, _native_threads())
        else:
            with kernel_threads():
                _scan_fwd(x.numpy(), delta.numpy(), WT.numpy(), delta_proj is not None, bias.numpy(),
                          bool(delta_softplus), AT.numpy(), B.numpy(), C.numpy(), Dk.numpy(), zk.numpy(), z is not None,
                          S, y.numpy(), u.numpy(), ck.numpy())
        ctx.native = lib  # the backward runs the same kernels
        ctx.save_for_backward(x, delta, WT, bias, AT, B, C, Dk, zk, u, ck)
        ctx.softplus, ctx.has_bias, ctx.lowrank = bool(delta_softplus), delta_bias is not None, delta_proj is not None
        ctx.S = S  # the backward must rerun segments of the length the states were kept at
        ctx.has_D, ctx.gate = D is not None, z is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, delta, WT, bias, AT, B, C, Dk, zk, u, ck = ctx.saved_tensors
        gy = gy.contiguous()
        gx, gdelta = torch.empty_like(x), torch.empty_like(delta)
        gWT = x.new_zeros(x.shape[0], *WT.shape)  # (B, R, E)
        gbias = x.new_zeros(x.shape[0], x.shape[2])  # (B, E)
        gB, gC = torch.empty_like(B), torch.empty_like(C)
        gAT = x.new_zeros(x.shape[0], *AT.shape)  # (B, N, E)
        gD = x.new_zeros(x.shape[0], x.shape[2])  # (B, E)
        gz = torch.empty_like(zk)
        if ctx.native is not None:
            native.scan_bwd(ctx.native, x, delta, WT, ctx.lowrank, bias, ctx.softplus, AT, B, C, Dk, zk, u, ctx.gate, gy,
                            ck, ctx.S, gx, gdelta, gWT, gbias, gAT, gB, gC, gD, gz, _native_threads())
        else:
            with kernel_threads():
                _scan_bwd(x.numpy(), delta.numpy(), WT.numpy(), ctx.lowrank, bias.numpy(), ctx.softplus, AT.numpy(),
                          B.numpy(), C.numpy(), Dk.numpy(), zk.numpy(), u.numpy(), ctx.gate, gy.numpy(), ck.numpy(),
                          ctx.S, gx.numpy(), gdelta.numpy(), gWT.numpy(), gbias.numpy(), gAT.numpy(), gB.numpy(),
                          gC.numpy(), gD.numpy(), gz.numpy())
        return (gx, gdelta, gAT.sum(0).t(), gB, gC, gD.sum(0) if ctx.has_D else None, gz if ctx.gate else None,
                gbias.sum(0) if ctx.has_bias else None, None, gWT.sum(0).t() if ctx.lowrank else None)


class NumbaConvSiLU(torch.autograd.Function):
    """SiLU(causal depthwise conv); float32 CPU tensors x (B, L, E), weight (E, W), bias (E,)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x = x.contiguous()
        wT, bias = weight.t().contiguous(), bias.contiguous()  # (W, E), (E,)
        y = torch.empty_like(x)
        with kernel_threads():
            _conv_silu_fwd(x.numpy(), wT.numpy(), bias.numpy(), y.numpy())
        ctx.save_for_backward(x, wT, bias)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, wT, bias = ctx.saved_tensors
        gy = gy.contiguous()
        gs, gx = torch.empty_like(x), torch.empty_like(x)
        gwT = x.new_zeros(x.shape[0], *wT.shape)  # (B, W, E)
        with kernel_threads():
            _conv_silu_bwd(x.numpy(), wT.numpy(), bias.numpy(), gy.numpy(), gs.numpy(), gx.numpy(), gwT.numpy())
        return gx, gwT.sum(0).t(), gs.sum((0, 1))


#: dtypes the kernel takes (half precision is scanned in float32, as in the torch path)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def applicable(A: torch.Tensor) -> bool:
    """Whether the kernel's exp(Δ A) is valid: A ≤ 0 (Δ ≥ 0 is assumed, as softplus makes
    it; checking A costs nothing, checking Δ would cost a pass over (B, L, E))."""
    return bool((A <= 0).all())


def _check_kernel_input(x):
    if x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the numba kernels run float32 (or half-precision, computed in float32) CPU tensors, got {x.dtype} on {x.device}")


def selective_scan_numba(x, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, delta_proj=None):
    """Same signature and result as ``selective_scan_ref`` for float32 CPU tensors."""
    _check_kernel_input(x)
    if not applicable(A):
        raise ValueError("the numba scan needs A <= 0 (Mamba's A = -exp(A_log)); its exp() is only valid for "
                         "non-positive arguments, with delta >= 0; use backend='torch' for other values")
    dtype = x.dtype
    f32 = lambda t: None if t is None else t.to(torch.float32)  # noqa: E731
    y = NumbaScan.apply(*(f32(t) for t in (x, delta, A, B, C, D, z, delta_bias)), delta_softplus, f32(delta_proj))
    return y.to(dtype)


def causal_conv1d_silu_numba(x, weight, bias):
    """SiLU(causal depthwise conv), as ``causal_conv1d(..., activation="silu")``: x (B, L, E),
    weight (E, W), bias (E,); computed in float32."""
    _check_kernel_input(x)
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[2] or bias.shape != (x.shape[2],):
        raise ValueError(f"causal conv: x (B, L, E), weight (E, W), bias (E,) expected, got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(bias.shape)}")  # the kernel does not bounds-check
    return NumbaConvSiLU.apply(x.float(), weight.float(), bias.float()).to(x.dtype)
