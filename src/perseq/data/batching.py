"""Batches for training and evaluation, built by vectorized numpy gathers from the jagged
arrays (no per-user Python lists in the hot path).

Layout: sequences are RIGHT-padded with item 0. With causal models a real position never
attends to a later (padding) position, so no key-padding mask is needed and the fused
causal attention kernel can be used; the output at a padding position is ignored.

Training (DESIGN.md §3): every position of a user's training prefix is a next-item target
in one pass. A prefix longer than ``max_len`` is cut into windows of ``max_len`` targets
aligned to its end (``windows="all"``), or only its most recent window is used
(``windows="last"``, the original SASRec recipe).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .sequences import Split


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) long, right-padded with 0
    targets: torch.Tensor  # (B, T) long, 0 = no target at this position
    times: torch.Tensor | None  # (B, T) long or None
    lengths: torch.Tensor  # (B,) long, number of real input positions
    target_times: torch.Tensor | None = None  # (B, T) long: each target's timestamp (causal windows with times)

    def to(self, device) -> "Batch":
        return Batch(
            self.inputs.to(device),
            self.targets.to(device),
            None if self.times is None else self.times.to(device),
            self.lengths.to(device),
            None if self.target_times is None else self.target_times.to(device),
        )


def _gather(values: np.ndarray, base: np.ndarray, lengths: np.ndarray, width: int, fill=0) -> np.ndarray:
    """values[base[b] + t] for t < lengths[b], else fill -> array (B, width)."""
    t = np.arange(width)
    valid = t[None, :] < lengths[:, None]
    idx = np.where(valid, base[:, None] + t[None, :], 0)
    return np.where(valid, values[idx], fill)


class TrainWindows:
    """The training windows of a split and a bucketed, seeded batch order over them."""

    def __init__(self, split: Split, max_len: int, windows: str = "all", cloze: bool = False):
        if windows not in ("all", "last"):
            raise ValueError(f"windows must be 'all' or 'last', got {windows!r}")
        data = split.data
        self.data, self.max_len, self.cloze = data, max_len, cloze
        n_pairs = np.maximum(split.train_len - 1, 0)  # (input, next-item) pairs per user
        users = np.flatnonzero(n_pairs > 0)
        n_pairs = n_pairs[users]
        n_win = -(-n_pairs // max_len) if windows == "all" else np.ones_like(n_pairs)
        w_user = np.repeat(users, n_win)
        # window k of a user (k = 0 is the most recent) ends k*max_len pairs before the end
        k = np.arange(len(w_user)) - np.repeat(np.cumsum(n_win) - n_win, n_win)
        end = np.repeat(n_pairs, n_win) - k * max_len
        start = np.maximum(end - max_len, 0)
        self.user, self.start, self.length = w_user, start, end - start
        self.n_targets = int(self.length.sum())

    def __len__(self) -> int:
        return len(self.user)

    def batch_order(self, batch_size: int, seed: int, bucket: int = 64, subset: np.ndarray | None = None) -> list[np.ndarray]:
        """Shuffled windows, grouped so that a batch holds windows of similar length (less
        padding: ML-1M's median length is 96 against max_len 200), batches in random order.
        Deterministic in ``seed`` so a resumed run sees the same batches. ``subset``: only
        these windows (a federated client's own); all of them in order is the same as none."""
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(self)) if subset is None else np.asarray(subset)[rng.permutation(len(subset))]
        group = batch_size * bucket
        batches = []
        for g in range(0, len(perm), group):
            chunk = perm[g : g + group]
            chunk = chunk[np.argsort(-self.length[chunk], kind="stable")]
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        order = rng.permutation(len(batches))
        return [batches[i] for i in order]

    def make_batch(self, idx: np.ndarray) -> Batch:
        d = self.data
        base = d.offsets[self.user[idx]] + self.start[idx]
        lens = self.length[idx]
        if self.cloze:
            # bidirectional models see the whole window including its last target
            lens = lens + 1
        width = int(lens.max())
        seq = _gather(d.items, base, lens, width)
        times = None if d.times is None else torch.from_numpy(_gather(d.times, base, lens, width))
        if self.cloze:
            return Batch(torch.from_numpy(seq).long(), torch.from_numpy(seq).long(), times, torch.from_numpy(lens))
        tgt = _gather(d.items, base + 1, lens, width)
        tgt_times = None if d.times is None else torch.from_numpy(_gather(d.times, base + 1, lens, width))
        return Batch(torch.from_numpy(seq).long(), torch.from_numpy(tgt).long(), times, torch.from_numpy(lens), tgt_times)


@dataclass
class EvalBatch:
    users: np.ndarray  # (B,) user indices
    inputs: torch.Tensor  # (B, T) most recent <= max_len events before the target
    times: torch.Tensor | None
    lengths: torch.Tensor  # (B,)
    target: torch.Tensor  # (B,) item ids
    target_time: torch.Tensor | None  # (B,) time of the target event (for time-aware models)
    seen_rows: torch.Tensor  # (S,) row in batch of each seen (row, item) pair
    seen_items: torch.Tensor  # (S,) item id, the whole history before the target
    history_len: np.ndarray  # (B,) full history length (for length-bucket breakdowns)


def recent_inputs(data, users: np.ndarray, positions: np.ndarray, max_len: int):
    """The last ``max_len`` events before ``positions`` per user, right-padded:
    (items (B, T) long, times (B, T) or None, lengths (B,) numpy)."""
    n_in = np.minimum(positions, max_len)
    base = data.offsets[users] + positions - n_in
    width = int(n_in.max())
    items = torch.from_numpy(_gather(data.items, base, n_in, width)).long()
    times = None if data.times is None else torch.from_numpy(_gather(data.times, base, n_in, width))
    return items, times, n_in


def history_items(data, users: np.ndarray, positions: np.ndarray):
    """Every event before ``positions`` (not only the model's window), as (row in batch,
    item id) long tensors: what exclude_seen masks."""
    rows = np.repeat(np.arange(len(users)), positions)
    within = np.arange(int(positions.sum())) - np.repeat(np.cumsum(positions) - positions, positions)
    items = data.items[np.repeat(data.offsets[users], positions) + within]
    return torch.from_numpy(rows), torch.from_numpy(items.astype(np.int64))


def eval_batches(split: Split, stage: str, max_len: int, batch_size: int, users: np.ndarray | None = None):
    """Yield EvalBatch over the users evaluated at ``stage``: input = the last ``max_len``
    events before the target, ``seen`` = every event before it (for exclude_seen)."""
    d = split.data
    pos = split.positions(stage)
    users = split.eval_users(stage) if users is None else users
    # similar lengths in a batch -> less padding; metrics are means, order is irrelevant
    users = users[np.argsort(np.minimum(pos[users], max_len), kind="stable")]
    for s in range(0, len(users), batch_size):
        u = users[s : s + batch_size]
        p = pos[u]
        inputs, times, n_in = recent_inputs(d, u, p, max_len)
        tgt_idx = d.offsets[u] + p
        rows, hist = history_items(d, u, p)
        yield EvalBatch(
            users=u,
            inputs=inputs,
            times=times,
            lengths=torch.from_numpy(n_in),
            target=torch.from_numpy(d.items[tgt_idx].astype(np.int64)),
            target_time=None if d.times is None else torch.from_numpy(d.times[tgt_idx]),
            seen_rows=rows,
            seen_items=hist,
            history_len=p,
        )
