"""Mamba4Rec (Liu et al., 2024, "Mamba4Rec: Towards Efficient Sequential Recommendation
with Selective State Space Models"): item embedding -> dropout -> LayerNorm -> [Mamba
block -> dropout -> (residual) -> LayerNorm -> position-wise FFN] × n_layers. No position
embeddings: the selective state space is ordered by construction. Full-softmax CE over the
tied item table, as in the paper.

Defaults are the paper's ML-1M setting from its code (github.com/chengkai-liu/Mamba4Rec,
config.yaml: hidden 64, d_state 32, d_conv 4, expand 2, num_layers 1, dropout 0.2, CE loss,
max length 200 for ML-1M and 50 for Amazon; trained with Adam, lr 1e-3, batch 2048).
Of that code's choices two are kept and one is not:
* kept: with a single layer the Mamba output is *not* added back to its input (its
  ``MambaLayer``: residual only for stacked layers); ``residual`` overrides that;
* kept: N(0, 0.02) init for the item table and the FFN, LayerNorm eps 1e-12;
* optional (``init="mamba4rec_code"``): its ``_init_weights`` re-initializes every
  nn.Linear inside the Mamba block too, which zeroes the dt bias (Δ ≈ softplus(0) = 0.69
  in every channel at the start). The default keeps mamba_ssm's own init (Δ log-uniform in
  [1e-3, 0.1] through the dt bias, S4D-real A).

Padding is on the right, after the real items, so the causal scan never lets it reach a
real position and ``encode`` needs no mask. ``step`` runs the same block on one event with
a conv window and an SSM state per layer: O(1) time and memory per event.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.dropout import Dropout
from ..ops.gelu_dropout import bias_gelu_dropout
from ..ops.selective_scan import (
    BACKENDS,
    causal_conv1d,
    causal_conv1d_step,
    selective_scan,
    selective_scan_step,
)
from .base import SeqRecModel


@dataclass(frozen=True)
class Mamba4RecConfig:
    n_items: int
    max_len: int = 200
    d: int = 64  # d_model
    d_state: int = 32  # N
    d_conv: int = 4  # causal depthwise conv width before the scan
    expand: int = 2  # inner width E = expand * d
    n_layers: int = 1
    dropout: float = 0.2
    backend: str = "auto"  # selective scan: "auto" | "torch" | "numba" (fused CPU kernels) | "cuda" (mamba_ssm)
    # chunk of the torch scan; None sizes it to the CPU cache (see ops/selective_scan.py)
    chunk: int | None = None
    # residual around the Mamba block; None = as Mamba4Rec's code: only when n_layers > 1
    residual: bool | None = None
    # "mamba_ssm": the Mamba block keeps mamba_ssm's init (Δ starts in [1e-3, 0.1]: slow
    # decays, long memory); "mamba4rec_code": as the authors' code, every Linear re-drawn
    # N(0, 0.02) with zero bias, so Δ starts near softplus(0) = 0.69 (fast decays)
    init: str = "mamba_ssm"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; valid: {', '.join(BACKENDS)}")
        if self.init not in ("mamba_ssm", "mamba4rec_code"):
            raise ValueError(f"unknown init {self.init!r}; valid: mamba_ssm, mamba4rec_code")


class Mamba(nn.Module):
    """The Mamba mixer (Gu & Dao, 2023; ``mamba_ssm.modules.mamba_simple.Mamba``), same
    parameter names and init: in_proj -> (x, z); x -> causal depthwise conv -> SiLU ->
    x_proj -> (Δ, B, C); y = scan(x, Δ, A, B, C, D) ⊙ SiLU(z) -> out_proj."""

    def __init__(self, d: int, d_state: int, d_conv: int, expand: int, backend: str = "auto", chunk: int | None = None,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        E, N = expand * d, d_state
        self.E, self.N, self.backend, self.chunk = E, N, backend, chunk
        self.dt_rank = math.ceil(d / 16)
        self.in_proj = nn.Linear(d, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1)  # weight (E, 1, d_conv)
        self.x_proj = nn.Linear(E, self.dt_rank + 2 * N, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, E)
        self.out_proj = nn.Linear(E, d, bias=False)

        # Δ = softplus(dt_proj(·)) starts log-uniform in [dt_min, dt_max]: the bias is the
        # inverse softplus of such a Δ (mamba_simple.py); small weights keep it there at first
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real: A = -(1, 2, ..., N) for every channel, stored as log(-A) so it stays negative
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))  # (E, N)
        self.D = nn.Parameter(torch.ones(E))

    def _x_proj(self, x):
        """x (..., E) after conv+SiLU -> dt (..., R), B, C (..., N): Δ's low-rank input and the
        state's input and read-out vectors."""
        return self.x_proj(x).split([self.dt_rank, self.N, self.N], -1)

    def _ssm_inputs(self, x):
        """x (..., E) after conv+SiLU -> Δ (..., E), B, C (..., N)."""
        dt, B, C = self._x_proj(x)
        return F.softplus(self.dt_proj(dt)), B, C

    def forward(self, u):
        # in_proj as two products, the x half and the z half: each comes out contiguous, which
        # the kernels want (chunking one (B, L, 2E) product gave strided halves: two copies
        # forward and a concatenation backward)
        W = self.in_proj.weight  # (2E, d)
        x, z = F.linear(u, W[: self.E]), F.linear(u, W[self.E :])  # (B, L, E) each
        x = causal_conv1d(x, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu", backend=self.backend)
        dt, B, C = self._x_proj(x)  # (B, L, R), (B, L, N), (B, L, N)
        A = -torch.exp(self.A_log)  # (E, N)
        # Δ = softplus(dt_proj(dt)), (scan + D x) ⊙ SiLU(z): the dt projection, the
        # softplus, the D term and the gate go inside the scan kernels (as _ssm_inputs and
        # step do in torch)
        y = selective_scan(x, dt, A, B, C, self.D, backend=self.backend, chunk=self.chunk, z=z,
                           delta_bias=self.dt_proj.bias, delta_softplus=True, delta_proj=self.dt_proj.weight)  # (B, L, E)
        return self.out_proj(y)  # (B, L, d)

    def init_state(self, batch_size: int, device=None, dtype=None):
        conv = torch.zeros(batch_size, self.E, self.conv1d.kernel_size[0] - 1, device=device, dtype=dtype)  # last d_conv-1 inputs
        ssm = torch.zeros(batch_size, self.E, self.N, device=device, dtype=dtype)  # h
        return conv, ssm

    def step(self, u, state):
        """u (B, d), state (conv (B, E, d_conv-1), ssm (B, E, N)) -> (out (B, d), state)."""
        conv, ssm = state
        x, z = self.in_proj(u).chunk(2, -1)  # (B, E)
        conv, x = causal_conv1d_step(conv, x, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu")
        delta, B, C = self._ssm_inputs(x)
        ssm, y = selective_scan_step(ssm, x, delta, -torch.exp(self.A_log), B, C, self.D)
        return self.out_proj(y * F.silu(z)), (conv, ssm)


class FeedForward(nn.Module):
    """Position-wise FFN d -> 4d -> d with GELU, dropout, residual and LayerNorm (post-norm,
    as Mamba4Rec's ``FeedForward``)."""

    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.w_1, self.w_2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop = Dropout(dropout)
        self.ln = nn.LayerNorm(d, eps=1e-12)

    def forward(self, x):
        # dropout(GELU(x W1ᵀ + b1)) in one fused kernel pair (same masks as self.drop would
        # draw, ~3 ms less per ML-1M training step); the torch line everywhere else
        h = bias_gelu_dropout(F.linear(x, self.w_1.weight), self.w_1.bias, self.drop.p, self.training)  # (B, L, 4d)
        return self.ln(self.drop(self.w_2(h)) + x)


class MambaLayer(nn.Module):
    def __init__(self, cfg: Mamba4RecConfig):
        super().__init__()
        self.mamba = Mamba(cfg.d, cfg.d_state, cfg.d_conv, cfg.expand, cfg.backend, cfg.chunk)
        self.drop = Dropout(cfg.dropout)
        self.ln = nn.LayerNorm(cfg.d, eps=1e-12)
        self.ffn = FeedForward(cfg.d, cfg.dropout)
        self.residual = cfg.n_layers > 1 if cfg.residual is None else cfg.residual

    def _post(self, x, h):
        h = self.drop(h)
        return self.ffn(self.ln(h + x if self.residual else h))

    def forward(self, x):
        return self._post(x, self.mamba(x))  # (B, L, d)

    def step(self, x, state):
        h, state = self.mamba.step(x, state)
        return self._post(x, h), state  # (B, d)


class Mamba4Rec(SeqRecModel):
    Config = Mamba4RecConfig
    incremental = True

    def __init__(self, cfg: Mamba4RecConfig):
        super().__init__(cfg.n_items, cfg.max_len)
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.d, padding_idx=0)
        self.drop = Dropout(cfg.dropout)
        self.ln = nn.LayerNorm(cfg.d, eps=1e-12)
        self.layers = nn.ModuleList(MambaLayer(cfg) for _ in range(cfg.n_layers))
        nn.init.normal_(self.item_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        for layer in self.layers:
            lins = [m for m in layer.modules() if isinstance(m, nn.Linear)] if cfg.init == "mamba4rec_code" else [layer.ffn.w_1, layer.ffn.w_2]
            for lin in lins:
                nn.init.normal_(lin.weight, std=0.02)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)

    def encode(self, items, times=None):
        # no length check: nothing here is tied to max_len, which only sets the window the
        # data pipeline cuts
        x = self.ln(self.drop(self.item_emb(items)))  # (B, L, d)
        for layer in self.layers:
            x = layer(x)
        return x  # (B, L, d)

    def init_state(self, batch_size: int, device=None):
        """Per layer (conv window (B, E, d_conv-1), SSM state (B, E, N)), all zeros."""
        dtype = self.item_emb.weight.dtype
        return [layer.mamba.init_state(batch_size, device, dtype) for layer in self.layers]

    def step(self, state, item, time=None):
        x = self.ln(self.drop(self.item_emb(item)))  # (B, d)
        new = []
        for layer, s in zip(self.layers, state):
            x, s = layer.step(x, s)
            new.append(s)
        return new, x
