"""Full-ranking evaluation with explicit exclude_seen and breakdowns (DESIGN.md §4)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .data.batching import eval_batches
from .data.sequences import Split, empty_stage_message
from .metrics import per_user_metrics, target_ranks
from .progress import progress as show_progress

class ScoresNaN(ValueError):
    """A model scored NaN (it diverged): no metric of it may be reported."""


LENGTH_BUCKETS = (0, 10, 20, 50, 100, 200)  # history-length bucket edges (last one open)


@dataclass(frozen=True)
class EvalConfig:
    ks: tuple[int, ...] = (10, 50)  # cut-offs K of HR@K and NDCG@K
    exclude_seen: bool = True  # rank only items not already in the user's input (as the HSTU/PCRec papers)
    batch_size: int = 512  # users scored at once
    metric: str = "ndcg@10"  # what early stopping watches
    head_frac: float = 0.2  # the most popular items that make up this fraction of the catalogue are "head"
    # diagnostic only: also evaluate the test split after every epoch and record it in the
    # history ("test_monitor"). Nothing reads it back: early stopping, the saved weights and
    # the reported test stay on validation. It shows how a protocol's reported epoch compares
    # with the test's own best epoch (generative-recommenders' trainer evaluates each user's
    # last event every interval, and its maintainers read results at an epoch chosen by the
    # user: meta-recsys/generative-recommenders issue #61)
    monitor_test: bool = False


def train_item_counts(split: Split) -> np.ndarray:
    """Item popularity counted on training events only (no leakage into breakdowns or
    samplers): (n_items + 1,), counts[0] = 0."""
    d = split.data
    within = np.arange(d.n_interactions) - np.repeat(d.offsets[:-1], d.lengths)
    is_train = within < np.repeat(split.train_len, d.lengths)
    return np.bincount(d.items[is_train], minlength=d.n_items + 1)


@torch.no_grad()
def rank_targets(model, split: Split, stage: str, cfg: EvalConfig, device="cpu", users=None, progress: bool | None = None):
    """(ranks, users, history lengths, targets) for every user evaluated at ``stage``.

    ``progress``: None shows a transient bar on a terminal and, without one, a line every
    PERSEQ_PROGRESS_SECONDS (30 s) once evaluation takes that long (large catalogues); False
    shows nothing."""
    was_training = model.training
    model.eval()
    ranks, us, hl, tg = [], [], [], []
    n_users = len(split.eval_users(stage) if users is None else users)
    batches = show_progress(eval_batches(split, stage, model.max_input_len, cfg.batch_size, users),
                            f"evaluating {stage} ({n_users} users)", total=-(-n_users // cfg.batch_size),
                            unit="batches", enabled=progress)
    # a model with per-user parameters (a federated PFSR's personal ones) is told each row's user
    who = getattr(model, "wants_users", False)
    for b in batches:
        scores = model.scores(
            b.inputs.to(device),
            b.lengths.to(device),
            None if b.times is None else b.times.to(device),
            None if b.target_time is None else b.target_time.to(device),
            **({"users": b.users} if who else {}),
        ).float()  # (B, I + 1)
        if torch.isnan(scores).any():
            # NaN compares false with everything, so a NaN target would rank first and score
            # HR = 1: a diverged model must not report its best metrics
            raise ScoresNaN(f"the model scored NaN for {int(torch.isnan(scores).any(1).sum())} of {len(b.users)} "
                             f"users at the {stage} stage: training diverged (try a lower train.lr)")
        if cfg.exclude_seen:
            scores[b.seen_rows.to(device), b.seen_items.to(device)] = float("-inf")
        ranks.append(target_ranks(scores, b.target.to(device)).cpu())
        us.append(b.users)
        hl.append(b.history_len)
        tg.append(b.target.numpy())
    model.train(was_training)
    if not ranks:
        return torch.zeros(0, dtype=torch.long), np.zeros(0, int), np.zeros(0, int), np.zeros(0, int)
    return torch.cat(ranks), np.concatenate(us), np.concatenate(hl), np.concatenate(tg)


def evaluate(model, split: Split, stage: str = "test", cfg: EvalConfig = EvalConfig(), device="cpu", breakdown: bool = False,
             progress: bool | None = None) -> dict:
    """Mean metrics over the users evaluated at ``stage``; with ``breakdown``, the same by
    target popularity (head / tail) and by history-length bucket. A stage without users is
    a ``ValueError`` (a mean over no users is NaN, and no result may hold NaN)."""
    if len(split.eval_users(stage)) == 0:
        raise ValueError(empty_stage_message(split, stage))
    ranks, _, hist_len, targets = rank_targets(model, split, stage, cfg, device, progress=progress)
    return summarize_ranks(ranks, hist_len, targets, split, cfg, breakdown)


def summarize_ranks(ranks, hist_len, targets, split: Split, cfg: EvalConfig, breakdown: bool = False) -> dict:
    """``evaluate``'s result from ``rank_targets``' output: mean metrics, and with
    ``breakdown`` the same by target popularity (head / tail) and history-length bucket."""
    per = per_user_metrics(ranks, cfg.ks)
    out: dict = {k: v.mean().item() for k, v in per.items()}
    out["n_users"] = int(len(ranks))
    out["exclude_seen"] = cfg.exclude_seen
    if breakdown and len(ranks):
        counts = train_item_counts(split)
        order = np.argsort(-counts[1:], kind="stable") + 1
        head = np.zeros(len(counts), bool)
        head[order[: max(1, int(round(cfg.head_frac * (len(counts) - 1))))]] = True
        groups = {"head": head[targets], "tail": ~head[targets]}
        edges = list(LENGTH_BUCKETS) + [np.inf]
        for lo, hi in zip(edges[:-1], edges[1:]):
            name = f"len[{lo},{'inf' if hi == np.inf else int(hi)})"
            groups[name] = (hist_len >= lo) & (hist_len < hi)
        out["breakdown"] = {
            g: {"n_users": int(m.sum()), **{k: float(v[torch.from_numpy(m)].mean()) for k, v in per.items()}}
            for g, m in groups.items()
            if m.any()
        }
    return out
