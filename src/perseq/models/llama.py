"""A LLaMA-style decoder over item sequences (Touvron et al., 2023), the "LLaMA" baseline of
the PCRec comparison: pre-norm blocks with RMSNorm, rotary position embedding (RoPE) on
queries and keys (no position table), causal softmax attention, SwiGLU feed-forward, no
biases, a final RMSNorm and the tied item table as output embedding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.attention import causal_attention
from ..ops.dropout import Dropout
from .base import SeqRecModel
from .sasrec import _init


@dataclass(frozen=True)
class LlamaRecConfig:
    n_items: int
    max_len: int = 200
    d: int = 64
    n_blocks: int = 2
    n_heads: int = 2
    dropout: float = 0.2
    rope_base: float = 10000.0  # rotary position frequency base


def swiglu_hidden(d: int, multiple_of: int = 8) -> int:
    """LLaMA's FFN width: 2/3 of 4d (so SwiGLU's three matrices cost what a 4d GELU FFN's two
    do), rounded up to a multiple of ``multiple_of``. d=64 -> 176."""
    h = int(8 * d / 3)
    return multiple_of * math.ceil(h / multiple_of)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * weight: LayerNorm without centring or bias."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Rotary(nn.Module):
    """RoPE in the half-split layout (pairs (i, i + hs/2) rotate together, as in the Hugging
    Face LLaMA port; Meta's interleaved layout is the same up to a fixed permutation).
    q·k after rotation depends on positions only through their difference."""

    def __init__(self, head_dim: int, max_len: int, base: float):
        super().__init__()
        assert head_dim % 2 == 0, f"RoPE needs an even head size, got {head_dim}"
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hs/2,)
        ang = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (L, hs/2)
        ang = torch.cat([ang, ang], dim=-1)  # (L, hs)
        # not persistent: derived from the config, so checkpoints carry only learned weights
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, x, pos):  # x (..., T, hs); pos (T,) long
        return x * self.cos[pos] + rotate_half(x) * self.sin[pos]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaRecConfig):
        super().__init__()
        assert cfg.d % cfg.n_heads == 0, f"d={cfg.d} must be divisible by n_heads={cfg.n_heads}"
        self.n_heads, self.hs = cfg.n_heads, cfg.d // cfg.n_heads
        self.qkv = nn.Linear(cfg.d, 3 * cfg.d, bias=False)
        self.o = nn.Linear(cfg.d, cfg.d, bias=False)

    def forward(self, x, rope: Rotary, keep_kv: bool = False):
        # keep_kv: also return the rotated keys and the values (B, H, T, hs): ``step``'s cache
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.hs).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hs)
        pos = torch.arange(T, device=x.device)
        q, k = rope(q, pos), rope(k, pos)
        # right padding: real positions precede padding, so the causal mask alone keeps
        # padding out of their view
        y = causal_attention(q, k, v)  # (B, H, T, hs)
        out = self.o(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)
        return (out, k, v) if keep_kv else out

    def step(self, x, k_cache, v_cache, rope: Rotary):
        # x (B, D) at position t = k_cache.shape[2]; caches (B, H, t, hs)
        B, D = x.shape
        q, k, v = self.qkv(x).view(B, 3, self.n_heads, 1, self.hs).unbind(1)  # 3 x (B, H, 1, hs)
        pos = torch.full((1,), k_cache.shape[2], device=x.device, dtype=torch.long)
        q, k = rope(q, pos), rope(k, pos)
        K, V = torch.cat([k_cache, k], 2), torch.cat([v_cache, v], 2)  # (B, H, t+1, hs)
        y = F.scaled_dot_product_attention(q, K, V)  # (B, H, 1, hs); every cached key is in the past
        return self.o(y.reshape(B, D)), K, V


class SwiGLU(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        h = swiglu_hidden(d)
        self.gate, self.up, self.down = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False), nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaRecConfig):
        super().__init__()
        self.norm1, self.attn = RMSNorm(cfg.d), Attention(cfg)
        self.norm2, self.ffn = RMSNorm(cfg.d), SwiGLU(cfg.d)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x, rope, keep_kv: bool = False):
        a = self.attn(self.norm1(x), rope, keep_kv)
        a, k, v = a if keep_kv else (a, None, None)
        x = x + self.drop(a)
        x = x + self.drop(self.ffn(self.norm2(x)))
        return (x, k, v) if keep_kv else x

    def step(self, x, k_cache, v_cache, rope):
        a, K, V = self.attn.step(self.norm1(x), k_cache, v_cache, rope)
        x = x + self.drop(a)
        return x + self.drop(self.ffn(self.norm2(x))), K, V


def _init_weights(m: nn.Module):
    if isinstance(m, nn.Linear) and m.bias is None:
        nn.init.normal_(m.weight, std=0.02)
    else:
        _init(m)  # embeddings: N(0, 0.02), zero padding row


class LlamaRec(SeqRecModel):
    Config = LlamaRecConfig
    incremental = True
    state_grows = True  # a KV cache

    def __init__(self, cfg: LlamaRecConfig):
        super().__init__(cfg.n_items, cfg.max_len)
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.d, padding_idx=0)
        self.rope = Rotary(cfg.d // cfg.n_heads, cfg.max_len, cfg.rope_base)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
        self.norm_f = RMSNorm(cfg.d)
        self.apply(_init_weights)

    def encode(self, items, times=None):
        B, T = items.shape
        if T > self.max_len:
            raise ValueError(f"sequence length {T} exceeds max_len {self.max_len}")
        x = self.drop(self.item_emb(items))  # (B, T, D); no sqrt(d) scaling, as in LLaMA
        for block in self.blocks:
            x = block(x, self.rope)
        return self.norm_f(x)  # (B, T, D)

    # -- incremental serving ----------------------------------------------------------
    def init_state(self, batch_size: int, device=None):
        """KV cache of RoPE-rotated keys and values: {"k", "v": (n_blocks, B, H, t, hs)},
        t = events seen so far (starts at 0; it is also the next event's position)."""
        p = self.item_emb.weight
        device = device if device is not None else p.device
        H = self.cfg.n_heads
        shape = (len(self.blocks), batch_size, H, 0, self.cfg.d // H)
        return {"k": torch.zeros(shape, device=device, dtype=p.dtype), "v": torch.zeros(shape, device=device, dtype=p.dtype)}

    @torch.no_grad()
    def prefill(self, items: torch.Tensor):
        """The state (and last hidden (B, D)) after ``items`` (B, T), unpadded, in one pass:
        what T ``step`` calls give (a server rebuilding the KV cache of a slid window)."""
        x = self.drop(self.item_emb(items))  # (B, T, D)
        ks, vs = [], []
        for block in self.blocks:
            x, k, v = block(x, self.rope, keep_kv=True)
            ks.append(k)
            vs.append(v)
        return {"k": torch.stack(ks), "v": torch.stack(vs)}, self.norm_f(x[:, -1])

    def step(self, state, item, time=None):
        """One new event per row -> (new state, hidden (B, D)); times are not used and the
        old state is not modified."""
        if state["k"].shape[3] >= self.max_len:
            raise ValueError(f"state already holds max_len={self.max_len} events; re-encode the last {self.max_len - 1} and continue")
        x = self.drop(self.item_emb(item))  # (B, D)
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            x, K, V = block.step(x, state["k"][i], state["v"][i], self.rope)
            ks.append(K)
            vs.append(V)
        return {"k": torch.stack(ks), "v": torch.stack(vs)}, self.norm_f(x)
