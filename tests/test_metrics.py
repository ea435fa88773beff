import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perseq.metrics import metrics_from_ranks, ndcg_single, target_ranks


def test_ranks_hand_computed_with_pessimistic_ties():
    scores = torch.tensor([
        [0.0, 0.9, 0.5, 0.1, 0.7],  # target 2 (0.5): beaten by 0.9, 0.7 -> rank 2
        [0.0, 0.3, 0.3, 0.3, 0.3],  # all tied: pessimistic -> rank 3 (behind the 3 others)
        [0.0, 0.1, 0.2, 0.3, 0.9],  # target 4 is the best -> rank 0
    ])
    scores[:, 0] = float("-inf")
    r = target_ranks(scores, torch.tensor([2, 1, 4]))
    assert r.tolist() == [2, 3, 0]


def test_excluded_target_ranks_last():
    s = torch.tensor([[float("-inf"), float("-inf"), 0.2, 0.1]])
    assert target_ranks(s, torch.tensor([1])).item() == 3


def test_metrics_hand_computed():
    m = metrics_from_ranks(torch.tensor([0, 2, 12, 60]), ks=(10, 50))
    assert m["hr@10"] == 0.5
    assert m["hr@50"] == 0.75
    assert math.isclose(m["ndcg@10"], (1.0 + 1 / math.log2(4)) / 4)
    assert math.isclose(m["ndcg@50"], (1.0 + 0.5 + 1 / math.log2(14)) / 4)
    assert math.isclose(m["mrr"], (1 + 1 / 3 + 1 / 13 + 1 / 61) / 4)


ranks_st = st.lists(st.integers(0, 5000), min_size=1, max_size=200)


@given(ranks_st)
def test_bounds_and_monotone_in_k(ranks):
    r = torch.tensor(ranks)
    ks = (1, 5, 10, 50, 100)
    m = metrics_from_ranks(r, ks)
    for a, b in zip(ks, ks[1:]):
        assert m[f"hr@{a}"] <= m[f"hr@{b}"]
        assert m[f"ndcg@{a}"] <= m[f"ndcg@{b}"] + 1e-12
    for k in ks:
        assert 0.0 <= m[f"ndcg@{k}"] <= m[f"hr@{k}"] <= 1.0
    assert 0.0 < m["mrr"] <= 1.0


@given(ranks_st, st.integers(1, 7))
@settings(max_examples=50)
def test_batch_size_invariant(ranks, chunk):
    """Averaging per-chunk sums equals the whole: evaluation batch size cannot change results."""
    r = torch.tensor(ranks)
    whole = metrics_from_ranks(r)
    sums = {k: 0.0 for k in whole}
    for s in range(0, len(r), chunk):
        part = metrics_from_ranks(r[s : s + chunk])
        n = len(r[s : s + chunk])
        for k in sums:
            sums[k] += part[k] * n
    for k in whole:
        assert math.isclose(whole[k], sums[k] / len(r), rel_tol=1e-9, abs_tol=1e-12)


@given(st.integers(0, 100), st.integers(1, 100))
def test_ndcg_single_matches_batch(rank, k):
    assert math.isclose(metrics_from_ranks(torch.tensor([rank]), ks=(k,))[f"ndcg@{k}"], ndcg_single(rank, k))


@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=30), st.data())
def test_rank_is_count_of_strictly_better_or_tied_others(vals, data):
    s = torch.tensor([vals], dtype=torch.float64)
    t = data.draw(st.integers(0, len(vals) - 1))
    expected = sum(1 for j, v in enumerate(vals) if j != t and v >= vals[t])
    assert target_ranks(s, torch.tensor([t])).item() == expected
