"""Is PCRec-simple better than its backbone? Paired on the same checkpoint, per user.

``paired(model, adapted, split, stage, eval_cfg)`` ranks every user's target twice, with
the plain model and with the adapted one, and reports both means and the mean per-user
gain with a 95% bootstrap confidence interval over users (the users are resampled; the
pairing removes the checkpoint's own luck, which a comparison of two training runs would
carry). ``perseq adapt RUN --test`` writes it for the stored choice.
"""
from __future__ import annotations

import numpy as np

from ..evaluate import EvalConfig, rank_targets, summarize_ranks
from ..metrics import per_user_metrics


def bootstrap_ci(diff: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diff`` (users resampled with replacement)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_boot, len(diff)))
    means = diff[idx].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def paired(model, adapted, split, stage: str, cfg: EvalConfig, metric: str | None = None, n_boot: int = 2000) -> dict:
    """Both models' results at ``stage`` (``evaluate``'s, with the head/tail and length
    breakdowns) and the per-user gain of ``adapted`` in ``metric`` (default: the
    early-stopping metric) with its 95% bootstrap interval."""
    metric = metric or cfg.metric
    r0, u0, hl, tg = rank_targets(model, split, stage, cfg)
    r1, u1, _, _ = rank_targets(adapted, split, stage, cfg)
    assert np.array_equal(u0, u1), "both rankings must cover the same users in the same order"
    diff = (per_user_metrics(r1, cfg.ks)[metric] - per_user_metrics(r0, cfg.ks)[metric]).numpy()
    lo, hi = bootstrap_ci(diff, n_boot)
    return {
        "stage": stage,
        "n_users": int(len(diff)),
        "exclude_seen": cfg.exclude_seen,
        "plain": summarize_ranks(r0, hl, tg, split, cfg, breakdown=True),
        "adapted": summarize_ranks(r1, hl, tg, split, cfg, breakdown=True),
        "gain": {"metric": metric, "mean": float(diff.mean()), "ci95": [lo, hi],
                 "users_better": int((diff > 0).sum()), "users_worse": int((diff < 0).sum())},
    }
