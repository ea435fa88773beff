"""Data a new user can trust (issue 23): what data.dataset may name, fingerprints of the data
a run read, degenerate splits refused, duplicates counted, and the `perseq data` flags."""
import dataclasses
import hashlib
import json

import numpy as np
import polars as pl
import pytest
import torch

from perseq.cli import main
from perseq.config import DataConfig
from perseq.data import readers as R
from perseq.data.errors import DatasetNotFoundError, DataFormatError
from perseq.data.loading import check_fingerprint, data_fingerprint, load_data, resolve_data_config
from perseq.data.raw import RawInteractions
from perseq.data.sequences import SequenceData, check_split, leave_one_out, make_split, prepare, temporal_split
from perseq.evaluate import EvalConfig, evaluate
from perseq.models.registry import build_model

# MovieLens ratings.csv layout, as in the README's `perseq data prepare` example
RATINGS = ("userId,movieId,rating,timestamp\n"
           "1,10,4.0,100\n1,11,5.0,101\n1,12,2.0,103\n1,13,3.0,102\n"
           "2,10,3.5,200\n2,11,5.0,201\n2,12,5.0,202\n"
           "3,11,1.0,300\n3,13,4.5,301\n")


def _raw(rows, with_time=True):
    users, items, times = zip(*rows)
    return RawInteractions(pl.DataFrame({"user": users, "item": items, "time": times if with_time else [None] * len(rows)},
                                        schema={"user": pl.Utf8, "item": pl.Utf8, "time": pl.Int64}), "test.txt")


def _seq(data, u):
    return [data.item_ids[i] for i in data.seq(u)]


def _cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _stats(out: str) -> dict:
    return json.loads(out[out.index("{"):])


@pytest.fixture
def ratings(tmp_path):
    p = tmp_path / "ratings.csv"
    p.write_text(RATINGS)
    return p


# ------------------------------------------------------------------ data.dataset resolution


def test_resolve_file_relative_path_made_absolute_format_and_columns_guessed(tmp_path, monkeypatch):
    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp\na,x,1\na,y,2\n")
    monkeypatch.chdir(tmp_path)
    dc = resolve_data_config(DataConfig(dataset="log.csv"))
    assert (dc.dataset, dc.path, dc.format) == ("file", str(tmp_path / "log.csv"), "table")
    assert dc.columns == {"user": "user_id", "item": "item_id", "time": "timestamp"}
    assert resolve_data_config(dc) == dc  # idempotent
    # the older spelling resolves to the same canonical config
    assert resolve_data_config(DataConfig(dataset="file", path="log.csv")) == dc
    # a given format is kept, not re-guessed
    assert resolve_data_config(DataConfig(dataset="log.csv", format="movielens")).format == "movielens"


def test_resolve_precedence_registry_then_folder_then_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = prepare(_raw([("a", "x", 1), ("a", "y", 2), ("b", "x", 3)]))
    data.save(tmp_path / "ml-1m")  # a prepared folder that shadows a registry name
    data.save(tmp_path / "prep")
    (tmp_path / "seq.txt").write_text("1 10 11 12\n")
    # the registry name wins over a folder of the same name; ./ml-1m reaches the folder
    assert resolve_data_config(DataConfig(dataset="ml-1m")) == DataConfig(dataset="ml-1m")
    assert resolve_data_config(DataConfig(dataset="./ml-1m")).dataset == str(tmp_path / "ml-1m")
    assert resolve_data_config(DataConfig(dataset="prep")).dataset == str(tmp_path / "prep")
    f = resolve_data_config(DataConfig(dataset="seq.txt"))
    assert (f.dataset, f.path, f.format) == ("file", str(tmp_path / "seq.txt"), "user-per-line")
    assert resolve_data_config(DataConfig()) == DataConfig()  # synthetic untouched
    # load_data resolves too: Python users get the same behaviour as the CLI
    loaded, gen = load_data(DataConfig(dataset="prep"), log=lambda s: None)
    assert gen is None and loaded.n_interactions == 3 and list(loaded.user_ids) == ["a", "b"]


def test_resolve_errors_say_what_was_tried_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as e:
        resolve_data_config(DataConfig(dataset="nope.txt"))
    msg = str(e.value)
    assert "'nope.txt'" in msg and str(tmp_path / "nope.txt") in msg and "\n" not in msg
    for hint in ("ml-1m", "amazon-beauty", "synthetic", "perseq data prepare", "--set data.dataset=/path/to/file"):
        assert hint in msg
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="holds no sequences.npz"):
        resolve_data_config(DataConfig(dataset="empty_dir"))
    with pytest.raises(ValueError, match="data.dataset='ml-1m' is a registry name"):
        resolve_data_config(DataConfig(dataset="ml-1m", path="x.csv"))
    with pytest.raises(ValueError, match="data file not found: " + str(tmp_path / "gone.csv")):
        resolve_data_config(DataConfig(dataset="file", path="gone.csv"))
    with pytest.raises(ValueError, match="unknown data format 'csv'"):
        (tmp_path / "a.txt").write_text("1 2\n")
        resolve_data_config(DataConfig(dataset="a.txt", format="csv"))


def test_train_cli_with_a_file_as_dataset_reports_unknown_cleanly(tmp_path, capsys):
    rc, _, err = _cli(capsys, "train", "--set", f"data.dataset={tmp_path / 'missing.txt'}", "--out", str(tmp_path))
    assert rc == 2 and "is not a registry name" in err and "Traceback" not in err


# ------------------------------------------------------------------------- fingerprints


def test_fingerprint_of_a_file_and_its_checks(tmp_path, monkeypatch, ratings):
    monkeypatch.chdir(tmp_path)
    dc = DataConfig(dataset="ratings.csv")
    fp = data_fingerprint(dc)
    assert fp == {"kind": "file", "files": [{"path": str(ratings), "size": len(RATINGS),
                                             "sha256": hashlib.sha256(RATINGS.encode()).hexdigest()}]}
    check_fingerprint(dc, fp)  # unchanged: no error
    check_fingerprint(dc, None)  # run folders older than fingerprints: nothing to check
    # same size, different bytes: only the sha256 can tell
    ratings.write_text(RATINGS.replace("4.0,100", "4.0,109"))
    with pytest.raises(ValueError) as e:
        check_fingerprint(dc, fp)
    msg = str(e.value)
    assert "has changed" in msg and str(ratings) in msg and fp["files"][0]["sha256"][:16] in msg
    assert hashlib.sha256(ratings.read_bytes()).hexdigest()[:16] in msg
    ratings.write_text(RATINGS + "3,14,5,302\n")
    with pytest.raises(ValueError, match=f"is now {len(RATINGS) + 11:,} bytes, the run read {len(RATINGS)} bytes"):
        check_fingerprint(dc, fp)
    ratings.rename(tmp_path / "elsewhere.csv")
    with pytest.raises(ValueError) as e:
        check_fingerprint(dc, fp)
    assert f"gone from {ratings} (moved or deleted): put the file back there ({len(RATINGS)} bytes" in str(e.value)


def test_fingerprint_of_prepared_folder_times_file_and_synthetic(tmp_path):
    prepare(_raw([("a", "x", 1), ("a", "y", 2)])).save(tmp_path / "prep")
    fp = data_fingerprint(DataConfig(dataset=str(tmp_path / "prep")))
    assert fp["kind"] == "prepared"
    assert [f["path"] for f in fp["files"]] == [str(tmp_path / "prep" / n) for n in
                                                ("sequences.npz", "users.parquet", "items.parquet", "meta.json")]
    for f in fp["files"]:
        assert f["sha256"] == hashlib.sha256((tmp_path / "prep" / f["path"]).read_bytes()).hexdigest()
    (tmp_path / "seq.txt").write_text("1 10 11\n")
    (tmp_path / "t.txt").write_text("1 5 6\n")
    fp = data_fingerprint(DataConfig(dataset="file", path=str(tmp_path / "seq.txt"), times_path=str(tmp_path / "t.txt")))
    assert [(f["path"], f["size"]) for f in fp["files"]] == [(str(tmp_path / "seq.txt"), 8), (str(tmp_path / "t.txt"), 6)]
    assert data_fingerprint(DataConfig()) is None


def test_fingerprint_of_a_registry_dataset_is_the_file_read(shared_datasets):
    fp = data_fingerprint(DataConfig(dataset="amazon-beauty"))
    # the checksum ../shared/datasets/SHA256SUMS lists for this copy
    assert fp == {"kind": "registry", "name": "amazon-beauty", "files": [
        {"path": str(shared_datasets / "amazon-beauty" / "Beauty.txt"), "size": 1_090_094,
         "sha256": "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8"}]}
    check_fingerprint(DataConfig(dataset="amazon-beauty"), fp)
    changed = {**fp, "files": [{**fp["files"][0], "sha256": "0" * 64}]}
    with pytest.raises(ValueError, match="dataset 'amazon-beauty' has changed since this run was trained"):
        check_fingerprint(DataConfig(dataset="amazon-beauty"), changed)


def test_offline_message_names_the_cli_settings(tmp_path, monkeypatch, capsys):
    from perseq.data.registry import read_dataset

    monkeypatch.setenv("PERSEQ_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PERSEQ_SHARED_DIR", str(tmp_path / "no-shared"))
    with pytest.raises(DatasetNotFoundError) as e:
        read_dataset("yelp")
    msg = str(e.value)
    assert "--set data.download=true" in msg and "--download (perseq data)" in msg
    assert "pass download=True" not in msg and "downloading is off" in msg
    rc, _, err = _cli(capsys, "data", "stats", "yelp")
    assert rc == 2 and "--set data.download=true" in err


# -------------------------------------------------------------------- degenerate splits


def test_one_event_per_user_is_refused_with_counts():
    data = prepare(_raw([(f"u{i}", f"i{i}", i) for i in range(5)]))
    with pytest.raises(ValueError) as e:
        check_split(leave_one_out(data))
    msg = str(e.value)
    assert msg.startswith("no training targets")
    assert "(5 users have 1 event, 0 have 3)" in msg
    assert "5 users, 5 events, 5 items; events per user min 1, median 1, max 1" in msg


def test_no_training_targets_with_a_tiny_catalogue_would_report_a_perfect_test():
    # every user has 3 distinct events of a 3-item catalogue: leave-one-out leaves each one
    # training event (no target), and with exclude_seen the test item is the only candidate
    rows = [(f"u{u}", it, t) for u in range(4) for t, it in enumerate(np.roll(["a", "b", "c"], u))]
    split = leave_one_out(prepare(_raw(rows)))
    torch.manual_seed(0)
    model = build_model("sasrec", split.data.n_items, max_len=8, d=8, n_blocks=1)
    untrained = evaluate(model, split, "test", EvalConfig(exclude_seen=True), progress=False)
    assert untrained["hr@10"] == 1.0 and untrained["ndcg@10"] == 1.0  # the "1.0000" of issue 23
    with pytest.raises(ValueError, match=r"no training targets.*\(0 users have 1 event, 4 have 3\)"):
        check_split(split)


def test_one_item_catalogue_is_refused():
    data = prepare(_raw([(u, "x", t) for u in ("a", "b") for t in range(5)]))
    with pytest.raises(ValueError, match=r"the catalogue has 1 item\(s\): ranking one item is trivially perfect"):
        check_split(leave_one_out(data))


def test_empty_validation_and_empty_test_are_refused():
    two_each = prepare(_raw([(u, it, t) for u in ("a", "b", "c") for t, it in enumerate(["x", "y"])]))
    with pytest.raises(ValueError) as e:
        check_split(leave_one_out(two_each))
    assert str(e.value).startswith("no users to evaluate at the validation stage of the leave_one_out split: "
                                   "leave-one-out validates users with at least 3 events, and 0 of 3 users have that many")
    # temporal: cut-offs 9.8 and 91; only user b has events after 91, and none before it
    rows = [("a", f"i{t % 4}", t) for t in range(1, 11)] + [("b", "i0", 100), ("b", "i1", 101)]
    split = temporal_split(prepare(_raw(rows)))
    assert split.valid_pos.tolist() == [9, -1] and split.test_pos.tolist() == [-1, -1]
    with pytest.raises(ValueError, match="no users to evaluate at the test stage of the temporal split"):
        check_split(split)
    check_split(leave_one_out(prepare(_raw(rows))))  # the same data split leave-one-out is fine


def test_evaluate_refuses_an_empty_stage_and_nan_scores():
    split = make_split(prepare(_raw([(u, it, t) for u in ("a", "b") for t, it in enumerate(["x", "y"])])))
    model = build_model("sasrec", split.data.n_items, max_len=8, d=8, n_blocks=1)
    with pytest.raises(ValueError, match="no users to evaluate at the test stage"):
        evaluate(model, split, "test", progress=False)
    rows = [(u, it, t) for u in ("a", "b") for t, it in enumerate(["x", "y", "z", "w"])]
    split = make_split(prepare(_raw(rows)))
    model = build_model("sasrec", split.data.n_items, max_len=8, d=8, n_blocks=1)
    # a diverged model: NaN compares false, so its targets would otherwise rank first (HR 1)
    model.scores = lambda items, *a, **k: torch.full((items.shape[0], split.data.n_items + 1), float("nan"))
    with pytest.raises(ValueError, match="the model scored NaN for 2 of 2 users at the test stage: training diverged"):
        evaluate(model, split, "test", progress=False)


def test_evaluate_prints_progress_lines_without_a_terminal(monkeypatch, capsys):
    monkeypatch.setenv("PERSEQ_PROGRESS_SECONDS", "0")  # a line after every batch
    rows = [(f"u{u}", f"i{(u + t) % 5}", t) for u in range(5) for t in range(4)]
    split = leave_one_out(prepare(_raw(rows)))
    model = build_model("sasrec", split.data.n_items, max_len=8, d=8, n_blocks=1)
    res = evaluate(model, split, "test", EvalConfig(batch_size=2))
    assert res["n_users"] == 5
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("evaluating")]
    assert [ln.split(",")[0] for ln in lines] == ["evaluating test (5 users): 1/3 batches",
                                                  "evaluating test (5 users): 2/3 batches",
                                                  "evaluating test (5 users): 3/3 batches"]


# ------------------------------------------------------------ duplicates, empty results


def test_duplicates_counted_and_dedup_keeps_the_earliest():
    rows = [("a", "x", 5), ("a", "y", 1), ("a", "x", 2), ("a", "x", 2), ("b", "z", 1), ("b", "z", 1)]
    logs = []
    kept = prepare(_raw(rows), log=logs.append)
    assert kept.n_interactions == 6
    assert logs == ["note: 3 duplicate event(s) kept (a user-item pair seen earlier for that user, 2 of them also at "
                    "the same timestamp); data.dedup=true / --dedup keeps only each pair's earliest event"]
    logs.clear()
    d = prepare(_raw(rows), dedup=True, log=logs.append)
    assert logs == ["note: dedup dropped 3 duplicate event(s) (a user-item pair seen earlier for that user; the "
                    "earliest of each pair kept)"]
    assert _seq(d, 0) == ["y", "x"] and d.times.tolist() == [1, 2, 1]  # x at time 2, not the first-in-file 5
    # ids by first appearance among the kept rows, in file order: the row (a, x, 5) is gone
    assert list(d.user_ids) == ["a", "b"] and list(d.item_ids) == ["[PAD]", "y", "x", "z"]
    logs.clear()
    prepare(_raw([("a", "x", 1), ("a", "y", 2)]), log=logs.append)
    assert logs == []  # nothing to report


def test_empty_results_name_their_cause():
    with pytest.raises(ValueError, match=r"^no interactions left after filtering: test.txt has 4 events; "
                                         r"k-core \(min_user=3, min_item=0\) kept 0; relax those settings$"):
        prepare(_raw([("a", "x", 1), ("a", "y", 2), ("b", "x", 1), ("b", "z", 2)]), min_user=3)
    empty = RawInteractions(pl.DataFrame(schema={"user": pl.Utf8, "item": pl.Utf8, "time": pl.Int64}), "e.txt")
    with pytest.raises(ValueError, match=r"^e.txt has no data rows \(the file is empty or blank\)$"):
        prepare(empty)
    skipped = dataclasses.replace(empty, skipped=3)
    with pytest.raises(ValueError, match="all 3 data line"):
        prepare(skipped)


def test_cli_header_only_file(tmp_path, capsys):
    p = tmp_path / "ratings.csv"
    p.write_text("userId,movieId,rating,timestamp\n")
    rc, _, err = _cli(capsys, "data", "prepare", "--path", str(p), "--out", str(tmp_path / "out"))
    assert rc == 2
    assert err.strip() == f"error: {p} has a header line (userId, movieId, rating, timestamp) but no data rows"
    assert not (tmp_path / "out").exists()


def test_cli_duplicates_reported_and_dropped(tmp_path, capsys):
    p = tmp_path / "log.csv"
    p.write_text("user_id,item_id,timestamp\na,x,1\na,y,2\na,x,1\nb,y,4\nb,y,5\n")
    rc, out, _ = _cli(capsys, "data", "stats", str(p))
    assert rc == 0 and _stats(out)["interactions"] == 5
    assert "note: 2 duplicate event(s) kept (a user-item pair seen earlier for that user, 1 of them also at the same " \
           "timestamp); data.dedup=true / --dedup keeps" in out
    rc, out, _ = _cli(capsys, "data", "stats", str(p), "--dedup")
    assert rc == 0 and _stats(out)["interactions"] == 3 and "dedup dropped 2 duplicate event(s)" in out


# ------------------------------------------------------------------------ perseq data CLI


def test_readme_prepare_example_with_and_without_format(tmp_path, capsys, monkeypatch, ratings):
    monkeypatch.chdir(tmp_path)
    for extra in (["--format", "table"], []):
        out_dir = tmp_path / f"prepared{len(extra)}"
        rc, out, err = _cli(capsys, "data", "prepare", "--path", "ratings.csv", *extra, "--out", out_dir.name)
        assert rc == 0, err
        assert f"-> {out_dir}  (train with --set data.dataset={out_dir})" in out
        d = SequenceData.load(out_dir)
        assert list(d.user_ids) == ["1", "2", "3"] and d.lengths.tolist() == [4, 3, 2]
        assert _seq(d, 0) == ["10", "11", "13", "12"]  # time order: 100, 101, 102, 103
        assert d.times.tolist() == [100, 101, 102, 103, 200, 201, 202, 300, 301]
    # with --format table the columns were guessed from the header, and that is said
    assert "guessed the columns user=userId,item=movieId,time=timestamp" in _cli(
        capsys, "data", "stats", "ratings.csv", "--format", "table")[1]


def test_table_column_guessing_and_its_error(tmp_path):
    def guess(header, **kw):
        p = tmp_path / "t.csv"
        p.write_text(header + "\n")
        return R.guess_table_columns(p, **kw)

    assert guess("UserID,Item_Id,Timestamp") == {"user": "UserID", "item": "Item_Id", "time": "Timestamp"}
    assert guess("reviewerID,asin,overall,unixReviewTime", rating=True) == {
        "user": "reviewerID", "item": "asin", "time": "unixReviewTime", "rating": "overall"}
    assert guess("session_id,user_id,product_id,date") == {"user": "user_id", "item": "product_id", "time": "date"}
    assert guess("user,item") == {"user": "user", "item": "item"}
    with pytest.raises(DataFormatError) as e:
        guess("user_id,userId,item")  # two spellings of one role: ambiguous, not a coin toss
    assert "cannot tell which column holds the user (header: ['user_id', 'userId', 'item'])" in str(e.value)
    with pytest.raises(DataFormatError) as e:
        guess("a,b,c")
    msg = str(e.value)
    assert "the user and the item" in msg and "--columns user=COL,item=COL[,time=COL]" in msg
    assert "--format" in msg and "}}" not in msg and "fmt=" not in msg
    # a header line makes a .txt file a table
    p = tmp_path / "log.txt"
    p.write_text("user_id\titem_id\ttimestamp\n1\t2\t3\n")
    assert R.sniff_format(p) == "table"
    assert R.read_any(p).frame.rows() == [("1", "2", 3)]


def test_cli_table_without_guessable_columns_speaks_the_cli(tmp_path, capsys):
    p = tmp_path / "log.csv"
    p.write_text("u,i,t\na,x,3\n")
    rc, _, err = _cli(capsys, "data", "prepare", "--path", str(p), "--out", str(tmp_path / "o"))
    assert rc == 2 and "--columns user=COL,item=COL" in err and "}}" not in err and len(err.strip().splitlines()) == 1
    rc, out, _ = _cli(capsys, "data", "stats", str(p), "--columns", "user=u,item=i,time=t")
    assert rc == 0 and _stats(out)["interactions"] == 1
    rc, _, err = _cli(capsys, "data", "stats", str(p), "--columns", "user")
    assert rc == 2 and "--columns expects role=column pairs" in err


def test_cli_skip_bad_lines_reports_the_count(tmp_path, capsys):
    p = tmp_path / "log.csv"
    p.write_text("user_id,item_id,timestamp\na,x,1\na,y,oops\nb,x,2\nb,,3\nb,z,4\n")
    rc, _, err = _cli(capsys, "data", "stats", str(p))
    assert rc == 2 and f"{p}:3: time value 'oops' is not an integer" in err
    rc, out, _ = _cli(capsys, "data", "stats", str(p), "--skip-bad-lines")
    assert rc == 0 and _stats(out)["interactions"] == 3
    assert f"note: skipped 2 malformed line(s); first: {p}:3:" in out
    # the same through the config, as `perseq train --set data.on_error=skip` does
    notes = []
    data, _ = load_data(DataConfig(dataset=str(p), on_error="skip"), log=notes.append)
    assert data.n_interactions == 3 and any("skipped 2 malformed line(s)" in n for n in notes)
    with pytest.raises(ValueError, match="data.on_error must be 'raise' or 'skip'"):
        load_data(DataConfig(dataset=str(p), on_error="ignore"))


def test_cli_min_rating(tmp_path, capsys, ratings):
    rc, out, _ = _cli(capsys, "data", "stats", str(ratings), "--min-rating", "4")
    # ratings >= 4: user 1 (4.0, 5.0), user 2 (5.0, 5.0), user 3 (4.5)
    assert rc == 0 and (_stats(out)["interactions"], _stats(out)["users"], _stats(out)["items"]) == (5, 3, 4)
    rc, _, err = _cli(capsys, "data", "stats", str(ratings), "--min-rating", "6")
    assert rc == 2 and f"no interactions left after filtering: {ratings} has 9 events; min_rating=6 kept 0" in err
    seq = tmp_path / "seq.txt"
    seq.write_text("1 10 11\n")
    rc, _, err = _cli(capsys, "data", "stats", str(seq), "--min-rating", "4")
    assert rc == 2 and "the 'user-per-line' format has none" in err
    rc, _, err = _cli(capsys, "data", "stats", str(ratings), "--format", "table", "--columns", "user=userId,item=movieId",
                      "--min-rating", "4")
    assert rc == 2 and "this table file has none: map one with --columns ...,rating=COL" in err
    rc, out, _ = _cli(capsys, "data", "stats", str(ratings), "--format", "table", "--min-rating", "4.5")
    assert rc == 0 and _stats(out)["interactions"] == 4  # guessed rating column: 5.0, 5.0, 5.0, 4.5


def test_ratings_from_every_rated_format(tmp_path):
    dat = tmp_path / "ratings.dat"
    dat.write_text("1::10::5::100\n1::11::2::101\n")
    assert R.read_any(dat, rating=True).frame["rating"].to_list() == [5.0, 2.0]
    assert R.read_any(dat).frame.columns == ["user", "item", "time"]  # ratings only when asked
    js = tmp_path / "r.json"
    js.write_text('{"reviewerID": "A", "asin": "B", "overall": 4.0, "unixReviewTime": 1}\n'
                  '{"reviewerID": "A", "asin": "C", "overall": 2.0, "unixReviewTime": 2}\n')
    assert R.read_any(js, rating=True).frame.rows() == [("A", "B", 1, 4.0), ("A", "C", 2, 2.0)]
    inter = tmp_path / "x.inter"
    inter.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t2\t3\t4\n")
    assert R.read_any(inter, rating=True).frame.rows() == [("1", "2", 4, 3.0)]
    bad = tmp_path / "bad.dat"
    bad.write_text("1::10::5::100\n1::11::x::101\n")
    with pytest.raises(DataFormatError, match=r"bad.dat:2: rating value 'x' is not a number"):
        R.read_any(bad, rating=True)
    assert R.read_any(bad, rating=True, on_error="skip").frame.rows() == [("1", "10", 100, 5.0)]
    notes = []
    data, _ = load_data(DataConfig(dataset=str(js), min_rating=3), log=notes.append)
    assert data.n_interactions == 1 and _seq(data, 0) == ["B"]


@pytest.mark.parametrize("name,text", [
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,4\n1,3,5,6\n"),
    ("t.tsv", "user\titem\tstars\n1\t2\t4\n2\t2\t1.5\n"),
    ("r.json", '{"reviewerID": "A", "asin": "B", "overall": 4.0}\n{"reviewerID": "C", "asin": "B", "overall": 1}\n'),
])
def test_ratings_fast_and_slow_paths_agree(tmp_path, monkeypatch, name, text):
    p = tmp_path / name
    p.write_text(text)
    fast = R.read_any(p, rating=True).frame.rows()
    monkeypatch.setattr(R, "_polars_csv", lambda *a, **k: None)
    monkeypatch.setattr(R, "_json_fast", lambda *a, **k: None)
    assert R.read_any(p, rating=True).frame.rows() == fast
    assert [r[-1] for r in fast] == {"ratings.csv": [3.5, 5.0], "t.tsv": [4.0, 1.5], "r.json": [4.0, 1.0]}[name]


def test_cli_kcore(tmp_path, capsys):
    p = tmp_path / "log.csv"
    # item q is rated by one user: 2-core drops it, then user c (left with 1 event) goes too
    p.write_text("user,item,time\na,x,1\na,y,2\nb,x,1\nb,y,2\nc,x,1\nc,q,2\n")
    rc, out, _ = _cli(capsys, "data", "stats", str(p), "--kcore", "2")
    assert rc == 0 and (_stats(out)["users"], _stats(out)["items"], _stats(out)["interactions"]) == (2, 2, 4)
    rc, out, _ = _cli(capsys, "data", "stats", str(p), "--kcore", "2", "--min-item", "1")  # users only
    assert rc == 0 and (_stats(out)["users"], _stats(out)["interactions"]) == (3, 6)
    rc, _, err = _cli(capsys, "data", "stats", str(p), "--kcore", "3")
    assert rc == 2 and "k-core (min_user=3, min_item=3) kept 0" in err


def test_data_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["data", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, words in [("--skip-bad-lines", "report how many"), ("--dedup", "earliest event of each (user, item) pair"),
                        ("--min-rating", "rated X or more"), ("--kcore", "fewer than N events"),
                        ("--columns", "guessed from the header"), ("--format", "instead of guessing")]:
        assert flag in text and words in text
