"""PFSR (arXiv 2603.22349): federated, personalized sequential recommendation on a Mamba
backbone. Only the paper's abstract (and its ICASSP 2025 precursor's) exists, naming three
parts and no details; everything below is OUR reading of those names (DESIGN.md §5), each
part switchable for ablations.

    items -> embedding -> [Mamba layer -> AMB read of the global memory] × n_layers
          -> VRM (the user's own response) -> scores against the item table

* Associative Mamba Block (``amb``): after each Mamba layer, every position reads a global
  associative memory, K learned prototype slots P (K, d) shared by all users (the server
  aggregates them with the rest of the shared weights), by attention over the slots:
      a_t = softmax(LN(x_t) Pᵀ / √d) P                     (B, L, d)
      x_t ← x_t + σ(W_g [x_t; a_t]) ⊙ (W_o a_t)
  so a user's state is completed with population-level profiles. Per position only: the
  block stays causal and linear in the length, and ``step`` stays O(1) per event.
* Variable Response Mechanism (``vrm``): the user's own FiLM response on the output,
      h ← h ⊙ (1 + s_u) + b_u,      s_u, b_u ∈ R^d, starting at 0 (the identity)
  The parameters are named ``personal.*``: a federated client trains them and never sends
  them (``perseq.federated.client``), and evaluation applies each user's own. Trained
  centrally they are one more shared vector.
* Dynamic Magnitude Loss: a client-side loss term, so it lives with the client step
  (``federated.dml``; ``perseq.federated.client``), not in the model.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from .mamba4rec import Mamba4Rec, Mamba4RecConfig


@dataclass(frozen=True)
class PFSRConfig(Mamba4RecConfig):
    amb: bool = True  # the Associative Mamba Block's global memory read after each Mamba layer
    memory_slots: int = 16  # K: prototype slots of the global associative memory
    vrm: bool = True  # the Variable Response Mechanism: each user's own FiLM scale and shift (personal.*)

    def __post_init__(self):
        super().__post_init__()
        if self.memory_slots < 1:
            raise ValueError(f"memory_slots={self.memory_slots}: must be at least 1")


class AssociativeMemory(nn.Module):
    """The AMB's read of K shared prototype slots, fused into the stream by a gate."""

    def __init__(self, d: int, slots: int):
        super().__init__()
        self.slots = nn.Parameter(torch.randn(slots, d) * 0.02)  # P (K, d)
        self.ln = nn.LayerNorm(d, eps=1e-12)
        self.gate = nn.Linear(2 * d, d)
        self.out = nn.Linear(d, d)
        nn.init.zeros_(self.out.weight)  # the block starts as plain Mamba4Rec
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) -> (..., d)."""
        attn = torch.softmax(self.ln(x) @ self.slots.T / math.sqrt(x.shape[-1]), -1)  # (..., K)
        a = attn @ self.slots  # (..., d)
        return x + torch.sigmoid(self.gate(torch.cat([x, a], -1))) * self.out(a)


class Response(nn.Module):
    """The VRM: one user's FiLM scale and shift (d each), identity at the start."""

    def __init__(self, d: int):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(d))
        self.shift = nn.Parameter(torch.zeros(d))

    def forward(self, h: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """h (B, ..., d); ``rows``: (scale, shift), each (B, d), one user's per row."""
        scale, shift = (self.scale, self.shift) if rows is None else rows
        if rows is not None and h.dim() == 3:
            scale, shift = scale[:, None], shift[:, None]
        return h * (1 + scale) + shift


class PFSR(Mamba4Rec):
    Config = PFSRConfig
    incremental = True

    def __init__(self, cfg: PFSRConfig):
        super().__init__(cfg)
        self.memory = nn.ModuleList(AssociativeMemory(cfg.d, cfg.memory_slots) for _ in self.layers) if cfg.amb else None
        # the attribute name makes the parameter names personal.scale / personal.shift
        self.personal = Response(cfg.d) if cfg.vrm else None
        self._rows = None  # per-row personal parameters while ``personal_rows`` is active

    @contextmanager
    def personal_rows(self, rows: dict[str, torch.Tensor]):
        """Score a batch whose rows belong to different users: ``rows`` holds every personal
        parameter by name with a leading batch dimension ({"personal.scale": (B, d),
        "personal.shift": (B, d)}), row b's in place of the model's own."""
        if self.personal is None:
            raise ValueError("this PFSR has no Variable Response Mechanism (vrm: false): nothing is personal")
        self._rows = (rows["personal.scale"], rows["personal.shift"])
        try:
            yield self
        finally:
            self._rows = None

    def _respond(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.personal is None else self.personal(h, self._rows)

    def encode(self, items, times=None):
        x = self.ln(self.drop(self.item_emb(items)))  # (B, L, d)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.memory is not None:
                x = self.memory[i](x)
        return self._respond(x)  # (B, L, d)

    def step(self, state, item, time=None):
        x = self.ln(self.drop(self.item_emb(item)))  # (B, d)
        new = []
        for i, (layer, s) in enumerate(zip(self.layers, state)):
            x, s = layer.step(x, s)
            if self.memory is not None:
                x = self.memory[i](x)
            new.append(s)
        return new, self._respond(x)
