"""HSTU: Hierarchical Sequential Transduction Units (Zhai et al., ICML 2024, "Actions Speak
Louder than Words"), following the research code in meta-recsys/generative-recommenders
(``modeling/sequential/hstu.py``).

One block:
    U, V, Q, K = split(SiLU(W_uvqk · LN(X)))
    A = SiLU(Q Kᵀ + rab_pos + rab_time) / n  ⊙ causal
    Y = W_o · dropout(U ⊙ LN(A V)) + X
Pointwise SiLU attention instead of softmax (the paper: softmax normalisation dilutes the
intensity of engagement signals). Input: item embedding · sqrt(d) + a learned absolute
position embedding, then dropout (the reference's
``LearnablePositionalEmbeddingInputFeaturesPreprocessor``; ``abs_pos=False`` drops the
position table and leaves order to the relative biases). rab_time needs timestamps; without
them the model falls back to the position bias alone.

The ML-1M recipe of the paper scores L2-normalized hidden states against L2-normalized item
embeddings (sampled softmax, 128 negatives, temperature 0.05): with ``normalize_output``
both ``encode`` and ``output_embeddings`` are unit-norm, so scores are cosines in [-1, 1] and
the training loss must divide them by a temperature.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..ops.dropout import Dropout
from .base import SeqRecModel
from .sasrec import _init

try:  # fused CPU kernels for the pointwise attention (numba; the torch line covers its absence)
    from ..ops import hstu_numba as _hstu_numba
except ImportError:
    _hstu_numba = None

# the reference normalizes with eps 1e-6 everywhere (layer norms and the final L2 norm)
_EPS = 1e-6


@dataclass(frozen=True)
class HSTUConfig:
    n_items: int
    max_len: int = 200
    d: int = 50
    n_blocks: int = 2
    n_heads: int = 1
    dropout: float = 0.2
    attn_dim: int | None = None  # per-head Q/K width; None -> d // n_heads
    linear_dim: int | None = None  # per-head U/V width; None -> d // n_heads
    time_bias: bool = True  # rab_time, used only when encode/step get timestamps
    # which time query i measures gaps from: "own" = its own event's (t_i - t_j: a serving
    # step needs nothing it does not have); "next" = the next event's, i.e. the time the
    # prediction is asked for (t_{i+1} - t_j, as generative-recommenders: the target's
    # timestamp in training, the request time when serving)
    time_query: str = "own"
    num_time_buckets: int = 128  # log-bucketed time gaps of the time bias
    normalize_output: bool = True  # L2-normalize hidden states and output item rows
    # learned absolute position table added to the input, as the reference's input
    # preprocessor (results in BENCHMARKS.md from before 2026-11-23 ran without it)
    abs_pos: bool = True
    # the position table's initial values. "trunc_normal": std sqrt(1/d) cut at two std, the
    # reference preprocessor's own reset_state; "xavier_normal": std sqrt(2 / (rows + d)),
    # what the reference model actually starts from, because its reset_params re-initializes
    # every parameter outside _hstu and _embedding_module (the position table included)
    # with xavier_normal_ after the preprocessor was built (0.0875 at its 211 rows, 0.0894
    # at our 200, vs 0.141 at d 50)
    pos_init: str = "trunc_normal"
    # the item table's: "normal" N(0, 0.02) as the other backbones; "trunc_normal" the same
    # redrawn outside two std, the reference LocalEmbeddingModule's truncated_normal (its
    # reset_params skips _embedding_module, so this one is kept; std 0.0176 after the cut)
    item_init: str = "normal"

    #: values of keys added after runs were saved without them: what those runs did
    LEGACY: ClassVar[dict] = {"abs_pos": False}

    def __post_init__(self):
        if self.time_query not in ("own", "next"):
            raise ValueError(f"time_query must be 'own' or 'next', got {self.time_query!r}")
        if self.pos_init not in ("trunc_normal", "xavier_normal"):
            raise ValueError(f"pos_init must be 'trunc_normal' or 'xavier_normal', got {self.pos_init!r}")
        if self.item_init not in ("normal", "trunc_normal"):
            raise ValueError(f"item_init must be 'normal' or 'trunc_normal', got {self.item_init!r}")


# HSTU-large of the paper (and of the PCRec comparison): deeper and two heads, same width
HSTU_LARGE = dict(n_blocks=8, n_heads=2)


@dataclass(frozen=True)
class HSTULargeConfig(HSTUConfig):
    n_blocks: int = HSTU_LARGE["n_blocks"]
    n_heads: int = HSTU_LARGE["n_heads"]


def time_buckets(gaps: torch.Tensor, num_buckets: int = 128) -> torch.Tensor:
    """Log-bucketed time gaps: ``floor(ln(max(1, |gap|)) / 0.301)`` clipped to
    [0, num_buckets], exactly the reference's ``bucketization_fn``. Note the reference
    divides the *natural* log by 0.301 (= log10 2), so buckets are ~3.3x finer than log2:
    gap 10 -> 7, 1000 -> 22, one day (86400 s) -> 37. Sign is ignored. int32 (an index type
    for torch, half of int64's memory: encode makes B·T² of them); in place after the first
    copy, which matters at long T."""
    from ..ops import reference_only

    if reference_only():  # torch.func: vmap has no batching rule for clamp_ and would loop over the batch
        g = gaps.abs().clamp(min=1).to(torch.float32)
        return (g.log() / 0.301).to(torch.int32).clamp(0, num_buckets)
    g = gaps.abs().clamp_(min=1).to(torch.float32)  # float32 log as in the reference
    return g.log_().div_(0.301).to(torch.int32).clamp_(0, num_buckets)


def relative_bias(pos_w, ts_w, rel, buckets):
    """rab_pos (+ rab_time) at one query: pos_w[rel], plus ts_w[buckets] when buckets is
    given; rel (Tk,) distances i - j >= 0, buckets (B, Tk) or None -> a broadcastable bias."""
    bias = pos_w[rel]
    return bias if buckets is None else bias + _lookup(ts_w, buckets)


def _lookup(table, idx):
    """table[idx] for a 1-D table, through F.embedding: its CUDA backward splits long runs of
    one index into chunks, where indexing's (index_put with accumulate) walks each run
    serially, and a (B, T, T) bucket table is T² entries over ~129 values."""
    return F.embedding(idx, table[:, None]).squeeze(-1)


def causal_toeplitz(w, T):
    """(T, T) with [i, j] = w[i - j] on and below the diagonal, 0 above: T windows of one
    padded vector, so the backward is a dense sum along each diagonal. Indexing w with the
    (T, T) table of clamped i - j gives the same values, but its backward on CUDA walks the
    T²/2 entries clamped to 0 one by one (HSTU's training step took 17 s at T = 8192 on an
    H100 that way, `BENCHMARKS.md`). Under ``reference_ops`` (torch.func: vmap has no rule
    for unfold's backward and would loop over the batch) it takes the indexing line."""
    from ..ops import reference_only

    if reference_only():
        pos = torch.arange(T, device=w.device)
        rel = pos[:, None] - pos[None, :]  # (T, T) = i - j
        return torch.where(rel >= 0, w[rel.clamp(min=0)], w.new_zeros(()))
    v = torch.cat([w[:T].flip(0), w.new_zeros(T - 1)])  # (2T-1,): v[T-1-k] = w[k]
    return v.unfold(0, T, 1).flip(0)  # (T, T): [i, j] = v[T-1-i+j]


def causal_silu_attention(s, pos_w, ts_w, buckets, n):
    """A = SiLU(S + rab_pos + rab_time) / n ⊙ causal: S (B, H, T, T); rab_pos[i, j] =
    pos_w[i - j] (pos_w (P,), P ≥ T); rab_time[b, i, j] = ts_w[buckets[b, i, j]] when buckets
    (B, T, T) is given; both biases are shared by the heads. The lines below are the
    reference; float32 on CPU takes the fused kernels of ``ops/hstu_numba.py`` (same values),
    which also read the biases from their tables instead of materializing them."""
    if _hstu_numba is not None and _hstu_numba.applicable(s):
        return _hstu_numba.CausalSiluAttention.apply(s, pos_w, ts_w, buckets, n)
    T = s.shape[-1]
    pos = torch.arange(T, device=s.device)
    causal = pos[:, None] >= pos[None, :]  # (T, T)
    bias = causal_toeplitz(pos_w, T)  # (T, T)
    if buckets is not None:
        bias = (bias + _lookup(ts_w, buckets)).unsqueeze(1)  # (B, 1, T, T), shared by the heads
    return F.silu(s + bias) / n * causal


#: On CPU a block's attention runs in query blocks of ``ATTENTION_BLOCK`` rows
#: (``blocked_silu_attention``: memory O(T · block) instead of O(T²) per block and head,
#: only the causal half of Q Kᵀ computed) from ``BLOCKED_FROM`` positions on, or sooner when
#: the whole line's (B, H, T, T) scores would exceed ``WHOLE_MAX_SCORES`` elements. Below
#: both, the whole line is faster (one fused kernel pass, no Python loop) but keeps 3-5
#: floats per score and layer for the backward (from the peaks below). Training step, batch 4, 2 threads (session 16,
#: whole vs blocked, s): HSTU 0.10 vs 0.13 at 1024, 0.35 vs 0.39 at 2048 (peak 1.3 vs 0.7
#: GB), 1.79 vs 1.43 at 4096 (3.3 vs 0.9 GB); HSTU-large 0.47 vs 0.68 at 1024, 1.9-2.3 vs
#: 2.3-2.5 at 2048 (3.6-4.0 vs 0.9 GB), 6.8 vs 8.2 at 4096 (13.1 vs 1.3 GB: the memory
#: decides there). GPUs keep the whole line (measured fast there, 0.25 s per step at 8192
#: on an H100; the blocked path runs on CUDA too but has not been timed on one).
BLOCKED_FROM = 4096
WHOLE_MAX_SCORES = 2**25  # 128 MiB of float32 scores per block call: HSTU-large, batch 4, T 2048
ATTENTION_BLOCK = 256


def _blocked(B: int, H: int, T: int, device: torch.device) -> bool:
    from ..ops import reference_only

    return device.type == "cpu" and (T >= BLOCKED_FROM or B * H * T * T > WHOLE_MAX_SCORES) and not reference_only()


def _block_bias(s, pos_w, ts_w, buckets, i0):
    """The torch line of one block (any device or dtype): (z = s + rab, causal (b, i1) as 0/1
    in s's dtype, rel (b, i1) = i - j)."""
    b, i1 = s.shape[-2:]
    rel = torch.arange(i0, i0 + b, device=s.device)[:, None] - torch.arange(i1, device=s.device)  # (b, i1) = i - j
    z = s + pos_w[rel.clamp(min=0)]
    if buckets is not None:
        z = z + _lookup(ts_w, buckets).unsqueeze(1)  # shared by the heads
    return z, (rel >= 0).to(s.dtype), rel


class _BlockedSiluAttention(torch.autograd.Function):
    """(A V) for A = SiLU(Q Kᵀ + rab_pos + rab_time) / n ⊙ causal, one block of query rows at
    a time against the keys up to its last row (the causal half of Q Kᵀ only); the backward
    recomputes each block's weights (as flash attention does), so nothing of size T² is
    kept. float32 CPU runs each block's weights through the fused kernels of
    ``ops/hstu_numba.py``, everything else through the torch line. Values and gradients as
    ``causal_silu_attention`` followed by ``@ v`` (tests/test_hstu_llama.py)."""

    @staticmethod
    def forward(ctx, q, k, v, pos_w, ts_w, qt, kt, n, num_buckets, block):
        B, H, T, _ = q.shape
        fused = _hstu_numba is not None and _hstu_numba.applicable(q)
        out = v.new_empty(B, H, T, v.shape[-1])
        for i0, i1, s, buckets in _blocks(q, k, qt, kt, num_buckets, block):
            if fused:
                a = _hstu_numba.weights(s, *_hstu_numba.tables(pos_w, ts_w, buckets, T), n, i0)
            else:
                z, causal, _ = _block_bias(s, pos_w, ts_w, buckets, i0)
                a = F.silu(z) * (causal / n)
            out[:, :, i0:i1] = a @ v[:, :, :i1]  # (B, H, b, dv)
        ctx.save_for_backward(q, k, v, pos_w, ts_w, qt, kt)
        ctx.n, ctx.num_buckets, ctx.block, ctx.fused = n, num_buckets, block, fused
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        q, k, v, pos_w, ts_w, qt, kt = ctx.saved_tensors
        n, T, timed = ctx.n, q.shape[2], qt is not None
        gq, gk, gv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        if ctx.fused:
            acc = _hstu_numba.BiasGrads()
        else:
            gpos, gts = torch.zeros_like(pos_w), torch.zeros_like(ts_w) if timed else None
        for i0, i1, s, buckets in _blocks(q, k, qt, kt, ctx.num_buckets, ctx.block):
            gb, vb = g[:, :, i0:i1], v[:, :, :i1]
            if ctx.fused:
                tabs = _hstu_numba.tables(pos_w, ts_w, buckets, T)
                a = _hstu_numba.weights(s, *tabs, n, i0)
                gv[:, :, :i1] += a.transpose(-2, -1) @ gb  # Aᵀ ∂out
                gs = _hstu_numba.weights_backward(s, *tabs, n, gb @ vb.transpose(-2, -1), acc, i0)
            else:
                z, causal, rel = _block_bias(s, pos_w, ts_w, buckets, i0)
                sig, mask = torch.sigmoid(z), causal / n
                gv[:, :, :i1] += (z * sig * mask).transpose(-2, -1) @ gb
                # ∂z = (∂out Vᵀ) · SiLU'(z) / n on the causal part; SiLU' = σ (1 + z (1 - σ))
                gs = (gb @ vb.transpose(-2, -1)) * (sig * (1 + z * (1 - sig))) * mask  # (B, H, b, i1)
                gsh = gs.sum(1)  # (B, b, i1): the biases are shared by the heads
                keep = causal.bool()
                gpos.index_add_(0, rel[keep], gsh.sum(0)[keep])
                if timed:
                    gts.index_add_(0, buckets[:, keep].reshape(-1), gsh[:, keep].reshape(-1))
            gq[:, :, i0:i1] = gs @ k[:, :, :i1]
            gk[:, :, :i1] += gs.transpose(-2, -1) @ q[:, :, i0:i1]
        if ctx.fused:
            gpos, gts = acc.result(q.dtype, timed)
        return gq, gk, gv, gpos, gts, None, None, None, None, None


def _blocks(q, k, qt, kt, num_buckets, block):
    """Per block of query rows i0 … i1-1: (i0, i1, their rows of Q Kᵀ against keys 0 … i1-1
    (B, H, i1-i0, i1), time buckets (B, i1-i0, i1) int32 or None), from q, k (B, H, T, dqk)
    and query / key times qt, kt (B, T) or None."""
    T = q.shape[2]
    for i0 in range(0, T, block):
        i1 = min(T, i0 + block)
        buckets = None if qt is None else time_buckets(qt[:, i0:i1, None] - kt[:, None, :i1], num_buckets)
        yield i0, i1, q[:, :, i0:i1] @ k[:, :, :i1].transpose(-2, -1), buckets


def blocked_silu_attention(q, k, v, pos_w, ts_w, qt, kt, n, num_buckets: int = 128, block: int = ATTENTION_BLOCK):
    """``causal_silu_attention(q kᵀ, ...) @ v`` in blocks of ``block`` query rows, with the
    time buckets made per block from qt (B, T), the query times, and kt (B, T), the key
    times (both None: no time bias): q, k (B, H, T, dqk), v (B, H, T, dv) -> (B, H, T, dv).
    Peak memory O(B H T · block) instead of O(B H T²), for long sequences."""
    if pos_w.shape[0] < q.shape[2]:
        raise ValueError(f"position bias table has {pos_w.shape[0]} entries, sequence length is {q.shape[2]}")
    if (qt is None) != (kt is None) or (qt is not None and ts_w is None):
        raise ValueError("the time bias needs query times, key times and the table ts_w together")
    return _BlockedSiluAttention.apply(q, k, v, pos_w, ts_w, qt, kt, n, num_buckets, block)


class HSTUBlock(nn.Module):
    def __init__(self, cfg: HSTUConfig):
        super().__init__()
        H = cfg.n_heads
        self.n_heads, self.max_len, self.d = H, cfg.max_len, cfg.d
        self.num_buckets = cfg.num_time_buckets
        self.dqk = cfg.attn_dim or cfg.d // H
        self.dv = cfg.linear_dim or cfg.d // H
        self.uvqk = nn.Linear(cfg.d, H * (2 * self.dv + 2 * self.dqk), bias=False)
        self.o = nn.Linear(H * self.dv, cfg.d)
        # one bias table per block, as in the reference (each layer owns its rel. bias)
        self.pos_w = nn.Parameter(torch.empty(cfg.max_len).normal_(std=0.02))  # indexed by i - j >= 0
        self.ts_w = nn.Parameter(torch.empty(cfg.num_time_buckets + 1).normal_(std=0.02)) if cfg.time_bias else None
        self.drop = Dropout(cfg.dropout)
        nn.init.normal_(self.uvqk.weight, std=0.02)
        nn.init.xavier_uniform_(self.o.weight)
        nn.init.zeros_(self.o.bias)

    def _uvqk(self, x):  # x (..., D)
        # the reference's layer norms carry no affine parameters
        h = F.silu(self.uvqk(F.layer_norm(x, (self.d,), eps=_EPS)))
        H = self.n_heads
        return h.split([H * self.dv, H * self.dv, H * self.dqk, H * self.dqk], dim=-1)

    def _out(self, x, u, av):  # av (..., H * dv): attention output, heads concatenated
        # one LN over all heads together, as in the reference (_norm_attn_output)
        return x + self.o(self.drop(u * F.layer_norm(av, (av.shape[-1],), eps=_EPS)))

    def forward(self, x, buckets, times=None, keep_kv: bool = False):
        # x (B, T, D); buckets (B, T, T) time-gap buckets | None; or, for the blocked
        # attention of long sequences, times = (query times, key times), each (B, T) | None.
        # keep_kv: also return k, v (B, H, T, d*), the KV cache ``step`` continues from
        B, T, _ = x.shape
        H = self.n_heads
        u, v, q, k = self._uvqk(x)
        q = q.view(B, T, H, self.dqk).transpose(1, 2)  # (B, H, T, dqk)
        k = k.view(B, T, H, self.dqk).transpose(1, 2)  # (B, H, T, dqk)
        v = v.view(B, T, H, self.dv).transpose(1, 2)  # (B, H, T, dv)
        # n = max_len, a constant (the reference divides by the padded length, which its data
        # pipeline always pads to the max sequence length); a constant keeps a position's
        # output independent of how much right padding its batch carries
        if _blocked(B, H, T, x.device):
            qt, kt = times if times is not None else (None, None)
            av = blocked_silu_attention(q, k, v, self.pos_w, self.ts_w, qt, kt, self.max_len, self.num_buckets)
        else:
            a = causal_silu_attention(q @ k.transpose(-2, -1), self.pos_w, self.ts_w, buckets, self.max_len)  # (B, H, T, T)
            av = a @ v  # (B, H, T, dv)
        av = av.transpose(1, 2).reshape(B, T, H * self.dv)  # (B, T, H*dv)
        return (self._out(x, u, av), k, v) if keep_kv else self._out(x, u, av)

    def step(self, x, k_cache, v_cache, buckets):
        # x (B, D) at position t = k_cache.shape[2]; caches (B, H, t, d*); buckets (B, t+1) | None
        B = x.shape[0]
        H, t = self.n_heads, k_cache.shape[2]
        u, v, q, k = self._uvqk(x)
        K = torch.cat([k_cache, k.view(B, H, 1, self.dqk)], 2)  # (B, H, t+1, dqk)
        V = torch.cat([v_cache, v.view(B, H, 1, self.dv)], 2)  # (B, H, t+1, dv)
        rel = torch.arange(t, -1, -1, device=x.device).clamp(max=self.max_len - 1)  # (t+1,) = t - j
        bias = relative_bias(self.pos_w, self.ts_w, rel, buckets)  # (t+1,) or (B, t+1)
        if bias.dim() == 2:
            bias = bias[:, None, None, :]  # (B, 1, 1, t+1)
        a = F.silu(q.view(B, H, 1, self.dqk) @ K.transpose(-2, -1) + bias) / self.max_len  # (B, H, 1, t+1)
        av = (a @ V).reshape(B, H * self.dv)  # (B, H*dv)
        return self._out(x, u, av), K, V


class HSTU(SeqRecModel):
    Config = HSTUConfig
    incremental = True
    state_grows = True  # a KV cache

    def __init__(self, cfg: HSTUConfig):
        super().__init__(cfg.n_items, cfg.max_len)
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.d, padding_idx=0)
        _init(self.item_emb)  # N(0, 0.02), zero padding row
        if cfg.item_init == "trunc_normal":
            with torch.no_grad():
                nn.init.trunc_normal_(self.item_emb.weight[1:], std=0.02, a=-0.04, b=0.04)
        self.pos_emb = None
        if cfg.abs_pos:
            self.pos_emb = nn.Embedding(cfg.max_len, cfg.d)
            if cfg.pos_init == "xavier_normal":
                nn.init.xavier_normal_(self.pos_emb.weight)
            else:
                std = cfg.d**-0.5
                nn.init.trunc_normal_(self.pos_emb.weight, std=std, a=-2 * std, b=2 * std)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(HSTUBlock(cfg) for _ in range(cfg.n_blocks))

    def _embed(self, items, pos):
        # items (B, T) or (B,); pos: their positions, (T,) or a scalar tensor.
        # sqrt(d) scaling and the position table as in the reference's input preprocessor
        x = self.item_emb(items) * self.cfg.d**0.5
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        return self.drop(x)

    def _finish(self, x):
        return F.normalize(x, dim=-1, eps=_EPS) if self.cfg.normalize_output else x

    def _use_time(self, times) -> bool:
        return times is not None and self.cfg.time_bias

    @property
    def query_time_input(self) -> bool:
        """Whether ``encode`` wants ``query_times`` (the next events' times) with ``times``."""
        return self.cfg.time_bias and self.cfg.time_query == "next"

    def _query_times(self, times, query_times):
        if self.cfg.time_query == "own":
            return times
        if query_times is None:
            raise ValueError("HSTU with time_query='next' needs query_times (each position's next-event or request "
                             "time) whenever it gets times")
        return query_times

    def encode(self, items, times=None, query_times=None):
        """items, times (B, T); query_times (B, T): with time_query="next", the time each
        position's prediction is for (the target's timestamp; the request time at the last)."""
        B, T = items.shape
        if T > self.max_len:
            raise ValueError(f"sequence length {T} exceeds max_len {self.max_len}")
        pos = torch.arange(T, device=items.device)
        x = self._embed(items, pos)  # (B, T, D)
        # right padding: real positions precede padding, so the causal mask (in the blocks)
        # alone keeps padding out of their view; padding rows see only finite values (no NaN).
        # Time bias: gap of query i's time (its own event's, or the next one's) to key j's
        buckets, qk_times = None, None
        if self._use_time(times):
            qt = self._query_times(times, query_times)  # (B, T)
            if _blocked(B, self.cfg.n_heads, T, items.device):  # the blocked attention buckets per block: no (B, T, T) table
                qk_times = (qt, times)
            else:
                buckets = time_buckets(qt[:, :, None] - times[:, None, :], self.cfg.num_time_buckets)  # (B, T, T)
        for i, block in enumerate(self.blocks):
            x = self._after_block(i, x, block(x, buckets, qk_times))
        return self._finish(x)  # (B, T, D)

    def _after_block(self, i: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The stream after block ``i`` from its input ``x`` and output ``y``: the output
        (PCRec corrects it here)."""
        return y

    def output_embeddings(self):
        w = self.item_emb.weight[: self.n_items + 1]
        # the zero padding row stays zero (F.normalize clamps the norm at eps)
        return F.normalize(w, dim=-1, eps=_EPS) if self.cfg.normalize_output else w

    # -- incremental serving ----------------------------------------------------------
    def init_state(self, batch_size: int, device=None):
        """Per-block KV cache: {"k": (n_blocks, B, H, t, dqk), "v": (n_blocks, B, H, t, dv),
        "times": (B, t) int64}; t = events seen so far (starts at 0). U is not cached: a new
        query only needs the keys, values and the keys' timestamps."""
        p = self.item_emb.weight
        device = device if device is not None else p.device
        b0 = self.blocks[0]
        nb, H = len(self.blocks), b0.n_heads
        return {
            "k": torch.zeros(nb, batch_size, H, 0, b0.dqk, device=device, dtype=p.dtype),
            "v": torch.zeros(nb, batch_size, H, 0, b0.dv, device=device, dtype=p.dtype),
            "times": torch.zeros(batch_size, 0, dtype=torch.long, device=device),
        }

    @torch.no_grad()
    def prefill(self, items: torch.Tensor):
        """The state (and last hidden (B, D)) after ``items`` (B, T), unpadded, in one pass:
        what T ``step`` calls without times give (a server rebuilding the KV cache of a slid
        window; serving passes no times, so no time bias, as ``step``)."""
        B, T = items.shape
        x = self._embed(items, torch.arange(T, device=items.device))  # (B, T, D)
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            y, k, v = block(x, None, None, keep_kv=True)
            x = self._after_block(i, x, y)
            ks.append(k)
            vs.append(v)
        state = {"k": torch.stack(ks), "v": torch.stack(vs), "times": torch.zeros(B, T, dtype=torch.long, device=items.device)}
        return state, self._finish(x[:, -1])

    def predict_hidden(self, items, lengths, times=None, target_time=None):
        if not (self.query_time_input and times is not None):
            return super().predict_hidden(items, lengths, times, target_time)
        if target_time is None:
            raise ValueError("HSTU with time_query='next' scores for a request time: pass target_time")
        # position i's query time is event i+1's time; the last real position's is the request's
        qt = torch.cat([times[:, 1:], times[:, -1:]], 1)  # (B, T), a new tensor
        rows = torch.arange(items.shape[0], device=items.device)
        qt[rows, lengths - 1] = target_time.to(qt.dtype)
        h = self.encode(items, times, qt)  # (B, T, D)
        return h[rows, lengths - 1]

    def step(self, state, item, time=None, query_time=None):
        """One new event per row -> (new state, hidden (B, D)); the old state is not
        modified. Pass ``time`` on every step or on none (as ``encode`` gets times for
        all positions or none); without it the time bias is skipped, as in ``encode``.
        With time_query="next", ``query_time`` (B,) is the time the returned hidden state
        will score for (the request time)."""
        t = state["k"].shape[3]
        if t >= self.max_len:
            raise ValueError(f"state already holds max_len={self.max_len} events; re-encode the last {self.max_len - 1} and continue")
        B = item.shape[0]
        times = torch.cat([state["times"], (time if time is not None else torch.zeros_like(item)).view(B, 1).long()], 1)  # (B, t+1)
        buckets = None
        if self._use_time(time):
            q = self._query_times(times[:, -1:], None if query_time is None else query_time.view(B, 1).long())  # (B, 1)
            buckets = time_buckets(q - times, self.cfg.num_time_buckets)  # (B, t+1)
        x = self._embed(item, torch.tensor(t, device=item.device))  # (B, D)
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            x, K, V = block.step(x, state["k"][i], state["v"][i], buckets)
            ks.append(K)
            vs.append(V)
        return {"k": torch.stack(ks), "v": torch.stack(vs), "times": times}, self._finish(x)


class HSTULarge(HSTU):
    """HSTU with the paper's large preset (``HSTU_LARGE``) as its config defaults."""

    Config = HSTULargeConfig
