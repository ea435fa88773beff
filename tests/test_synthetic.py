import numpy as np
import torch

from perseq.data.sequences import leave_one_out
from perseq.data.synthetic import SyntheticConfig, SyntheticGenerator, make_synthetic
from perseq.metrics import metrics_from_ranks, per_user_metrics, target_ranks


def test_generator_is_deterministic_and_well_formed():
    a, _ = make_synthetic(n_users=50, n_items=30, n_clusters=3, seed=4)
    b, _ = make_synthetic(n_users=50, n_items=30, n_clusters=3, seed=4)
    assert np.array_equal(a.items, b.items) and np.array_equal(a.times, b.times)
    assert a.items.min() >= 1 and a.items.max() <= 30
    assert (a.lengths >= 5).all()
    for u in range(a.n_users):  # times increase within each user
        assert (np.diff(a.times[a.offsets[u] : a.offsets[u + 1]]) > 0).all()


def test_next_distribution_is_a_distribution():
    g = SyntheticGenerator(SyntheticConfig(n_users=20, n_items=25, n_clusters=3))
    p = g.next_distribution(np.arange(20), np.arange(20) % 25, np.arange(20) % 2 == 0)
    assert np.allclose(p.sum(1), 1.0) and (p >= 0).all()


def _oracle_ranks(data, gen, positions, exclude_seen):
    users = np.flatnonzero(positions >= 0)
    idx = data.offsets[users] + positions[users]
    prev = data.items[idx - 1].astype(np.int64) - 1
    p = gen.next_distribution(users, prev, gen._short[idx])
    scores = torch.full((len(users), data.n_items + 1), float("-inf"), dtype=torch.float64)
    scores[:, 1:] = torch.from_numpy(p)
    if exclude_seen:
        for r, u in enumerate(users):
            scores[r, data.items[data.offsets[u] : idx[r]]] = float("-inf")
    return target_ranks(scores, torch.from_numpy(data.items[idx].astype(np.int64)))


def test_bayes_ceiling_matches_an_oracle_ranker_empirically():
    """Targets are drawn from p, so ranking by p scores, on average, exactly the computed
    expectation; check within 4 standard errors, with and without exclude_seen."""
    data, gen = make_synthetic(n_users=3000, n_items=200, n_clusters=10, seed=2)
    split = leave_one_out(data)
    for excl in (False, True):
        ranks = _oracle_ranks(data, gen, split.test_pos, excl)
        ceiling = gen.bayes_ceiling(data, split.test_pos, exclude_seen=excl)
        per = per_user_metrics(ranks)
        for k in ("hr@10", "ndcg@10", "hr@50"):
            se = per[k].std().item() / np.sqrt(len(ranks))
            assert abs(per[k].mean().item() - ceiling[k]) < 4 * se, (excl, k, per[k].mean().item(), ceiling[k])
        # and the ceiling leaves room: nothing can rank a sampled target first every time
        assert metrics_from_ranks(ranks)["hr@10"] < 0.95


LONG = dict(n_users=1500, n_items=60, n_clusters=4, favorites=8, personal_items=150, lam_favorite=0.3,
            cooldown=16, mean_len=120, min_len=80, max_len=160, seed=3)


def test_long_history_mode_returns_only_to_due_favourites():
    data, gen = make_synthetic(**{**LONG, "n_users": 200})
    I, f = LONG["n_items"], LONG["favorites"]
    assert data.n_items == I + LONG["personal_items"] and (data.lengths >= 80).all()
    returns = 0
    for u in range(data.n_users):
        seq = data.items[data.offsets[u] : data.offsets[u + 1]].astype(np.int64) - 1
        personal = seq >= I
        assert set(seq[personal].tolist()) <= set(gen.favs[u].tolist())  # only this user's favourites
        for t in np.flatnonzero(personal):
            window = seq[max(0, t - LONG["cooldown"]) : t]
            if len(set(window[window >= I].tolist())) < f:  # something was due: it was not in the window
                assert seq[t] not in window
                returns += 1
    share = returns / data.n_interactions
    assert abs(share - 0.3) < 0.03, share  # lam_favorite of the events (the rare none-due fallback aside)


def test_long_history_ceilings_match_oracle_rankers_and_leave_a_gap():
    """Ranking by the full-information predictive, and by the last-R one, scores on average
    what each ceiling computes (targets are drawn from the full process); knowing only the
    last R events must cost a lot, since the due favourites are exactly the unseen ones."""
    data, gen = make_synthetic(**LONG)
    split = leave_one_out(data)
    users = np.flatnonzero(split.test_pos >= 0)
    idx = data.offsets[users] + split.test_pos[users]
    target = torch.from_numpy(data.items[idx].astype(np.int64))
    ceilings = {}
    for recent in (None, 16):
        p = gen.predictive(data, users, split.test_pos[users], recent)
        assert np.allclose(p.sum(1), 1.0)
        scores = torch.full((len(users), data.n_items + 1), float("-inf"), dtype=torch.float64)
        # equal probabilities (the due favourites) are ties: break them at random, as the
        # ceiling's sorted sum assumes, with noise far below any real difference
        scores[:, 1:] = torch.from_numpy(p + np.random.default_rng(0).random(p.shape) * 1e-12)
        per = per_user_metrics(target_ranks(scores, target))
        ceilings[recent] = c = gen.bayes_ceiling(data, split.test_pos, recent=recent)
        for k in ("hr@10", "ndcg@10"):
            se = per[k].std().item() / np.sqrt(len(users))
            assert abs(per[k].mean().item() - c[k]) < 4 * se, (recent, k, per[k].mean().item(), c[k])
    assert ceilings[None]["ndcg@10"] > ceilings[16]["ndcg@10"] + 0.05, ceilings
