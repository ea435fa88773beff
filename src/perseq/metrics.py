"""Ranking metrics under full ranking (DESIGN.md §4). Pure functions on tensors.

Pessimistic ties: rank = #items scoring >= the target, minus one (the target itself), so a
model that scores everything equal ranks every target last instead of first.
"""
from __future__ import annotations

import math

import torch


def target_ranks(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based pessimistic rank of each target. scores: (B, I) with excluded items at -inf;
    target: (B,) column index. A target scored -inf (excluded) ranks behind everything."""
    t = scores.gather(1, target[:, None])  # (B, 1)
    return (scores >= t).sum(1) - 1  # (B,)


def metrics_from_ranks(ranks: torch.Tensor, ks=(10, 50)) -> dict[str, float]:
    """HR@K (= Recall@K with one target), NDCG@K, and untruncated MRR, averaged."""
    r = ranks.double()
    out = {}
    for k in ks:
        hit = r < k
        out[f"hr@{k}"] = hit.double().mean().item()
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r)).mean().item()
    out["mrr"] = (1.0 / (r + 1.0)).mean().item()
    return out


def per_user_metrics(ranks: torch.Tensor, ks=(10, 50)) -> dict[str, torch.Tensor]:
    r = ranks.double()
    out = {}
    for k in ks:
        hit = r < k
        out[f"hr@{k}"] = hit.double()
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r))
    out["mrr"] = 1.0 / (r + 1.0)
    return out


def ndcg_single(rank: int, k: int) -> float:
    """Reference for one target (used by tests and docs)."""
    return 1.0 / math.log2(rank + 2) if rank < k else 0.0
