"""Top-K recommendations with raw ids, written as CSV ``user_id,rank,item_id,score``."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from .data.batching import history_items, recent_inputs
from .data.sequences import Split


@torch.no_grad()
def topk_for_positions(model, data, users: np.ndarray, positions: np.ndarray, k: int, exclude_seen: bool, batch_size: int = 512):
    """Yield (users, top item ids (B, k), scores (B, k)) for inputs = events before ``positions``."""
    model.eval()
    for s in range(0, len(users), batch_size):
        u, p = users[s : s + batch_size], positions[s : s + batch_size]
        items, times, n_in = recent_inputs(data, u, p, model.max_input_len)
        request = None
        if times is not None and getattr(model, "query_time_input", False):
            # models that score for a request time: the held-out event's time (as the
            # evaluation uses), or right after the last event when predicting beyond it
            request = torch.from_numpy(data.times[data.offsets[u] + np.minimum(p, data.lengths[u] - 1)])
        # a model with per-user parameters (a federated PFSR's personal ones) is told each row's user
        who = {"users": u} if getattr(model, "wants_users", False) else {}
        scores = model.scores(items, torch.from_numpy(n_in), times, request, **who).float()
        if exclude_seen:
            rows, seen = history_items(data, u, p)
            scores[rows, seen] = float("-inf")
        top = scores.topk(min(k, data.n_items), dim=1)
        yield u, top.indices.numpy(), top.values.numpy()


def predict_topk(model, split: Split, stage: str, k: int, out: str | Path, exclude_seen: bool = True) -> int:
    """stage "test"/"valid": the inputs used for that evaluation; "next": each user's whole
    history (what to recommend now). Rank 1 is the best item."""
    data = split.data
    if stage == "next":
        users = np.arange(data.n_users)
        positions = data.lengths.astype(np.int64)
    else:
        users = split.eval_users(stage)
        positions = split.positions(stage)[users]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "rank", "item_id", "score"])
        for u, top, val in topk_for_positions(model, data, users, positions, k, exclude_seen):
            for row in range(len(u)):
                uid = data.user_ids[u[row]]
                for r in range(top.shape[1]):
                    if np.isfinite(val[row, r]):
                        w.writerow([uid, r + 1, data.item_ids[top[row, r]], f"{val[row, r]:.6g}"])
    return len(users)
