"""BERT4Rec (Sun et al., CIKM 2019): bidirectional Transformer trained with the Cloze task;
to score the next item a [MASK] token is appended and its hidden state is used."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.dropout import Dropout
from .base import SeqRecModel
from .sasrec import _init


@dataclass(frozen=True)
class BERT4RecConfig:
    n_items: int
    max_len: int = 200
    d: int = 64
    n_blocks: int = 2
    n_heads: int = 2
    dropout: float = 0.2
    mask_prob: float = 0.2  # share of positions masked for the Cloze task
    # share of rows trained on their last item alone (every other item visible), the test
    # task's shape. The authors' data generator adds one such instance per sequence next to
    # its dupe_factor = 10 random maskings (gen_data_fin.py, mask_last), i.e. 1/11 ≈ 0.09;
    # 0 keeps plain cloze training.
    last_only_prob: float = 0.0


class BidirectionalBlock(nn.Module):
    def __init__(self, cfg: BERT4RecConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d), nn.LayerNorm(cfg.d)
        self.qkv, self.proj = nn.Linear(cfg.d, 3 * cfg.d), nn.Linear(cfg.d, cfg.d)
        self.ffn = nn.Sequential(nn.Linear(cfg.d, 4 * cfg.d), nn.GELU(), Dropout(cfg.dropout), nn.Linear(4 * cfg.d, cfg.d))
        self.drop = Dropout(cfg.dropout)

    def forward(self, x, key_mask):  # key_mask: (B, 1, 1, T) True = real token
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, H, T, hs)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, D)))
        return x + self.drop(self.ffn(self.ln2(x)))


class BERT4Rec(SeqRecModel):
    Config = BERT4RecConfig
    objective = "cloze"

    def __init__(self, cfg: BERT4RecConfig):
        super().__init__(cfg.n_items, cfg.max_len)
        self.cfg = cfg
        self.mask_id = cfg.n_items + 1
        self.item_emb = nn.Embedding(cfg.n_items + 2, cfg.d, padding_idx=0)  # + [MASK]
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(BidirectionalBlock(cfg) for _ in range(cfg.n_blocks))
        self.ln_f = nn.LayerNorm(cfg.d)
        self.apply(_init)

    @property
    def max_input_len(self) -> int:
        return self.max_len - 1  # one slot is taken by the appended [MASK]

    def encode(self, items, times=None):
        B, T = items.shape
        key_mask = (items != 0)[:, None, None, :]  # (B, 1, 1, T)
        x = self.drop(self.item_emb(items) + self.pos_emb.weight[:T])  # (B, T, D)
        for block in self.blocks:
            x = block(x, key_mask)
        return self.ln_f(x)

    def cloze_mask(self, items: torch.Tensor, generator: torch.Generator | None = None):
        """Mask each real token with prob mask_prob (at least the last one per row, so every
        row trains); with last_only_prob, that share of rows masks its last item only:
        returns (masked inputs, targets with 0 where not masked)."""
        real = items != 0
        m = (torch.rand(items.shape, generator=generator, device=items.device) < self.cfg.mask_prob) & real
        last = real.sum(1) - 1
        rows = ~m.any(1)  # rows that get their last item masked
        if self.cfg.last_only_prob > 0:  # (no extra draw otherwise: plain cloze keeps its random stream)
            only = torch.rand(items.shape[0], generator=generator, device=items.device) < self.cfg.last_only_prob
            m &= ~only[:, None]
            rows |= only
        m[rows, last[rows]] = True
        return torch.where(m, torch.full_like(items, self.mask_id), items), torch.where(m, items, torch.zeros_like(items))

    def predict_hidden(self, items, lengths, times=None, target_time=None):
        B = items.shape[0]
        x = torch.cat([items, items.new_zeros(B, 1)], 1)  # room for [MASK]
        x[torch.arange(B), lengths] = self.mask_id
        h = self.encode(x)
        return h[torch.arange(B), lengths]
