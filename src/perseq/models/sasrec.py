"""SASRec: causal self-attention over the item sequence (Kang & McAuley, ICDM 2018).

Pre-LayerNorm blocks, learned absolute positions counted from the first item of the
window, item embeddings scaled by sqrt(d) as in the original code, tied output table.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.attention import causal_attention
from ..ops.dropout import Dropout
from .base import SeqRecModel


@dataclass(frozen=True)
class SASRecConfig:
    n_items: int
    max_len: int = 200
    d: int = 64
    n_blocks: int = 2
    n_heads: int = 1
    dropout: float = 0.2
    # Dropout on attention weights forces the unfused attention path (the weights must be
    # materialized to drop them), about 2x slower on CPU; hidden dropout alone regularizes.
    attn_dropout: float = 0.0
    ffn_mult: int = 1  # the original uses a d -> d point-wise FFN
    # Score by cosine (L2-normalized hidden states and item rows), as the HSTU codebase's
    # SASRec does; train it with a temperature (loss.temperature, e.g. 0.05)
    normalize_output: bool = False


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, n_heads: int, attn_dropout: float):
        super().__init__()
        assert d % n_heads == 0, f"d={d} must be divisible by n_heads={n_heads}"
        self.n_heads, self.attn_dropout = n_heads, attn_dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """One new position x (B, D) attending to the cached keys/values plus itself."""
        B, D = x.shape
        q, k, v = self.qkv(x).view(B, 3, self.n_heads, D // self.n_heads).unbind(1)  # 3 x (B, H, hs)
        cache["k"] = torch.cat([cache["k"], k[:, :, None]], 2) if "k" in cache else k[:, :, None]  # (B, H, t, hs)
        cache["v"] = torch.cat([cache["v"], v[:, :, None]], 2) if "v" in cache else v[:, :, None]
        y = F.scaled_dot_product_attention(q[:, :, None], cache["k"], cache["v"])  # (B, H, 1, hs)
        return self.proj(y.reshape(B, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hs)
        # right padding: real positions precede padding, so the causal mask alone keeps
        # padding out of every real position's view
        y = causal_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d)
        self.attn = CausalSelfAttention(cfg.d, cfg.n_heads, cfg.attn_dropout)
        self.ln2 = nn.LayerNorm(cfg.d)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.d, cfg.ffn_mult * cfg.d), nn.ReLU(), Dropout(cfg.dropout), nn.Linear(cfg.ffn_mult * cfg.d, cfg.d)
        )
        self.drop = Dropout(cfg.dropout)

    def forward(self, x):
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.ffn(self.ln2(x)))

    def step(self, x, cache):
        x = x + self.attn.step(self.ln1(x), cache)
        return x + self.ffn(self.ln2(x))


class SASRec(SeqRecModel):
    Config = SASRecConfig
    incremental = True
    state_grows = True  # a KV cache

    def __init__(self, cfg: SASRecConfig):
        super().__init__(cfg.n_items, cfg.max_len)
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
        self.ln_f = nn.LayerNorm(cfg.d)
        self.apply(_init)

    def encode(self, items, times=None):
        B, T = items.shape
        if T > self.max_len:
            raise ValueError(f"sequence length {T} exceeds max_len {self.max_len}")
        x = self.item_emb(items) * self.cfg.d**0.5 + self.pos_emb.weight[:T]  # (B, T, D)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = self._after_block(i, x, block(x))
        return self._out(self.ln_f(x))  # (B, T, D)

    def _after_block(self, i: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The stream after block ``i`` from its input ``x`` and output ``y``: the output
        (the predictive-coding variant, models/pcrec.py, corrects it here)."""
        return y

    def _out(self, h):
        return F.normalize(h, dim=-1) if self.cfg.normalize_output else h

    def output_embeddings(self):
        w = self.item_emb.weight[: self.n_items + 1]
        return F.normalize(w, dim=-1) if self.cfg.normalize_output else w

    # KV cache: per block the keys/values of every past position. Serving cost per event is
    # O(history) for attention (not O(history²) as re-encoding), up to max_len events,
    # since the learned absolute positions end there.
    def init_state(self, batch_size: int, device=None):
        return {"pos": 0, "blocks": [{} for _ in self.blocks]}

    @torch.no_grad()
    def prefill(self, items: torch.Tensor):
        """The state (and last hidden (B, D)) after ``items`` (B, T), unpadded, in one pass:
        what T ``step`` calls give, at the cost of one encode (a server rebuilding the KV
        cache of a slid window)."""
        B, T = items.shape
        state = self.init_state(B)
        x = self.item_emb(items) * self.cfg.d**0.5 + self.pos_emb.weight[:T]  # (B, T, D)
        for block, cache in zip(self.blocks, state["blocks"]):
            a = block.attn
            q, k, v = a.qkv(block.ln1(x)).view(B, T, 3, a.n_heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hs)
            cache["k"], cache["v"] = k, v
            x = x + a.proj(causal_attention(q, k, v).transpose(1, 2).reshape(B, T, -1))
            x = x + block.ffn(block.ln2(x))
        state["pos"] = T
        return state, self._out(self.ln_f(x[:, -1]))

    def step(self, state, item, time=None):
        pos = state["pos"]
        if pos >= self.max_len:
            raise ValueError(f"SASRec's positions end at max_len={self.max_len}; re-encode the most recent window instead")
        x = self.item_emb(item) * self.cfg.d**0.5 + self.pos_emb.weight[pos]  # (B, D)
        for block, cache in zip(self.blocks, state["blocks"]):
            x = block.step(x, cache)
        return {"pos": pos + 1, "blocks": state["blocks"]}, self._out(self.ln_f(x))


def _init(m: nn.Module):
    # small normal init (as in GPT-2 / the SASRec PyTorch ports); padding row stays zero
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
        if m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()
