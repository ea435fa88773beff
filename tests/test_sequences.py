import numpy as np
import polars as pl
import pytest

from perseq.data.batching import TrainWindows, eval_batches
from perseq.data.raw import RawInteractions
from perseq.data.sequences import SequenceData, kcore, leave_one_out, make_split, prepare, temporal_split


def _raw(rows, with_time=True):
    users, items, times = zip(*rows)
    return RawInteractions(pl.DataFrame({"user": users, "item": items, "time": times if with_time else [None] * len(rows)},
                                        schema={"user": pl.Utf8, "item": pl.Utf8, "time": pl.Int64}), "test")


def _seq(data, u):
    return [data.item_ids[i] for i in data.seq(u)]


def test_prepare_sorts_by_time_stably_and_keeps_raw_ids():
    raw = _raw([("b", "x", 5), ("a", "y", 3), ("b", "z", 1), ("a", "x", 3), ("b", "w", 5)])
    d = prepare(raw)
    assert list(d.user_ids) == ["b", "a"]
    assert _seq(d, 0) == ["z", "x", "w"]  # time 1, then the two time-5 events in file order
    assert _seq(d, 1) == ["y", "x"]  # tie at time 3 keeps file order
    assert d.offsets.tolist() == [0, 3, 5] and d.items.dtype == np.int32 and d.item_ids[0] == "[PAD]"
    assert d.times.tolist() == [1, 5, 5, 3, 3]


def test_prepare_without_time_keeps_file_order():
    d = prepare(_raw([("a", "3", None), ("a", "1", None), ("a", "2", None)], with_time=False))
    assert _seq(d, 0) == ["3", "1", "2"] and d.times is None


def test_kcore_is_iterated_to_a_fixed_point():
    # item q has 2 users; dropping user c (1 event after its item r is dropped) ...
    rows = [("a", "p", 1), ("a", "q", 2), ("b", "p", 1), ("b", "q", 2), ("c", "r", 1), ("c", "p", 2)]
    f = _raw(rows).frame
    out = kcore(f, min_user=2, min_item=2)
    assert sorted(out["user"].unique().to_list()) == ["a", "b"]
    # r has one event -> dropped -> c has one event -> dropped -> p then has 2: stable
    assert out.height == 4


def _toy() -> SequenceData:
    rows = []
    for u, n in enumerate([6, 3, 2, 9]):
        rows += [(f"u{u}", f"i{(u * 7 + t) % 11}", 10 * t + u) for t in range(n)]
    return prepare(_raw(rows))


def test_leave_one_out_positions_and_no_leakage():
    d = _toy()
    s = leave_one_out(d)
    assert s.train_len.tolist() == [4, 1, 2, 7]
    assert s.valid_pos.tolist() == [4, 1, -1, 7] and s.test_pos.tolist() == [5, 2, -1, 8]
    w = TrainWindows(s, max_len=3, windows="all")
    # every training target lies strictly inside the training prefix
    for idx in range(len(w)):
        u, st, ln = w.user[idx], w.start[idx], w.length[idx]
        assert st + ln + 1 <= s.train_len[u]
    # all training pairs are covered exactly once
    assert w.n_targets == sum(max(int(n) - 1, 0) for n in s.train_len)
    b = w.make_batch(np.arange(len(w)))
    # no valid/test target is ever a training target or input at its user's own position
    for row in range(len(w)):
        u = w.user[row]
        seq = d.seq(u)
        ln = int(b.lengths[row])
        assert b.inputs[row, :ln].tolist() == seq[w.start[row] : w.start[row] + ln].tolist()
        assert b.targets[row, :ln].tolist() == seq[w.start[row] + 1 : w.start[row] + ln + 1].tolist()
        assert (b.targets[row, ln:] == 0).all() and (b.inputs[row, ln:] == 0).all()


def test_windows_cover_long_prefix_aligned_to_its_end():
    d = _toy()
    s = leave_one_out(d)
    w = TrainWindows(s, max_len=3, windows="all")
    u3 = np.flatnonzero(w.user == 3)  # 7 train events -> 6 pairs -> windows [3,6) and [0,3)
    assert sorted(zip(w.start[u3].tolist(), w.length[u3].tolist())) == [(0, 3), (3, 3)]
    last = TrainWindows(s, max_len=3, windows="last")
    assert last.n_targets == sum(min(max(int(n) - 1, 0), 3) for n in s.train_len)


def test_eval_batch_inputs_exclude_the_target_and_test_includes_valid():
    d = _toy()
    s = leave_one_out(d)
    (vb,) = list(eval_batches(s, "valid", max_len=3, batch_size=10))
    (tb,) = list(eval_batches(s, "test", max_len=3, batch_size=10))
    for b, pos in ((vb, s.valid_pos), (tb, s.test_pos)):
        for row, u in enumerate(b.users):
            seq = d.seq(u)
            p = pos[u]
            ln = int(b.lengths[row])
            assert b.inputs[row, :ln].tolist() == seq[max(0, p - 3) : p].tolist()
            assert b.target[row].item() == seq[p]
            seen = b.seen_items[b.seen_rows == row].tolist()
            assert seen == seq[:p].tolist()
    # the test input ends with the validation item
    for row, u in enumerate(tb.users):
        assert tb.inputs[row, int(tb.lengths[row]) - 1].item() == d.seq(u)[s.valid_pos[u]]


def test_temporal_split_never_trains_on_events_after_the_cutoff():
    d = _toy()
    s = temporal_split(d, valid_frac=0.2, test_frac=0.2)
    t_valid = np.quantile(d.times, 0.6)
    for u in range(d.n_users):
        times = d.times[d.offsets[u] : d.offsets[u + 1]]
        assert (times[: s.train_len[u]] < t_valid).all()
        for p in (s.valid_pos[u], s.test_pos[u]):
            if p >= 0:
                assert p >= s.train_len[u]
    assert (s.test_pos >= 0).any()


def test_temporal_split_needs_timestamps():
    d = prepare(_raw([("a", "1", None), ("a", "2", None)], with_time=False))
    with pytest.raises(ValueError, match="timestamps"):
        make_split(d, "temporal")
    with pytest.raises(ValueError, match="valid"):
        make_split(d, "random")


def test_batch_order_is_deterministic_and_complete():
    s = leave_one_out(_toy())
    w = TrainWindows(s, max_len=2)
    a, b = w.batch_order(2, seed=5), w.batch_order(2, seed=5)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    assert sorted(np.concatenate(a).tolist()) == list(range(len(w)))


def test_save_load_roundtrip(tmp_path):
    d = _toy()
    d.save(tmp_path / "p")
    e = SequenceData.load(tmp_path / "p")
    assert (e.items == d.items).all() and (e.offsets == d.offsets).all() and (e.times == d.times).all()
    assert list(e.item_ids) == list(d.item_ids) and list(e.user_ids) == list(d.user_ids)
