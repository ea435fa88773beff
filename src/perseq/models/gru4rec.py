"""GRU4Rec (Hidasi et al., ICLR 2016) in the next-item, all-positions form used by RecBole:
embedding -> dropout -> GRU -> projection back to the item-embedding space."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..ops.dropout import Dropout
from .base import SeqRecModel


@dataclass(frozen=True)
class GRU4RecConfig:
    n_items: int
    max_len: int = 200
    d: int = 64
    hidden: int = 128  # GRU state size (projected to d for scoring)
    n_layers: int = 1
    dropout: float = 0.2


class GRU4Rec(SeqRecModel):
    Config = GRU4RecConfig
    incremental = True

    def __init__(self, cfg: GRU4RecConfig):
        super().__init__(cfg.n_items, cfg.max_len)
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.d, padding_idx=0)
        self.drop = Dropout(cfg.dropout)
        self.gru = nn.GRU(cfg.d, cfg.hidden, cfg.n_layers, batch_first=True)
        self.out = nn.Linear(cfg.hidden, cfg.d)
        # Xavier init as in RecBole's GRU4Rec: the tiny N(0, 0.02) init used for the
        # transformers (which rescale by sqrt(d)) leaves the GRU's scores near zero and it
        # barely moves from there
        nn.init.xavier_uniform_(self.item_emb.weight)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        nn.init.xavier_uniform_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        for name, w in self.gru.named_parameters():
            if "weight" in name:
                nn.init.xavier_uniform_(w)

    def encode(self, items, times=None):
        x = self.drop(self.item_emb(items))  # (B, T, d)
        h, _ = self.gru(x)  # (B, T, hidden); causal by construction, padding comes last
        return self.out(h)  # (B, T, d)

    def init_state(self, batch_size: int, device=None):
        return torch.zeros(self.cfg.n_layers, batch_size, self.cfg.hidden, device=device)  # (layers, B, hidden)

    def step(self, state, item, time=None):
        h, state = self.gru(self.item_emb(item)[:, None], state)  # (B, 1, hidden): O(1) per event
        return state, self.out(h[:, 0])
