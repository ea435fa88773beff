"""PerSRec (models/persrec.py): the one-pass layout, compress-then-recommend, folding and
the cache, checked in numbers on every attention backbone."""
import json

import numpy as np
import pytest
import torch

from perseq.models import build_model
from perseq.models.persrec import cache_bytes, load_cache, save_cache

FORMS = ["sasrec+persrec", "hstu+persrec", "llama+persrec"]
N_ITEMS = 60


def _model(name, max_len=40, recent=6, segments=3, tokens=3, **kw):
    torch.manual_seed(0)
    m = build_model(name, n_items=N_ITEMS, max_len=max_len, d=16, dropout=0.0, recent=recent,
                    segments=segments, tokens=tokens, **kw).eval()
    # livelier weights than the small init, so that attention (and thus the history, through
    # the tokens) moves the outputs well above float rounding
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() >= 2 and "item_emb" not in n or n.endswith("pos_w") or n == "tokens":
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return m


def _seqs(lengths, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, N_ITEMS + 1, (len(lengths), L), generator=g)
    for b, n in enumerate(lengths):
        x[b, n:] = 0
    return x


def _close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol


# lengths: full window, multi-segment, exactly R, shorter than R, one event, history in
# segment 0 only (P = (40 - 6) / 3 = 11)
LENGTHS = [40, 29, 6, 3, 1, 13]


@pytest.mark.parametrize("name", FORMS)
def test_one_pass_equals_compress_then_recommend(name):
    m = _model(name)
    assert (m.P, m.K, m.R) == (11, 3, 6)
    x = _seqs(LENGTHS, 40)
    lengths = torch.tensor(LENGTHS)
    with torch.no_grad():
        h = m.encode(x)  # training's one pass over [S0 | T | S1 | T | S2 | T | recent]
        one_pass = h[torch.arange(len(x)), lengths - 1]
        served = m.predict_hidden(x, lengths)  # compress(history) then recommend(cache, recent)
    assert torch.isfinite(h).all()
    assert _close(one_pass, served)
    # user isolation: each user alone gives the same hidden state as inside the batch
    for b, n in enumerate(LENGTHS):
        with torch.no_grad():
            alone = m.predict_hidden(x[b : b + 1, :n], lengths[b : b + 1])
        assert _close(alone[0], served[b]), (name, b)


@pytest.mark.parametrize("name", FORMS)
def test_history_reaches_recent_items_only_through_the_tokens(name):
    m = _model(name, segments=1, max_len=20, recent=6)  # P = 14
    g = torch.Generator().manual_seed(3)
    hist_a = torch.randint(1, N_ITEMS + 1, (2, 14), generator=g)
    hist_b = hist_a.clone()
    hist_b[:, 2] = hist_a[:, 2] % N_ITEMS + 1  # one raw history item edited
    hist_b[:, 9] = hist_a[:, 9] % N_ITEMS + 1
    recent = torch.randint(1, N_ITEMS + 1, (2, 6), generator=g)
    with torch.no_grad():
        h_a, *_ = m.forward_layout([hist_a], recent)
        h_b, *_ = m.forward_layout([hist_b], recent)
        cache_a = m.compress(hist_a)
        h_b_fixed, *_ = m.forward_layout([hist_b], recent, token_kv=cache_a)
    rec = slice(-6, None)
    assert not _close(h_a[:, rec], h_b[:, rec], 1e-3)  # the edit matters, through the tokens
    assert _close(h_a[:, rec], h_b_fixed[:, rec])  # with the tokens' K/V fixed it cannot


@pytest.mark.parametrize("name", FORMS)
def test_folding_equals_the_one_pass_over_the_chained_layout(name):
    m = _model(name, segments=1, max_len=20, recent=6, fold=4)  # P = 14, R = 6
    g = torch.Generator().manual_seed(5)
    hist = torch.randint(1, N_ITEMS + 1, (2, 14), generator=g)
    recent = torch.randint(1, N_ITEMS + 1, (2, 5), generator=g)
    new = torch.randint(1, N_ITEMS + 1, (2, 3), generator=g)  # 8 recent > R: fold max(2, 4) = 4
    with torch.no_grad():
        cache, rec = m.append(m.compress(hist), recent, new)
        served = m.recommend_hidden(cache, rec)
        seq = torch.cat([recent, new], 1)
        h, *_ = m.forward_layout([hist, seq[:, :4]], seq[:, 4:])
    assert torch.equal(rec, seq[:, 4:])
    assert cache["k"].shape[3] == m.K  # still K tokens per layer
    assert _close(served, h[:, -1])


@pytest.mark.parametrize("name", FORMS)
def test_the_cache_stays_bounded_however_long_the_history(name):
    m = _model(name, segments=1, max_len=20, recent=6, fold=3)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        cache = m.compress(torch.randint(1, N_ITEMS + 1, (1, 300), generator=g))  # 22 segments of 14
        rec = torch.randint(1, N_ITEMS + 1, (1, 2), generator=g)
        for _ in range(40):  # one event at a time: a fold of 3 whenever R = 6 is exceeded
            cache, rec = m.append(cache, rec, torch.randint(1, N_ITEMS + 1, (1, 1), generator=g))
            assert cache["k"].shape[3] == m.K and 1 <= rec.shape[1] <= m.R
        s = m.recommend(cache, rec)
    assert torch.isfinite(s[:, 1:]).all() and torch.isinf(s[:, 0]).all()
    assert cache_bytes(cache) == cache["k"].numel() * 4 + cache["v"].numel() * 4 + 8  # + the folded count
    # 340 events take exactly the room of one segment's 14: K tokens per block, whatever came before
    with torch.no_grad():
        one = m.compress(torch.randint(1, N_ITEMS + 1, (1, 14), generator=g))
    assert cache["k"].shape == one["k"].shape and cache["v"].shape == one["v"].shape
    assert cache["k"].shape[:2] == (len(m.backbone.blocks), 1) and cache_bytes(cache) == cache_bytes(one)


def test_the_cache_round_trips_through_safetensors_bit_exactly(tmp_path):
    m = _model("hstu+persrec")
    with torch.no_grad():
        cache = m.compress(_seqs([30, 12, 0], 30))
    save_cache(cache, tmp_path / "c.safetensors")
    back = load_cache(tmp_path / "c.safetensors")
    assert set(back) == {"k", "v", "folded"} and back["folded"].tolist() == [30, 12, 0]
    assert all(torch.equal(back[k], cache[k]) and back[k].dtype == cache[k].dtype for k in cache)


def test_users_with_no_history_share_the_empty_cache():
    m = _model("sasrec+persrec")
    with torch.no_grad():
        c = m.compress(_seqs([0, 0], 5))
    assert torch.equal(c["k"][:, 0], c["k"][:, 1]) and torch.equal(c["v"][:, 0], c["v"][:, 1])


def test_bad_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="recent"):
        build_model("sasrec+persrec", n_items=5, max_len=8, recent=8)
    with pytest.raises(ValueError, match="segment"):
        build_model("sasrec+persrec", n_items=5, max_len=8, recent=4, segments=5)
    with pytest.raises(ValueError, match="time bias"):
        build_model("hstu+persrec", n_items=5, max_len=8, time_bias=True)
    m = _model("sasrec+persrec")
    with pytest.raises(ValueError, match="max_len"):
        m.encode(torch.ones(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="recent event"):
        m.recommend(m.compress(torch.ones(1, 3, dtype=torch.long)), torch.zeros(1, 2, dtype=torch.long))


@pytest.mark.parametrize("name", FORMS)
def test_streaming_one_event_at_a_time_equals_append_then_recommend(name):
    """stream_step caches the recent part's keys/values too; each event's hidden state
    equals re-encoding the recent part after append (folds included)."""
    m = _model(name, segments=1, max_len=20, recent=6, fold=4)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        cache = m.compress(torch.randint(1, N_ITEMS + 1, (2, 30), generator=g))
        recent = torch.randint(1, N_ITEMS + 1, (2, 3), generator=g)
        state = m.stream_state(cache, recent)
        for _ in range(15):  # passes R twice: two folds of 4
            ev = torch.randint(1, N_ITEMS + 1, (2,), generator=g)
            state, h = m.stream_step(state, ev)
            cache, recent = m.append(cache, recent, ev[:, None])
            assert torch.equal(state["recent"], recent)
            assert _close(h, m.recommend_hidden(cache, recent))
        assert _close(state["k"], cache["k"]) and _close(state["v"], cache["v"])


def test_long_history_comparison_of_trained_runs(tmp_path, monkeypatch):
    """perseq trains the PerSRec form from a config, and bench long scores it against a
    recent-only run: all users and the long subset, exclude_seen on and off, and PerSRec's
    sizes in its result file's protocol."""
    import json

    from perseq.bench.long import compare
    from perseq.cli import main

    monkeypatch.chdir(tmp_path)
    small = ["--set", "data.synthetic={n_users: 60, n_items: 40, n_clusters: 4, mean_len: 40, min_len: 20, max_len: 60}",
             "--set", "model.d=16", "--set", "train.epochs=1", "--set", "eval.exclude_seen=false",
             "--out", str(tmp_path), "--no-progress"]
    assert main(["train", *small, "--set", "data.max_len=30", "--set", "model.name=sasrec+persrec",
                 "--set", "model.recent=10", "--name", "p", "--bench-name", "t_persrec"]) == 0
    assert main(["train", *small, "--set", "data.max_len=10", "--name", "r"]) == 0
    res = compare({"persrec": [str(tmp_path / "p-s0")], "recent": [str(tmp_path / "r-s0")]}, min_history=30)
    from perseq.checkpoint import load_model
    from perseq.cli import _rebuild_split

    # the long subset: users whose known history at the test event (all but that event) is over 30
    n_long = int(((_rebuild_split(load_model(str(tmp_path / "p-s0"))[1])[1].data.lengths - 1) > 30).sum())
    for v, run in (("persrec", "p-s0"), ("recent", "r-s0")):
        own = json.loads((tmp_path / run / "results.json").read_text())["test"]
        # both runs trained with exclude_seen off: that row is each run's own test evaluation
        assert res[v]["seen_kept"]["ndcg@10"]["mean"] == pytest.approx(own["ndcg@10"], abs=1e-6)
        assert res[v]["seen_kept"]["hr@10"]["mean"] == pytest.approx(own["hr@10"], abs=1e-6)
        for setting in ("exclude_seen", "seen_kept"):
            row = res[v][setting]
            assert row["n_users"] == 60 and row["n_long"] == n_long and 0 < n_long < 60
            lo, hi = row["long_ndcg@10"]["ci95"]
            assert lo <= row["long_ndcg@10"]["mean"] <= hi
    bench = json.loads((tmp_path / "benchmarks" / "results" / "t_persrec.json").read_text())
    assert bench["model"] == "sasrec+persrec" and bench["protocol"]["persrec"] == {"P": 20, "K": 4, "R": 10, "segments": 1}
    # the synthetic data's Bayes ceiling rides along, from train and from collect alike
    assert main(["bench", "collect", "--name", "t_collected", str(tmp_path / "p-s0")]) == 0
    again = json.loads((tmp_path / "benchmarks" / "results" / "t_collected.json").read_text())
    assert again["bayes_ceiling"] == bench["bayes_ceiling"] and 0 < bench["bayes_ceiling"]["full information"]["ndcg@10"] < 1
    # per-user files: exported right after training, they stand in for run folders that are gone
    pu = tmp_path / "per_user"
    assert main(["bench", "long", "--export", str(tmp_path / "p-s0"), str(tmp_path / "r-s0"), "--per-user-dir", str(pu)]) == 0
    assert sorted(f.name for f in pu.iterdir()) == ["p-s0.npz", "r-s0.npz"]
    for run in ("p-s0", "r-s0"):
        (tmp_path / run).rename(tmp_path / f"{run}.gone")
    assert compare({"persrec": [str(tmp_path / "p-s0")], "recent": [str(tmp_path / "r-s0")]}, min_history=30,
                   per_user_dir=str(pu)) == res
    with pytest.raises(SystemExit, match="no per-user file"):
        compare({"persrec": [str(tmp_path / "p-s0")]}, min_history=30, per_user_dir=str(tmp_path / "empty"))


def test_drift_scores_a_trained_run_three_ways(tmp_path, monkeypatch):
    """bench drift: the window row is the run's own evaluation; chained and folds score
    every user from the whole history."""
    from perseq.bench.long import drift
    from perseq.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--set", "data.synthetic={n_users: 40, n_items: 40, n_clusters: 4, mean_len: 40, min_len: 20, max_len: 60}",
                 "--set", "model.d=16", "--set", "train.epochs=1", "--set", "eval.exclude_seen=false", "--set", "data.max_len=30",
                 "--set", "model.name=sasrec+persrec", "--set", "model.recent=10", "--name", "p", "--no-progress"]) == 0
    r = drift(str(tmp_path / "runs" / "p-s0"), max_history=200)
    res = json.loads((tmp_path / "runs" / "p-s0" / "results.json").read_text())
    assert r["window"]["ndcg@10"] == pytest.approx(res["test"]["ndcg@10"], abs=1e-9)
    assert r["window"]["n_users"] == r["folds"]["n_users"] == 40 and r["window"]["n_long"] > 0
    # by hand, user by user: the whole known history (all but the test event) as one chain of
    # segments plus the last R events, or folded in from an empty cache `fold` events at a time
    from perseq.checkpoint import load_model
    from perseq.cli import _rebuild_split

    m, meta, _ = load_model(str(tmp_path / "runs" / "p-s0"))
    data = _rebuild_split(meta)[1].data
    m.eval()
    got = {"chained": [], "folds": []}
    with torch.no_grad():
        for u in range(data.n_users):
            seq = torch.as_tensor(data.seq(u), dtype=torch.long)
            known, target = seq[:-1][None], int(seq[-1])
            n_rec = min(m.R, known.shape[1])
            chained = m.recommend(m.compress(known[:, : known.shape[1] - n_rec]), known[:, known.shape[1] - n_rec:])
            cache, recent = m.compress(known[:, :0]), known[:, :0]
            for s in range(0, known.shape[1], m.fold):
                cache, recent = m.append(cache, recent, known[:, s : s + m.fold])
            for mode, scores in (("chained", chained[0]), ("folds", m.recommend(cache, recent)[0])):
                rank = int((scores[1:] >= scores[target]).sum()) - 1  # pessimistic ties, nothing excluded
                got[mode].append(1 / np.log2(rank + 2) if rank < 10 else 0.0)
    for mode in ("chained", "folds"):
        assert r[mode]["ndcg@10"] == pytest.approx(float(np.mean(got[mode])), abs=1e-6), mode


@pytest.mark.parametrize("name", ["sasrec+persrec", "hstu+persrec"])
def test_compressing_in_fold_sized_segments_equals_streaming(name):
    """What a server rebuilds from a user's stored events (compress the first folded(n) in
    segments of `fold`, then the rest as the recent part) equals streaming them one by one."""
    m = _model(name, segments=1, max_len=20, recent=6, fold=4)
    g = torch.Generator().manual_seed(11)
    events = torch.randint(1, N_ITEMS + 1, (1, 23), generator=g)
    with torch.no_grad():
        state = m.stream_state(m.compress(events[:, :0]), events[:, :0])
        for t in range(23):
            state, h = m.stream_step(state, events[:, t])
        f = m.folded(23)
        assert f == 20 and state["recent"].shape[1] == 23 - f  # 23 - 6 = 17 over R: five folds of 4
        rebuilt = m.recommend_hidden(m.compress(events[:, :f], segment=m.fold), events[:, f:])
        # a user's first fold reads no block before it (as segment 0 in training), the later
        # ones read the previous block, and that matters
        first = m._compress_window(None, events[:, :4])
        assert torch.equal(m._compress_window(m.compress(events[:, :0]), events[:, :4])["k"], first["k"])
        alone = m._compress_window(None, events[:, 4:8])
        chained = m._compress_window(first, events[:, 4:8])
        assert not _close(alone["k"], chained["k"], 1e-3)
    assert _close(h, rebuilt)
