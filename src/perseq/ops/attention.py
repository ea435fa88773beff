"""Causal softmax attention: torch's fused ``scaled_dot_product_attention`` (the fast path)
or its reference line in plain ops, which ``torch.func.vmap`` can batch (it has no batching
rule for the fused CPU kernel and would loop over the batch; ``perseq.ops.reference_ops``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import reference_only


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(hs) + causal mask) v: q, k, v (B, H, T, hs) -> (B, H, T, hs)."""
    if not reference_only():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    T = q.shape[-2]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    w = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~causal, float("-inf")).softmax(-1)
    return F.dropout(w, dropout_p) @ v if dropout_p else w @ v
