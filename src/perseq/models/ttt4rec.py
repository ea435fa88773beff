"""TTT4Rec (Yang et al., 2024): sequence blocks whose hidden state is itself a small model
updated by gradient steps inside the forward pass (TTT-Linear, Sun et al., 2024,
"Learning to (Learn at Test Time)").

Per head, the hidden state is a matrix W (hs × hs). Each event x_t makes a self-supervised
view pair (k_t, v_t) and takes one gradient step on the reconstruction loss
ℓ(W) = ½‖k_t W − v_t‖²:  W ← W − η_t k_tᵀ (k_t W − v_t); the output reads z_t = q_t W.

Mini-batch TTT: inside a mini-batch of b events every gradient is taken at the W the
mini-batch started from (W₀), which turns the b sequential updates into matmuls (the
"dual form"):
    E = K W₀ − V                                   (b, hs) errors at W₀
    Z = Q W₀ − (tril(Q Kᵀ) · diag(η)) E            outputs, causal inside the mini-batch
    W₁ = W₀ − Kᵀ (η ⊙ E)                           the state handed to the next mini-batch
so training is parallel inside a mini-batch and linear in length overall, and ``step``
replays exactly the same arithmetic one event at a time (O(1) per event).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.dropout import Dropout
from .base import SeqRecModel
from .sasrec import _init


@dataclass(frozen=True)
class TTT4RecConfig:
    n_items: int
    max_len: int = 200
    d: int = 64
    n_blocks: int = 2
    n_heads: int = 2
    dropout: float = 0.2
    mini_batch: int = 16  # TTT mini-batch size b
    base_lr: float = 1.0  # η_t = base_lr · sigmoid(w·x_t) / head_dim, as in TTT-Linear


class TTTLinear(nn.Module):
    def __init__(self, cfg: TTT4RecConfig):
        super().__init__()
        self.H, self.hs, self.b = cfg.n_heads, cfg.d // cfg.n_heads, cfg.mini_batch
        assert cfg.d % cfg.n_heads == 0
        self.base_lr = cfg.base_lr
        self.qkv = nn.Linear(cfg.d, 3 * cfg.d)
        self.lr_gate = nn.Linear(cfg.d, cfg.n_heads)  # per-token, per-head learning rate
        self.W0 = nn.Parameter(torch.randn(cfg.n_heads, self.hs, self.hs) * 0.02)  # learned initial state
        self.ln = nn.LayerNorm(self.hs)
        self.out = nn.Linear(cfg.d, cfg.d)

    def _project(self, x):  # x: (B, T, D)
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.H, self.hs).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hs)
        eta = self.base_lr * torch.sigmoid(self.lr_gate(x)).transpose(1, 2) / self.hs  # (B, H, T)
        return q, k, v, eta

    def _read(self, z, x_shape):  # z: (B, H, T, hs) -> (B, T, D)
        B, T, D = x_shape
        # LayerNorm per head before mixing heads: W's scale drifts with the updates
        return self.out(self.ln(z).transpose(1, 2).reshape(B, T, D))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v, eta = self._project(x)
        W = self.W0.expand(B, -1, -1, -1)  # (B, H, hs, hs)
        outs = []
        # split, not one slice per mini-batch: a slice's backward writes a zero tensor of the
        # full (B, H, T, hs) and adds it up (O(T²/b) memory traffic), split's is one cat
        chunks = zip(q.split(self.b, 2), k.split(self.b, 2), v.split(self.b, 2), eta.split(self.b, 2))
        for qc, kc, vc, ec in chunks:  # (B, H, b, hs) × 3, (B, H, b)
            E = kc @ W - vc  # (B, H, b, hs)
            attn = torch.tril(qc @ kc.transpose(-1, -2)) * ec[:, :, None, :]  # (B, H, b, b)
            outs.append(qc @ W - attn @ E)
            W = W - kc.transpose(-1, -2) @ (ec[..., None] * E)
        return self._read(torch.cat(outs, 2), x.shape)

    def step(self, x, state):
        """x: (B, D). state: (W₀ at the mini-batch start, accumulated update, index in it)."""
        B, D = x.shape
        q, k, v, eta = self._project(x[:, None])  # (B, H, 1, hs), eta (B, H, 1)
        W0, acc, i = state
        E = k @ W0 - v  # gradient taken at W₀, as in the mini-batch form
        acc = acc + k.transpose(-1, -2) @ (eta[..., None] * E)  # (B, H, hs, hs)
        z = q @ (W0 - acc)
        i += 1
        if i == self.b:  # mini-batch boundary: fold the accumulated steps into W₀
            W0, acc, i = W0 - acc, torch.zeros_like(acc), 0
        return self._read(z, (B, 1, D))[:, 0], (W0, acc, i)


class TTTBlock(nn.Module):
    def __init__(self, cfg: TTT4RecConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d), nn.LayerNorm(cfg.d)
        self.ttt = TTTLinear(cfg)
        self.ffn = nn.Sequential(nn.Linear(cfg.d, 4 * cfg.d), nn.GELU(), Dropout(cfg.dropout), nn.Linear(4 * cfg.d, cfg.d))
        self.drop = Dropout(cfg.dropout)

    def forward(self, x):
        x = x + self.drop(self.ttt(self.ln1(x)))
        return x + self.drop(self.ffn(self.ln2(x)))

    def step(self, x, state):
        h, state = self.ttt.step(self.ln1(x), state)
        x = x + h
        return x + self.ffn(self.ln2(x)), state


class TTT4Rec(SeqRecModel):
    Config = TTT4RecConfig
    incremental = True

    def __init__(self, cfg: TTT4RecConfig):
        super().__init__(cfg.n_items, cfg.max_len)
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.d, padding_idx=0)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(TTTBlock(cfg) for _ in range(cfg.n_blocks))
        self.ln_f = nn.LayerNorm(cfg.d)
        self.apply(_init)

    def encode(self, items, times=None):
        # no position table: the TTT state is itself ordered, like a recurrent state
        x = self.drop(self.item_emb(items) * self.cfg.d**0.5)  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def init_state(self, batch_size: int, device=None):
        states = []
        for block in self.blocks:
            W0 = block.ttt.W0.detach().to(device).expand(batch_size, -1, -1, -1).clone()
            states.append((W0, torch.zeros_like(W0), 0))
        return states

    def step(self, state, item, time=None):
        x = self.item_emb(item) * self.cfg.d**0.5  # (B, D)
        new = []
        for block, s in zip(self.blocks, state):
            x, s = block.step(x, s)
            new.append(s)
        return new, self.ln_f(x)
