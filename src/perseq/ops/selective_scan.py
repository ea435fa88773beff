"""The Mamba selective scan (S6; Gu & Dao, 2023) and the causal depthwise conv in front of it.

Per channel e and state n, with inputs x, Δ (B, L, E), A (E, N), B, C (B, L, N), D (E,):

    h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t x_t) ⊗ B_t        h: (B, E, N), h_0 = 0
    y_t = h_t · C_t + D ⊙ x_t                             y: (B, L, E)

Channel-last layout (B, L, ·) like the rest of perseq; ``mamba_ssm`` wants (B, E, L), and the
``cuda`` backend transposes. Δ ≥ 0 (softplus) and A < 0 are assumed, so every decay
exp(Δ A) is ≤ 1.

Three implementations that agree (tests/test_mamba.py checks values and gradients):

* ``selective_scan_ref``: the sequential loop, the definition; used by tests only.
* ``selective_scan_chunked``: the CPU/training path. Why not the quadratic "SSD" form of
  Mamba-2 (masked K×K decay matrix per chunk, then matmuls)? There A is one scalar per
  head, so the decay matrix is (K, K) per head. Here the decay exp(A[e, n] ΣΔ[e]) differs
  for every (e, n), so that matrix is (B, K, K, E, N) per chunk: K/2 times the work of
  the states themselves (B, L, E, N), all of it in exp(), and more memory than the
  recurrence. Measured on this CPU at B=128, L=200, E=128, N=32: 0.34 s for the
  recurrence, 3.2 s for the SSD form at K=16 (forward only). So the chunks are used
  the other way round:
    1. inside every chunk, the recurrence from a zero state, run for all chunks at once
       (K steps over (B, L/K, E, N) tensors);
    2. a carry loop over chunks (L/K steps over (B, E, N)): start_{c+1} = exp(A ΣΔ_c) ⊙
       start_c + end_c, the whole-chunk decay taken from the cumulative sum of the
       log-decays Δ A, which is ≤ 0, so no exp() ever sees a positive number;
    3. the recurrence again from the true chunk-start states, reading y out.
  Work is linear in L at a fixed chunk size; the Python loop has 2K + L/K steps instead
  of L. A custom backward keeps only the inputs and the chunk-start states (1/K of the
  (B, L, E, N) states) and recomputes the rest, as the CUDA kernel does, so autograd
  does not hold L copies of the (B, E, N) state.
* ``selective_scan_step``: one step of the recurrence, for O(1)-per-event serving.

``selective_scan(..., backend=)`` picks between the chunked path and ``mamba_ssm``'s CUDA
kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional fused CUDA kernels (pip install mamba-ssm causal-conv1d; they build with nvcc)
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan_fn
except ImportError:
    _mamba_selective_scan_fn = None
try:
    from causal_conv1d import causal_conv1d_fn as _causal_conv1d_fn
except ImportError:
    _causal_conv1d_fn = None

#: Chunk length of ``selective_scan_chunked``. Measured forward+backward of the scan alone
#: at B=128, L=200, E=128, N=32 (float32, one CPU thread), chunk 8/16/32/64:
#: 1.80/1.79/1.90/2.44 s; with L=200 the loop has 2K + L/K steps, best near √(L/2). 16 is
#: also where long sequences stop improving (B=4, L=8192: 16 → 0.61 s, 32 → 0.60 s).
DEFAULT_CHUNK = 16

BACKENDS = ("auto", "torch", "cuda")


def selective_scan_ref(x, delta, A, B, C, D=None):
    """Sequential reference: x, delta (B, L, E); A (E, N); B, C (B, L, N); D (E,) -> y (B, L, E)."""
    dtype = x.dtype
    x, delta, A, B, C = (t.to(_compute_dtype(dtype)) for t in (x, delta, A, B, C))
    h = x.new_zeros(x.shape[0], x.shape[2], A.shape[1])  # (B, E, N)
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]
        ys.append(torch.einsum("ben,bn->be", h, C[:, t]))
    y = torch.stack(ys, 1)  # (B, L, E)
    if D is not None:
        y = y + D * x
    return y.to(dtype)


def selective_scan_step(h, x_t, delta_t, A, B_t, C_t, D=None):
    """One event: h (B, E, N), x_t, delta_t (B, E), B_t, C_t (B, N) -> (h, y_t (B, E)).

    The same arithmetic as one position of the scans, in O(1) time and memory with respect
    to how many events came before."""
    h = torch.exp(delta_t[:, :, None] * A) * h + (delta_t * x_t)[:, :, None] * B_t[:, None, :]  # (B, E, N)
    y = (h @ C_t[:, :, None]).squeeze(-1)  # (B, E)
    if D is not None:
        y = y + D * x_t
    return h, y


def selective_scan_chunked(x, delta, A, B, C, D=None, chunk: int = DEFAULT_CHUNK):
    """Chunked parallel scan (see the module docstring): same signature and result as
    ``selective_scan_ref``, differentiable in every input."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    dtype = x.dtype
    x, delta, A, B, C = (t.to(_compute_dtype(dtype)) for t in (x, delta, A, B, C))
    y = _ChunkedScan.apply(x, delta, A, B, C, int(chunk))  # (B, L, E)
    if D is not None:
        y = y + D * x
    return y.to(dtype)


def selective_scan(x, delta, A, B, C, D=None, backend: str = "auto", chunk: int = DEFAULT_CHUNK):
    """Dispatch: ``"cuda"`` = mamba_ssm's fused kernel (CUDA tensors, package installed),
    ``"torch"`` = ``selective_scan_chunked``, ``"auto"`` = cuda when it can run, else torch."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "cuda" or (backend == "auto" and _mamba_selective_scan_fn is not None and x.is_cuda):
        return _scan_cuda(x, delta, A, B, C, D)
    return selective_scan_chunked(x, delta, A, B, C, D, chunk=chunk)


def _scan_cuda(x, delta, A, B, C, D):
    if _mamba_selective_scan_fn is None:
        raise RuntimeError(
            "selective-scan backend 'cuda' needs the mamba_ssm package (pip install mamba-ssm, "
            "built with nvcc for your CUDA); use backend='torch' or 'auto' to run without it"
        )
    if not x.is_cuda:
        raise RuntimeError(f"selective-scan backend 'cuda' needs CUDA tensors, got {x.device}")
    tr = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731  (B, L, ·) -> (B, ·, L)
    D = D.float() if D is not None else None  # the kernel reads D as float32
    y = _mamba_selective_scan_fn(tr(x), tr(delta), A.contiguous(), tr(B), tr(C), D)  # (B, E, L)
    return y.transpose(1, 2)  # (B, L, E)


def _compute_dtype(dtype):
    # half-precision decays underflow and their products lose the tail; scan in fp32 at least
    return torch.promote_types(dtype, torch.float32)


def _to_chunks(t, K, nc):
    """(B, L, F) -> (B, nc, K, F), zero-padded at the end; Δ = 0 there makes the padded
    steps identities (decay 1, input 0), so they change neither states nor gradients."""
    pad = nc * K - t.shape[1]
    if pad:
        t = F.pad(t, (0, 0, 0, pad))
    return t.reshape(t.shape[0], nc, K, t.shape[2])


class _ChunkedScan(torch.autograd.Function):
    """y_t = h_t · C_t without the D term. Saves inputs and chunk-start states only."""

    @staticmethod
    def forward(ctx, x, delta, A, B, C, chunk):
        Bsz, L, E = x.shape
        K = min(chunk, L)
        nc = -(-L // K)
        xc, dc, Bc, Cc = (_to_chunks(t, K, nc) for t in (x, delta, B, C))  # (B, nc, K, E|N)
        dx = dc * xc  # (B, nc, K, E)

        # 1. per-chunk end states from a zero start, all chunks at once
        h = xc.new_zeros(Bsz, nc, E, A.shape[1])  # (B, nc, E, N)
        for k in range(K):
            h.mul_(torch.exp(dc[:, :, k, :, None] * A)).addcmul_(dx[:, :, k, :, None], Bc[:, :, k, None, :])

        # 2. carry across chunks; whole-chunk decay exp(A ΣΔ) from the summed log-decays
        decay = torch.exp(A * dc.sum(2)[..., None])  # (B, nc, E, N), ≤ 1
        starts = _carry(decay, h)  # (B, nc, E, N): state before each chunk's first step

        # 3. rerun every chunk from its true start and read the outputs out
        h = starts.clone()
        ys = []
        for k in range(K):
            h.mul_(torch.exp(dc[:, :, k, :, None] * A)).addcmul_(dx[:, :, k, :, None], Bc[:, :, k, None, :])
            ys.append((h @ Cc[:, :, k, :, None]).squeeze(-1))  # (B, nc, E)
        y = torch.stack(ys, 2).reshape(Bsz, nc * K, E)[:, :L]  # (B, L, E)

        ctx.save_for_backward(x, delta, A, B, C, starts, decay)
        ctx.K, ctx.nc = K, nc
        return y

    @staticmethod
    def backward(ctx, gy):
        x, delta, A, B, C, starts, decay = ctx.saved_tensors
        K, nc = ctx.K, ctx.nc
        Bsz, L, E = x.shape
        xc, dc, Bc, Cc, gyc = (_to_chunks(t, K, nc) for t in (x, delta, B, C, gy))
        dx = dc * xc

        # recompute the forward states: hs[k + 1] = h_k, hs[0] = chunk start; a[k] = exp(Δ_k A)
        hs, a = [starts], []
        for k in range(K):
            a.append(torch.exp(dc[:, :, k, :, None] * A))  # (B, nc, E, N)
            hs.append(torch.addcmul(a[k] * hs[k], dx[:, :, k, :, None], Bc[:, :, k, None, :]))

        # adjoint of the states, g_t = C_t ⊗ gy_t + a_{t+1} g_{t+1}: the same two-level scan
        # run backwards. First inside each chunk from a zero end ...
        g = torch.zeros_like(starts)
        for k in reversed(range(K)):
            if k < K - 1:
                g.mul_(a[k + 1])
            g.addcmul_(gyc[:, :, k, :, None], Cc[:, :, k, None, :])
        # ... then what each chunk hands to the end of the one before it
        g_in = _carry(decay, a[0] * g, reverse=True)  # (B, nc, E, N)

        gx, gdelta, gB, gC = [], [], [], []
        gA = torch.zeros_like(starts)  # summed over (B, nc) at the end
        g = g_in
        for k in reversed(range(K)):
            g = g * a[k + 1] if k < K - 1 else g.clone()
            g.addcmul_(gyc[:, :, k, :, None], Cc[:, :, k, None, :])  # total adjoint of h_k
            q = g * a[k] * hs[k]  # ∂loss/∂(Δ_k A), (B, nc, E, N)
            g_dx = (g @ Bc[:, :, k, :, None]).squeeze(-1)  # (B, nc, E)
            gx.append(g_dx * dc[:, :, k])
            gdelta.append(g_dx * xc[:, :, k] + (q * A).sum(-1))
            gB.append((dx[:, :, k, None, :] @ g).squeeze(-2))  # (B, nc, N)
            gC.append((gyc[:, :, k, None, :] @ hs[k + 1]).squeeze(-2))
            gA.addcmul_(q, dc[:, :, k, :, None])

        def unchunk(parts):  # reversed list of (B, nc, F) -> (B, L, F)
            return torch.stack(parts[::-1], 2).reshape(Bsz, nc * K, -1)[:, :L]

        return unchunk(gx), unchunk(gdelta), gA.sum((0, 1)), unchunk(gB), unchunk(gC), None


def _carry(decay, local, reverse=False):
    """Linear recurrence over the chunk axis: s_c = decay_c ⊙ s_{c-1} + local_c, returning
    the state *before* each chunk (B, nc, E, N). Reverse: the adjoint handed to the end of
    each chunk by the chunks after it, s_c = local_{c+1} + decay_{c+1} ⊙ s_{c+1}."""
    out = torch.empty_like(local)
    s = torch.zeros_like(local[:, 0])
    order = range(local.shape[1] - 1, -1, -1) if reverse else range(local.shape[1])
    for c in order:
        out[:, c] = s
        s = decay[:, c] * s + local[:, c]
    return out


def causal_conv1d(x, weight, bias=None, activation: str | None = None, backend: str = "auto"):
    """Causal depthwise conv: x (B, L, E), weight (E, W), bias (E,) -> (B, L, E); output t
    reads inputs t-W+1..t. activation None or "silu". Uses the ``causal_conv1d`` package's
    fused kernel for CUDA tensors when it is installed (backend "auto" or "cuda")."""
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown conv backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend != "torch" and _causal_conv1d_fn is not None and x.is_cuda:
        return _causal_conv1d_fn(x.transpose(1, 2), weight, bias, activation=activation).transpose(1, 2)
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
