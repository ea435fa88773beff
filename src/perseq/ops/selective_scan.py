"""The Mamba selective scan (S6; Gu & Dao, 2023) and the causal depthwise conv in front of it.

Per channel e and state n, with inputs x, Δ (B, L, E), A (E, N), B, C (B, L, N), D (E,):

    h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t x_t) ⊗ B_t        h: (B, E, N), h_0 = 0
    y_t = h_t · C_t + D ⊙ x_t                             y: (B, L, E)

Channel-last layout (B, L, ·) like the rest of perseq; ``mamba_ssm`` wants (B, E, L), and the
``cuda`` backend transposes. Δ ≥ 0 (softplus) and A < 0 are assumed, so every decay
exp(Δ A) is ≤ 1.

Three implementations that agree (tests/test_mamba.py checks values and gradients):

* ``selective_scan_ref``: the sequential loop, the definition; used by tests only.
* ``selective_scan_chunked``: the CPU/training path, a two-level (chunked) scan:
    1. the sequence is cut into chunks of K steps; inside every chunk the recurrence runs
       from a zero state, all chunks side by side (K loop steps over (B, L/K, E, N));
    2. a short carry loop over the L/K chunks: start_{c+1} = exp(A ΣΔ_c) ⊙ start_c +
       end_c, the whole-chunk decay from the summed log-decays Δ A ≤ 0; no exp() in this
       file ever sees a positive number, however large Δ|A| gets;
    3. every chunk runs again from its true start and reads y out.
  Work is linear in L at a fixed chunk size, with 2K + L/K Python steps instead of L. A
  custom backward runs the same two-level scan backwards for the adjoint and keeps only
  the inputs plus the state every SEGMENT steps (a quarter of the (B, L, E, N) states,
  vs. several full copies under autograd of the loop), recomputing the rest.

  Why not the quadratic "SSD" chunk form of Mamba-2 (masked K×K decay matrix from segment
  sums of the log-decays, then matmuls)? There A is one scalar per head, so the decay
  matrix is (K, K) per head. Here (Mamba-1, A of shape (E, N)) the decay exp(A[e, n]
  ΣΔ[e]) differs for every (e, n): the matrix is (B, K, K, E, N) per chunk, K/2 times the
  exp() work of the states themselves. Measured forward at B=128, L=192, E=128, N=32 on one
  CPU thread: 9.2 s (K=8) and 19.4 s (K=16) for that form, 0.16 s for the recurrence.

  The chunk size trades Python steps against cache: one step touches a (B, L/K, E, N)
  slice, and once that is larger than about 2^17 elements it streams through memory.
  A training batch (B=128, E=128, N=32) is 2^19 elements per chunk already, so the auto
  size (``chunk=None``) runs it as one chunk; small batches of long sequences get several
  chunks side by side (numbers in ``_auto_chunk``).
* ``selective_scan_step``: one step of the recurrence, for O(1)-per-event serving.

``selective_scan(..., backend=)`` picks between the chunked path, the fused CPU kernels of
``scan_numba.py`` (float32; the default on CPU, about 3x faster than the chunked path at a
training batch) and ``mamba_ssm``'s CUDA kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import reference_only

try:  # optional fused CUDA kernels (pip install mamba-ssm causal-conv1d; they build with nvcc)
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan_fn
except ImportError:
    _mamba_selective_scan_fn = None
try:
    from causal_conv1d import causal_conv1d_fn as _causal_conv1d_fn
except ImportError:
    _causal_conv1d_fn = None
try:  # fused CPU kernels (numba, a regular dependency; the torch path covers its absence)
    from .scan_numba import KERNEL_DTYPES as _NUMBA_DTYPES, applicable as _numba_applicable
    from .scan_numba import causal_conv1d_silu_numba, selective_scan_numba
except ImportError:
    selective_scan_numba, causal_conv1d_silu_numba, _NUMBA_DTYPES, _numba_applicable = None, None, (), None

#: Auto chunk size: chunks run side by side, so one loop step touches a (B, L/K, E, N)
#: slice; it should hold about this many elements. Larger slices stream through memory
#: instead of staying in cache, smaller ones leave the step to Python/dispatch overhead.
#: CPU value measured (see ``_auto_chunk``); the GPU value is a guess (no GPU measured).
CPU_TARGET_STEP_ELEMENTS = 2**17
GPU_TARGET_STEP_ELEMENTS = 2**22

#: Steps between the states the forward keeps for the backward. Fewer kept states cost
#: longer recomputed segments that fall out of cache; scan forward+backward at B=128,
#: L=200 (one chunk): segment 2/4/8/16/64/200 -> 0.61/0.61/0.69/0.73/0.85/1.10 s;
#: peak memory of forward+backward there: 265 MiB, vs 2.1 GiB through the reference loop.
SEGMENT = 4

BACKENDS = ("auto", "torch", "numba", "cuda")


def _gate(y, x, D, z):
    """(y + D ⊙ x) ⊙ SiLU(z), the parts of a Mamba mixer after the scan proper (either optional)."""
    if D is not None:
        y = y + D * x
    return y if z is None else y * F.silu(z)


def _delta(delta, delta_bias, delta_softplus, delta_proj=None):
    """Δ = delta W_Δᵀ + delta_bias (W_Δ = delta_proj, or the identity when None), through
    softplus when asked (mamba_ssm's convention, plus the dt projection)."""
    if delta_proj is not None:
        delta = F.linear(delta, delta_proj)  # (B, L, R) -> (B, L, E)
    if delta_bias is not None:
        delta = delta + delta_bias
    return F.softplus(delta) if delta_softplus else delta


def selective_scan_ref(x, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, delta_proj=None):
    """Sequential reference: x, delta (B, L, E); A (E, N); B, C (B, L, N); D (E,); z (B, L, E)
    -> y (B, L, E) = (scan + D ⊙ x) ⊙ SiLU(z), D and z optional, with Δ = delta + delta_bias,
    through softplus when ``delta_softplus`` (as mamba_ssm's ``selective_scan_ref``). With
    ``delta_proj`` W_Δ (E, R), delta is Δ's low-rank input (B, L, R) and Δ = delta W_Δᵀ +
    delta_bias (Mamba's dt_proj, which the numba kernels fuse)."""
    _check_delta(x, delta, delta_proj)
    delta = _delta(delta, delta_bias, delta_softplus, delta_proj)
    dtype = x.dtype
    x, delta, A, B, C = (t.to(_compute_dtype(dtype)) for t in (x, delta, A, B, C))
    h = x.new_zeros(x.shape[0], x.shape[2], A.shape[1])  # (B, E, N)
    ys = []
    # unbind, not [:, t]: under autograd each [:, t] would go back through its own select,
    # writing a zero-filled (B, L, ·) gradient per step (O(L²)); unbind's backward stacks once
    for d_t, x_t, B_t, C_t in zip(delta.unbind(1), x.unbind(1), B.unbind(1), C.unbind(1)):
        h = torch.exp(d_t[:, :, None] * A) * h + (d_t * x_t)[:, :, None] * B_t[:, None, :]
        ys.append(torch.einsum("ben,bn->be", h, C_t))
    y = torch.stack(ys, 1)  # (B, L, E)
    return _gate(y, x, D, None if z is None else z.to(y.dtype)).to(dtype)


def selective_scan_step(h, x_t, delta_t, A, B_t, C_t, D=None):
    """One event: h (B, E, N), x_t, delta_t (B, E), B_t, C_t (B, N) -> (h, y_t (B, E)).

    The same arithmetic as one position of the scans, in O(1) time and memory with respect
    to how many events came before."""
    h = torch.exp(delta_t[:, :, None] * A) * h + (delta_t * x_t)[:, :, None] * B_t[:, None, :]  # (B, E, N)
    y = (h @ C_t[:, :, None]).squeeze(-1)  # (B, E)
    if D is not None:
        y = y + D * x_t
    return h, y


def selective_scan_chunked(x, delta, A, B, C, D=None, chunk: int | None = None, z=None, delta_bias=None,
                           delta_softplus=False, delta_proj=None):
    """Chunked parallel scan (see the module docstring): same signature and result as
    ``selective_scan_ref``, differentiable in every input. ``chunk`` None: ``_auto_chunk``."""
    if chunk is None:
        chunk = _auto_chunk(x.shape[0], x.shape[1], A.shape[0], A.shape[1], x.device.type)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    _check_delta(x, delta, delta_proj)
    delta = _delta(delta, delta_bias, delta_softplus, delta_proj)
    dtype = x.dtype
    x, delta, A, B, C = (t.to(_compute_dtype(dtype)) for t in (x, delta, A, B, C))
    y = _ChunkedScan.apply(x, delta, A, B, C, int(chunk))  # (B, L, E)
    return _gate(y, x, D, None if z is None else z.to(y.dtype)).to(dtype)


def selective_scan(x, delta, A, B, C, D=None, backend: str = "auto", chunk: int | None = None, z=None,
                   delta_bias=None, delta_softplus: bool = False, delta_proj=None):
    """y = (scan + D ⊙ x) ⊙ SiLU(z) (D, z optional) with Δ = delta + delta_bias, through
    softplus when ``delta_softplus`` (as mamba_ssm's ``selective_scan_fn``), or with
    ``delta_proj`` W_Δ (E, R) and delta (B, L, R), Δ = delta W_Δᵀ + delta_bias (the numba
    kernels fuse that projection; the other backends apply it first), by one of the
    backends. Dispatch:
    ``"cuda"`` = mamba_ssm's fused kernel (CUDA tensors, package installed),
    ``"numba"`` = the fused CPU kernels of ``scan_numba`` (CPU, float32 or half, A ≤ 0),
    ``"torch"`` = ``selective_scan_chunked`` (any device and dtype), ``"auto"`` = the first
    of cuda, numba, torch that can run these tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {backend!r}; valid: {', '.join(BACKENDS)}")
    _check_delta(x, delta, delta_proj)
    if reference_only():  # plain torch ops only (torch.func transforms; perseq.ops.reference_ops)
        return selective_scan_ref(x, delta, A, B, C, D, z, delta_bias, delta_softplus, delta_proj)
    if backend == "cuda" or (backend == "auto" and _mamba_selective_scan_fn is not None and x.is_cuda):
        return _scan_cuda(x, _delta(delta, None, False, delta_proj), A, B, C, D, z, delta_bias, delta_softplus)
    if backend == "numba":
        if selective_scan_numba is None:
            raise RuntimeError("selective-scan backend 'numba' needs the numba package (pip install numba); "
                               "use backend='torch' or 'auto' to run without it")
        return selective_scan_numba(x, delta, A, B, C, D, z, delta_bias, delta_softplus, delta_proj)
    if (backend == "auto" and selective_scan_numba is not None and x.device.type == "cpu" and x.dtype in _NUMBA_DTYPES
            and _numba_applicable(A)):
        return selective_scan_numba(x, delta, A, B, C, D, z, delta_bias, delta_softplus, delta_proj)
    return selective_scan_chunked(x, delta, A, B, C, D, chunk=chunk, z=z, delta_bias=delta_bias,
                                  delta_softplus=delta_softplus, delta_proj=delta_proj)


def _check_delta(x, delta, delta_proj):
    """delta must be (B, L, E) like x, or (B, L, R) with delta_proj (E, R): the numba kernels
    index without bounds checks."""
    B, L, E = x.shape
    want = (B, L, E) if delta_proj is None else (B, L, delta_proj.shape[-1])
    if tuple(delta.shape) != want or (delta_proj is not None and (delta_proj.dim() != 2 or delta_proj.shape[0] != E)):
        proj = "" if delta_proj is None else f" and delta_proj {tuple(delta_proj.shape)} (E={E}, R)"
        raise ValueError(f"delta of shape {want} expected for x of shape {tuple(x.shape)}{proj}, got {tuple(delta.shape)}")


def _scan_cuda(x, delta, A, B, C, D, z=None, delta_bias=None, delta_softplus=False):
    if _mamba_selective_scan_fn is None:
        raise RuntimeError(
            "selective-scan backend 'cuda' needs the mamba_ssm package (pip install mamba-ssm, "
            "built with nvcc for your CUDA); use backend='torch' or 'auto' to run without it"
        )
    if not x.is_cuda:
        raise RuntimeError(f"selective-scan backend 'cuda' needs CUDA tensors, got {x.device}")
    tr = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731  (B, L, ·) -> (B, ·, L)
    D = D.float() if D is not None else None  # the kernel reads D as float32
    bias = delta_bias.float() if delta_bias is not None else None
    y = _mamba_selective_scan_fn(tr(x), tr(delta), A.contiguous(), tr(B), tr(C), D, None if z is None else tr(z),
                                 bias, delta_softplus)  # (B, E, L)
    return y.transpose(1, 2)  # (B, L, E)


def _auto_chunk(batch: int, length: int, E: int, N: int, device_type: str = "cpu") -> int:
    """Chunk length whose per-step slice (batch, L/K, E, N) is near the target size.

    Measured forward+backward of the scan alone, one CPU thread, E=128, N=32, fp32 (CPU
    seconds on a shared 2-core Xeon): B=128, L=200 (2^19 elements per chunk): K=200 (one
    chunk) 0.65 s, K=100 0.95 s, K=64 1.33 s, K=32 1.32 s, K=16 1.61 s (autograd through
    the reference loop: 3.25 s). B=4, L=2048 (2^14 per chunk): K=32 0.33 s, K=64 0.28 s,
    K=128 0.24 s, K=256 (8 chunks, 2^17) 0.22 s, K=512 0.24 s, K=2048 0.31 s."""
    target = CPU_TARGET_STEP_ELEMENTS if device_type == "cpu" else GPU_TARGET_STEP_ELEMENTS
    n_chunks = max(1, target // max(1, batch * E * N))
    return max(1, -(-length // n_chunks))


def _compute_dtype(dtype):
    # half-precision decays underflow and their products lose the tail; scan in fp32 at least
    return torch.promote_types(dtype, torch.float32)


def _to_chunks(t, K, nc):
    """(B, L, F) -> (K, B, nc, F): zero-padded at the end, position-in-chunk first so that
    the loops below read contiguous (B, nc, F) slices. Δ = 0 in the padding makes the
    padded steps identities (decay 1, input 0): they change neither states nor gradients."""
    pad = nc * K - t.shape[1]
    if pad:
        t = F.pad(t, (0, 0, 0, pad))
    return t.reshape(t.shape[0], nc, K, t.shape[2]).permute(2, 0, 1, 3).contiguous()


def _from_chunks(t, L):
    """(K, B, nc, F) -> (B, L, F), dropping the padding."""
    K, Bsz, nc, Fdim = t.shape
    return t.permute(1, 2, 0, 3).reshape(Bsz, nc * K, Fdim)[:, :L]


class _ChunkedScan(torch.autograd.Function):
    """y_t = h_t · C_t without the D term; x, delta (B, L, E), A (E, N), B, C (B, L, N).

    Saves the inputs and the state every SEGMENT steps of every chunk; the backward
    recomputes one segment at a time. Decays exp(Δ_k A) are recomputed, never stored for
    the whole sequence: one step's (B, nc, E, N) slice stays in cache, while a (B, L, E, N)
    tensor streams through memory, and on CPU that costs more than the exp(). Work goes
    into preallocated buffers (``out=``, in-place): a fresh multi-MB tensor per step costs
    page faults (about 10% of the scan's time, measured)."""

    @staticmethod
    def forward(ctx, x, delta, A, B, C, chunk):
        Bsz, L, E = x.shape
        K = max(1, min(chunk, L))
        nc = -(-L // K)
        xc, dc, Bc, Cc = (_to_chunks(t, K, nc) for t in (x, delta, B, C))  # (K, B, nc, E|N)
        dx = (dc * xc)[..., None]  # (K, B, nc, E, 1)
        Bc = Bc[..., None, :]  # (K, B, nc, 1, N)
        dA = dc[..., None]  # (K, B, nc, E, 1); Δ A is the log-decay, ≤ 0
        a = xc.new_empty(Bsz, nc, E, A.shape[1])  # (B, nc, E, N) decay buffer

        # 1. chunk-end states from a zero start, all chunks at once; 2. the carry over the
        # chunks, with the whole-chunk decay exp(A ΣΔ) from the summed log-decays
        decay = torch.exp(dc.sum(0)[..., None] * A)  # (B, nc, E, N), ≤ 1
        if nc > 1:
            h = torch.zeros_like(a)
            for k in range(K):
                h.mul_(torch.mul(dA[k], A, out=a).exp_()).addcmul_(dx[k], Bc[k])
            starts = _carry(decay, h)  # (B, nc, E, N): state before each chunk's first step
        else:
            starts = torch.zeros_like(a)

        # 3. rerun every chunk from its true start, read the outputs out, and keep the
        # state every SEGMENT steps for the backward
        h = starts.clone()
        y = xc.new_empty(K, Bsz, nc, E)
        ckpt = [starts]
        for k in range(K):
            if k and k % SEGMENT == 0:
                ckpt.append(h.clone())
            h.mul_(torch.mul(dA[k], A, out=a).exp_()).addcmul_(dx[k], Bc[k])
            torch.matmul(h, Cc[k, ..., None], out=y[k, ..., None])  # (B, nc, E, 1)

        ctx.save_for_backward(x, delta, A, B, C, decay, *ckpt)
        ctx.K, ctx.nc = K, nc
        return _from_chunks(y, L)  # (B, L, E)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, delta, A, B, C, decay, *ckpt = ctx.saved_tensors
        K, nc = ctx.K, ctx.nc
        L = x.shape[1]
        xc, dc, Bc, Cc, gyc = (_to_chunks(t, K, nc) for t in (x, delta, B, C, gy))  # (K, B, nc, ·)
        dx = dc * xc  # (K, B, nc, E)
        dA = dc[..., None]
        outer_B = lambda k: (dx[k, ..., None], Bc[k, ..., None, :])  # noqa: E731  Δx ⊗ B, (B, nc, E, N)
        outer_C = lambda k: (gyc[k, ..., None], Cc[k, ..., None, :])  # noqa: E731  gy ⊗ C

        # adjoint of the states, g_k = C_k ⊗ gy_k + a_{k+1} ⊙ g_{k+1}: the same two-level
        # scan, backwards. First inside each chunk from a zero end, then what each chunk
        # hands to the end of the chunk before it
        tmp = torch.empty_like(ckpt[0])  # (B, nc, E, N)
        g = torch.zeros_like(tmp)
        if nc > 1:
            for k in reversed(range(K)):
                g.addcmul_(*outer_C(k)).mul_(torch.mul(dA[k], A, out=tmp).exp_())
            g = _carry(decay, g, reverse=True)

        g_dx, gdelta_decay = torch.empty_like(xc), torch.empty_like(xc)  # (K, B, nc, E)
        gB, gC = torch.empty_like(Cc), torch.empty_like(Cc)  # (K, B, nc, N)
        gA = torch.zeros_like(tmp)  # summed over (B, nc) at the end
        S = min(SEGMENT, K)
        a, ah, hs = (tmp.new_empty((S,) + tmp.shape) for _ in range(3))  # per segment step
        q = torch.empty_like(tmp)
        for seg in reversed(range(len(ckpt))):
            # recompute this segment from its checkpoint: decay a_k, decayed previous state
            # a_k ⊙ h_{k-1} and state h_k for its steps k = k0 + i
            k0, k1 = seg * SEGMENT, min(K, (seg + 1) * SEGMENT)
            for i, k in enumerate(range(k0, k1)):
                torch.mul(dA[k], A, out=a[i]).exp_()
                torch.mul(a[i], hs[i - 1] if i else ckpt[seg], out=ah[i])
                torch.addcmul(ah[i], *outer_B(k), out=hs[i])
            for i, k in reversed(list(enumerate(range(k0, k1)))):
                g.addcmul_(*outer_C(k))  # total adjoint of h_k
                torch.mul(g, ah[i], out=q)  # ∂loss/∂(Δ_k A), (B, nc, E, N)
                torch.matmul(g, Bc[k, ..., None], out=g_dx[k, ..., None])  # (B, nc, E, 1)
                torch.matmul(dx[k, ..., None, :], g, out=gB[k, ..., None, :])  # (B, nc, 1, N)
                torch.matmul(gyc[k, ..., None, :], hs[i], out=gC[k, ..., None, :])
                gA.addcmul_(q, dA[k])
                torch.sum(q.mul_(A), -1, out=gdelta_decay[k])
                g.mul_(a[i])  # hand the adjoint back to step k - 1

        gx = _from_chunks(g_dx * dc, L)
        gdelta = _from_chunks(g_dx * xc + gdelta_decay, L)
        return gx, gdelta, gA.sum((0, 1)), _from_chunks(gB, L), _from_chunks(gC, L), None


def _carry(decay, local, reverse=False):
    """Linear recurrence over the chunk axis (dim 1). Forward: s_c = decay_c ⊙ s_{c-1} +
    local_c, returning the state *before* each chunk. Reverse: the adjoint handed to the
    end of each chunk by the chunks after it, s_c = decay_{c+1} ⊙ s_{c+1} + local_{c+1}
    (``local`` is then already decayed through its own chunk)."""
    out = torch.zeros_like(local)  # (B, nc, E, N)
    nc = local.shape[1]
    for c in range(nc - 1):
        if reverse:
            c = nc - 2 - c
            torch.addcmul(local[:, c + 1], decay[:, c + 1], out[:, c + 1], out=out[:, c])
        else:
            torch.addcmul(local[:, c], decay[:, c], out[:, c], out=out[:, c + 1])
    return out


def causal_conv1d(x, weight, bias=None, activation: str | None = None, backend: str = "auto"):
    """Causal depthwise conv: x (B, L, E), weight (E, W), bias (E,) -> (B, L, E); output t
    reads inputs t-W+1..t. activation None or "silu". Uses the ``causal_conv1d`` package's
    fused kernel for CUDA tensors when it is installed (backend "auto" or "cuda") and the
    fused numba conv+SiLU for CPU tensors it takes (activation "silu"; backend "auto" or
    "numba"), as the scan does."""
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown conv backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend != "torch" and _causal_conv1d_fn is not None and x.is_cuda:
        return _causal_conv1d_fn(x.transpose(1, 2), weight, bias, activation=activation).transpose(1, 2)
    if backend == "numba" and causal_conv1d_silu_numba is None:
        raise RuntimeError("conv backend 'numba' needs the numba package (pip install numba); "
                           "use backend='torch' or 'auto' to run without it")
    # the numba kernel fuses the SiLU; without an activation the torch conv runs
    if activation == "silu" and causal_conv1d_silu_numba is not None and not reference_only() and (
            backend == "numba" or (backend == "auto" and x.device.type == "cpu" and x.dtype in _NUMBA_DTYPES)):
        return causal_conv1d_silu_numba(x, weight, bias if bias is not None else x.new_zeros(weight.shape[0]))
    L, W = x.shape[1], weight.shape[1]
    y = F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=W - 1, groups=weight.shape[0])[..., :L]  # (B, E, L)
    y = y.transpose(1, 2)  # (B, L, E)
    return F.silu(y) if activation == "silu" else y


def causal_conv1d_step(conv_state, x_t, weight, bias=None, activation: str | None = None):
    """One event of ``causal_conv1d``: conv_state (B, E, W-1) holds the last W-1 inputs
    (zeros before the first event, as the left padding of the full conv); x_t (B, E).
    Returns (new conv_state, y_t (B, E))."""
    window = torch.cat([conv_state, x_t[:, :, None]], 2)  # (B, E, W)
    y = (window * weight).sum(-1)
    if bias is not None:
        y = y + bias
    if activation == "silu":
        y = F.silu(y)
    return window[:, :, 1:], y
