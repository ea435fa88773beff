"""Readers: exact frames on hand-written files, exact errors (file:line) on malformed ones."""
import datetime as dt
import gzip
import json
import time

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perseq.data import readers as R
from perseq.data.errors import DataFormatError
from perseq.data.raw import RawInteractions


def write(tmp_path, name, text, mode="w"):
    p = tmp_path / name
    if mode == "wb":
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8", newline="")
    return p


def rows(raw: RawInteractions):
    return raw.frame.rows()


def assert_error(exc_info, path, line, *fragments):
    err = exc_info.value
    assert isinstance(err, DataFormatError)
    assert err.path == str(path)
    assert err.line == line
    text = str(err)
    assert text.startswith(f"{path}:{line}:" if line is not None else f"{path}:")
    assert path.name in text
    for frag in fragments:
        assert frag in text


# ----------------------------------------------------------------- user-per-line


def test_user_per_line_exact_frame_and_blank_note(tmp_path):
    p = write(tmp_path, "seq.txt", "1 10 11 12\n2 20\n\n  \n3 30 31\n")
    raw = R.read_user_per_line(p)
    assert rows(raw) == [("1", "10", None), ("1", "11", None), ("1", "12", None),
                         ("2", "20", None), ("3", "30", None), ("3", "31", None)]
    assert raw.frame.schema == {"user": pl.Utf8, "item": pl.Utf8, "time": pl.Int64}
    assert not raw.has_time and raw.skipped == 0
    assert raw.source == str(p)
    assert any("ignored 2 blank line(s)" in n for n in raw.notes)


def test_user_per_line_keeps_file_order_and_raw_ids(tmp_path):
    # No sorting, no renumbering: ids are the strings in the file.
    p = write(tmp_path, "seq.txt", "u9 b a\r\nu1 c\r\nu9 d\r\n")
    raw = R.read_user_per_line(p)
    assert rows(raw) == [("u9", "b", None), ("u9", "a", None), ("u1", "c", None),
                         ("u9", "d", None)]


def test_user_per_line_empty_user_raises_with_line(tmp_path):
    p = write(tmp_path, "seq.txt", "1 10\n\n2\n3 30\n")
    with pytest.raises(DataFormatError) as e:
        R.read_user_per_line(p)
    assert_error(e, p, 3, "'2'", "no items")


def test_user_per_line_empty_user_skipped_and_counted(tmp_path):
    p = write(tmp_path, "seq.txt", "1 10\n2\n3 30\n4\n")
    raw = R.read_user_per_line(p, on_error="skip")
    assert rows(raw) == [("1", "10", None), ("3", "30", None)]
    assert raw.skipped == 2
    assert any("seq.txt:2" in n for n in raw.notes)


def test_user_per_line_gzip(tmp_path):
    p = write(tmp_path, "seq.txt.gz", gzip.compress(b"1 10 11\n2 20\n"), mode="wb")
    assert rows(R.read_user_per_line(p)) == [("1", "10", None), ("1", "11", None),
                                             ("2", "20", None)]


def test_invalid_utf8_names_line(tmp_path):
    p = write(tmp_path, "seq.txt", b"1 10\n2 2\xff0\n", mode="wb")
    with pytest.raises(DataFormatError) as e:
        R.read_user_per_line(p)
    assert_error(e, p, 2, "UTF-8")


def test_on_error_must_be_known(tmp_path):
    p = write(tmp_path, "seq.txt", "1 10\n")
    with pytest.raises(ValueError, match="on_error"):
        R.read_user_per_line(p, on_error="ignore")


# ---------------------------------------------------------------- with times file


def test_times_file_aligned(tmp_path):
    items = write(tmp_path, "items.txt", "1 10 11\n\n2 20 21 22\n")
    times = write(tmp_path, "times.txt", "1 100 200\n2 5 5 7.0\n")
    raw = R.read_user_per_line(items, times_path=times)
    assert rows(raw) == [("1", "10", 100), ("1", "11", 200), ("2", "20", 5),
                         ("2", "21", 5), ("2", "22", 7)]
    assert raw.has_time
    assert not any("decreasing" in n for n in raw.notes)


def test_times_non_monotone_is_a_note_with_count_not_an_error(tmp_path):
    items = write(tmp_path, "items.txt", "1 10 11 12\n2 20 21\n3 30 31\n")
    times = write(tmp_path, "times.txt", "1 300 200 100\n2 5 9\n3 9 8\n")
    raw = R.read_user_per_line(items, times_path=times)
    # File order is kept; the caller sorts stably by time.
    assert raw.frame["time"].to_list() == [300, 200, 100, 5, 9, 9, 8]
    notes = [n for n in raw.notes if "decreasing" in n]
    assert len(notes) == 1
    assert "3 decreasing adjacent timestamp pair(s) on 2 line(s)" in notes[0]
    assert "times.txt" in notes[0]
    assert raw.skipped == 0


def test_times_file_wrong_user_names_times_file_and_line(tmp_path):
    items = write(tmp_path, "items.txt", "1 10\n2 20 21\n")
    times = write(tmp_path, "times.txt", "1 100\n3 5 6\n")
    with pytest.raises(DataFormatError) as e:
        R.read_user_per_line(items, times_path=times)
    assert_error(e, times, 2, "'3'", "'2'", "misaligned", "line 2 of")


def test_times_file_wrong_length(tmp_path):
    items = write(tmp_path, "items.txt", "1 10\n2 20 21 22\n")
    times = write(tmp_path, "times.txt", "1 100\n2 5 6\n")
    with pytest.raises(DataFormatError) as e:
        R.read_user_per_line(items, times_path=times)
    assert_error(e, times, 2, "2 time value(s)", "3 item(s)")


@pytest.mark.parametrize("bad", ["2x0", "12.5", "nan", "", "1e400"])
def test_times_file_non_integer_value(tmp_path, bad):
    items = write(tmp_path, "items.txt", "1 10\n2 20 21\n")
    times = write(tmp_path, "times.txt", f"1 100\n2 5 {bad}\n")
    with pytest.raises(DataFormatError) as e:
        R.read_user_per_line(items, times_path=times)
    # An empty value shows up as a length mismatch; everything else as a bad time value.
    assert_error(e, times, 2)
    if bad:
        assert "time value" in str(e.value)


def test_times_file_shorter_and_longer(tmp_path):
    items = write(tmp_path, "items.txt", "1 10\n2 20\n3 30\n")
    short = write(tmp_path, "short.txt", "1 1\n2 2\n")
    with pytest.raises(DataFormatError) as e:
        R.read_user_per_line(items, times_path=short)
    assert_error(e, short, 3, "line 3 of", "'3'")

    items2 = write(tmp_path, "items2.txt", "1 10\n")
    long = write(tmp_path, "long.txt", "1 1\n\n2 2\n")
    with pytest.raises(DataFormatError) as e:
        R.read_user_per_line(items2, times_path=long)
    assert_error(e, long, 3, "no matching line")


def test_times_file_skip_counts_every_bad_pair(tmp_path):
    items = write(tmp_path, "items.txt", "1 10\n2 20 21\n3\n4 40\n5 50\n")
    times = write(tmp_path, "times.txt", "1 100\n2 5\n3\n4 x\n5 7\n")
    raw = R.read_user_per_line(items, times_path=times, on_error="skip")
    assert rows(raw) == [("1", "10", 100), ("5", "50", 7)]
    assert raw.skipped == 3  # wrong length, empty user, bad time value


# ------------------------------------------------------------------------- pairs


def test_pairs_two_columns(tmp_path):
    p = write(tmp_path, "pairs.txt", "1 1\n1 2\n\n2 1\n2 3\n")
    raw = R.read_pairs(p)
    assert rows(raw) == [("1", "1", None), ("1", "2", None), ("2", "1", None),
                         ("2", "3", None)]
    assert any("ignored 1 blank" in n for n in raw.notes)


def test_pairs_three_columns_have_times(tmp_path):
    p = write(tmp_path, "pairs.txt", "1\t1\t50\n1\t2\t40\n2\t1\t7\n")
    raw = R.read_pairs(p)
    assert rows(raw) == [("1", "1", 50), ("1", "2", 40), ("2", "1", 7)]


def test_pairs_irregular_whitespace_goes_through_slow_path(tmp_path):
    p = write(tmp_path, "pairs.txt", "1  1\n 1 2\n2\t3 \n")
    assert rows(R.read_pairs(p)) == [("1", "1", None), ("1", "2", None), ("2", "3", None)]


def test_pairs_wrong_field_count(tmp_path):
    p = write(tmp_path, "pairs.txt", "1 1\n1 2\n1 3 99\n2 1\n")
    with pytest.raises(DataFormatError) as e:
        R.read_pairs(p)
    assert_error(e, p, 3, "expected 2 fields", "got 3")
    raw = R.read_pairs(p, on_error="skip")
    assert rows(raw) == [("1", "1", None), ("1", "2", None), ("2", "1", None)]
    assert raw.skipped == 1


def test_pairs_first_line_with_four_fields(tmp_path):
    p = write(tmp_path, "pairs.txt", "\n1 2 3 4\n1 2\n")
    with pytest.raises(DataFormatError) as e:
        R.read_pairs(p)
    assert_error(e, p, 2, "got 4")


def test_pairs_non_integer_time(tmp_path):
    p = write(tmp_path, "pairs.txt", "1 1 10\n1 2 11\n1 3 1.5\n1 4 abc\n")
    with pytest.raises(DataFormatError) as e:
        R.read_pairs(p)
    assert_error(e, p, 3, "'1.5'", "not an integer")
    raw = R.read_pairs(p, on_error="skip")
    assert rows(raw) == [("1", "1", 10), ("1", "2", 11)]
    assert raw.skipped == 2


# --------------------------------------------------------------------- MovieLens


def test_movielens_dat(tmp_path):
    p = write(tmp_path, "ratings.dat",
              "1::1193::5::978300760\r\n1::661::3::978302109\r\n\r\n2::1357::5::978298709\r\n")
    raw = R.read_movielens(p)
    assert rows(raw) == [("1", "1193", 978300760), ("1", "661", 978302109),
                         ("2", "1357", 978298709)]


def test_movielens_csv(tmp_path):
    p = write(tmp_path, "ratings.csv",
              "userId,movieId,rating,timestamp\n1,296,5.0,1147880044\n1,306,3.5,1147868817\n")
    assert rows(R.read_movielens(p)) == [("1", "296", 1147880044), ("1", "306", 1147868817)]


def test_movielens_u_data(tmp_path):
    p = write(tmp_path, "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    assert rows(R.read_movielens(p)) == [("196", "242", 881250949), ("186", "302", 891717742)]


def test_movielens_detected_by_content(tmp_path):
    p = write(tmp_path, "whatever.txt", "1::10::5::100\n")
    assert rows(R.read_movielens(p)) == [("1", "10", 100)]
    assert R.sniff_format(p) == "movielens"


def test_movielens_bad_lines(tmp_path):
    p = write(tmp_path, "ratings.dat",
              "1::10::5::100\n1::11::4\n2::12::3::97x\n2::13::3::130\n")
    with pytest.raises(DataFormatError) as e:
        R.read_movielens(p)
    assert_error(e, p, 2, "expected 4 fields", "got 3")
    raw = R.read_movielens(p, on_error="skip")
    assert rows(raw) == [("1", "10", 100), ("2", "13", 130)]
    assert raw.skipped == 2


def test_movielens_csv_bad_timestamp(tmp_path):
    p = write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n1,2,5,10\n1,3,4,1e\n")
    with pytest.raises(DataFormatError) as e:
        R.read_movielens(p)
    assert_error(e, p, 3, "'1e'")


# ------------------------------------------------------------------------ RecBole

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def test_recbole_exact_rows_unsorted_and_float_times_floored(tmp_path):
    p = write(tmp_path, "x.inter", INTER_HEADER
              + "196\t242\t3\t881250949\n186\t302\t3\t891717742.0\n196\t1\t1\t881250948.9\n")
    raw = R.read_recbole_inter(p)
    # File order, not time order.
    assert rows(raw) == [("196", "242", 881250949), ("186", "302", 891717742),
                         ("196", "1", 881250948)]


def test_recbole_columns_found_by_name_and_optional_time(tmp_path):
    p = write(tmp_path, "x.inter", "rating:float\titem_id:token\tuser_id:token\n5\ti1\tu1\n")
    raw = R.read_recbole_inter(p)
    assert rows(raw) == [("u1", "i1", None)]
    assert not raw.has_time


def test_recbole_missing_column_lists_available(tmp_path):
    p = write(tmp_path, "x.inter", "user_id:token\tmovie:token\n1\t2\n")
    with pytest.raises(DataFormatError) as e:
        R.read_recbole_inter(p)
    assert_error(e, p, 1, "'item_id'", "['user_id', 'movie']")


def test_recbole_bad_rows(tmp_path):
    p = write(tmp_path, "x.inter", INTER_HEADER
              + "1\t2\t3\t100\n1\t3\t3\tabc\n1\t4\t3\n\t5\t3\t100\n1\t6\t3\t101\n")
    with pytest.raises(DataFormatError) as e:
        R.read_recbole_inter(p)
    assert_error(e, p, 3, "'abc'")
    raw = R.read_recbole_inter(p, on_error="skip")
    assert rows(raw) == [("1", "2", 100), ("1", "6", 101)]
    assert raw.skipped == 3


# ------------------------------------------------------------------ generic tables


def test_table_csv_with_mapping_quotes_and_dates(tmp_path):
    p = write(tmp_path, "log.csv",
              'item,who,when,extra\n"a,b",u1,2016-03-09 00:44:42,x\nc,u2,5,\n'
              'd,u1,2017-12-17T00:00:00Z,y\n')
    raw = R.read_table(p, {"user": "who", "item": "item", "time": "when"})
    assert rows(raw) == [("u1", "a,b", 1457484282), ("u2", "c", 5), ("u1", "d", 1513468800)]


def test_table_tsv_without_time(tmp_path):
    p = write(tmp_path, "log.tsv", "u\ti\n1\t2\n3\t4\n")
    raw = R.read_table(p, {"user": "u", "item": "i"})
    assert rows(raw) == [("1", "2", None), ("3", "4", None)]


def test_table_explicit_separator(tmp_path):
    p = write(tmp_path, "log.txt", "u;i;t\n1;2;3\n")
    assert rows(R.read_table(p, {"user": "u", "item": "i", "time": "t"}, sep=";")) == [
        ("1", "2", 3)]


def test_table_unknown_column_lists_available(tmp_path):
    p = write(tmp_path, "log.csv", "user_id,item_id,ts\n1,2,3\n")
    with pytest.raises(DataFormatError) as e:
        R.read_table(p, {"user": "user_id", "item": "item_id", "time": "timestamp"})
    assert_error(e, p, 1, "'timestamp'", "['user_id', 'item_id', 'ts']")


def test_table_bad_mapping_keys():
    with pytest.raises(ValueError, match="unexpected"):
        R.read_table("x.csv", {"user": "u", "item": "i", "score": "s"})
    with pytest.raises(ValueError, match="'item'"):
        R.read_table("x.csv", {"user": "u"})


def test_table_non_integer_time_and_field_count(tmp_path):
    p = write(tmp_path, "log.csv", "u,i,t\n1,2,3\n1,3,12.5\n1,4\n1,5,6,7\n1,6,8\n")
    with pytest.raises(DataFormatError) as e:
        R.read_table(p, {"user": "u", "item": "i", "time": "t"})
    assert_error(e, p, 3, "'12.5'", "not an integer")
    raw = R.read_table(p, {"user": "u", "item": "i", "time": "t"}, on_error="skip")
    assert rows(raw) == [("1", "2", 3), ("1", "6", 8)]
    assert raw.skipped == 3


def test_table_malformed_quoting_names_line(tmp_path):
    p = write(tmp_path, "log.csv", 'u,i\n1,2\n2,"3"x\n4,5\n')
    with pytest.raises(DataFormatError) as e:
        R.read_table(p, {"user": "u", "item": "i"})
    assert_error(e, p, 3, "quoting")


def test_table_empty_file(tmp_path):
    p = write(tmp_path, "log.csv", "")
    with pytest.raises(DataFormatError) as e:
        R.read_table(p, {"user": "u", "item": "i"})
    assert_error(e, p, 1, "empty")


def test_table_parquet(tmp_path):
    p = tmp_path / "log.parquet"
    pl.DataFrame({
        "uid": [3, 1, 3],
        "iid": ["x", "y", "z"],
        "ts": [dt.datetime(1970, 1, 1, 0, 1, 40), dt.datetime(1970, 1, 1, 0, 0, 5),
               dt.datetime(2000, 1, 1)],
    }).write_parquet(p)
    raw = R.read_table(p, {"user": "uid", "item": "iid", "time": "ts"})
    assert rows(raw) == [("3", "x", 100), ("1", "y", 5), ("3", "z", 946684800)]
    with pytest.raises(DataFormatError) as e:
        R.read_table(p, {"user": "user", "item": "iid"})
    assert_error(e, p, None, "'user'", "['uid', 'iid', 'ts']")


def test_table_parquet_bad_time_names_row(tmp_path):
    p = tmp_path / "log.parquet"
    pl.DataFrame({"u": ["a", "b", "c"], "i": ["1", "2", "3"], "t": ["10", "oops", None]}
                 ).write_parquet(p)
    with pytest.raises(DataFormatError) as e:
        R.read_table(p, {"user": "u", "item": "i", "time": "t"})
    assert_error(e, p, None, "row 2")
    raw = R.read_table(p, {"user": "u", "item": "i", "time": "t"}, on_error="skip")
    assert rows(raw) == [("a", "1", 10)]
    assert raw.skipped == 2


# ------------------------------------------------------------------- JSON lines


def test_amazon_json_2014(tmp_path):
    recs = [{"reviewerID": "A2", "asin": "B1", "unixReviewTime": 1252800000, "helpful": [0, 0],
             "reviewText": "ok"},
            {"reviewerID": "A1", "asin": "B2", "unixReviewTime": 1252800001}]
    p = write(tmp_path, "reviews.json", "\n".join(json.dumps(r) for r in recs) + "\n\n")
    raw = R.read_amazon_json(p)
    assert rows(raw) == [("A2", "B1", 1252800000), ("A1", "B2", 1252800001)]
    assert any("ignored 1 blank" in n for n in raw.notes)


def test_amazon_json_2023_gz_milliseconds(tmp_path):
    recs = [{"user_id": "U1", "asin": "C1", "parent_asin": "P1", "timestamp": 1588687728923},
            {"user_id": "U2", "asin": "C2", "parent_asin": "P2", "timestamp": 1588687729000}]
    data = "".join(json.dumps(r) + "\n" for r in recs).encode()
    p = write(tmp_path, "Beauty.jsonl.gz", gzip.compress(data), mode="wb")
    assert rows(R.read_amazon_json(p)) == [("U1", "P1", 1588687728), ("U2", "P2", 1588687729)]


def test_json_python_literal_lines_with_fields(tmp_path):
    # Steam's dump is Python literals, with ISO dates.
    p = write(tmp_path, "steam.json",
              "{'username': 'Chaos', 'product_id': '725280', 'date': '2017-12-17', "
              "'early_access': False}\n{'username': 'B', 'product_id': '1', "
              "'date': '2018-01-05'}\n")
    raw = R.read_amazon_json(p, fields={"user": "username", "item": "product_id",
                                        "time": "date"})
    assert rows(raw) == [("Chaos", "725280", 1513468800), ("B", "1", 1515110400)]


def test_amazon_json_bad_lines(tmp_path):
    p = write(tmp_path, "reviews.json",
              '{"reviewerID": "A", "asin": "B", "unixReviewTime": 5}\n'
              '{"reviewerID": "A", "asin": "C", "unixReviewTime": 6\n'
              '{"reviewerID": "A", "unixReviewTime": 7}\n'
              '{"reviewerID": "A", "asin": "D", "unixReviewTime": "soon"}\n'
              '{"reviewerID": {"x": 1}, "asin": "E", "unixReviewTime": 8}\n'
              '{"reviewerID": "A", "asin": "F", "unixReviewTime": 9}\n')
    with pytest.raises(DataFormatError) as e:
        R.read_amazon_json(p)
    assert_error(e, p, 2, "not a JSON object")
    raw = R.read_amazon_json(p, on_error="skip")
    assert rows(raw) == [("A", "B", 5), ("A", "F", 9)]
    assert raw.skipped == 4


def test_amazon_json_unknown_schema(tmp_path):
    p = write(tmp_path, "r.json", '{"a": 1}\n')
    with pytest.raises(DataFormatError) as e:
        R.read_amazon_json(p)
    assert_error(e, p, 1, "unrecognised", "['a']")


def test_table_json_uses_mapping(tmp_path):
    p = write(tmp_path, "yelp.json",
              '{"user_id": "u", "business_id": "b", "date": "2016-03-09 00:44:42"}\n')
    raw = R.read_table(p, {"user": "user_id", "item": "business_id", "time": "date"})
    assert rows(raw) == [("u", "b", 1457484282)]


# ------------------------------------------------------------------- dispatch


def test_readers_registry_names():
    assert set(R.READERS) == {"user-per-line", "pairs", "movielens", "recbole", "table",
                              "amazon-json"}


def test_read_any_unknown_format_lists_valid(tmp_path):
    p = write(tmp_path, "seq.txt", "1 2\n")
    with pytest.raises(ValueError) as e:
        R.read_any(p, "csv")
    for name in R.READERS:
        assert name in str(e.value)


def test_sniffing(tmp_path):
    seq = write(tmp_path, "seq.txt", "1 10 11 12\n2 20 21\n3 7\n")
    pairs = write(tmp_path, "pairs.txt", "1 10\n1 11\n2 20\n")
    inter = write(tmp_path, "data.txt", INTER_HEADER + "1\t2\t3\t4\n")
    udata = write(tmp_path, "u.txt", "1\t2\t3\t4\n")
    js = write(tmp_path, "r.jsonl", '{"reviewerID": "A", "asin": "B", "unixReviewTime": 1}\n')
    assert R.sniff_format(seq) == "user-per-line"
    assert R.sniff_format(pairs) == "pairs"
    assert R.sniff_format(inter) == "recbole"
    assert R.sniff_format(udata) == "movielens"
    assert R.sniff_format(js) == "amazon-json"
    assert R.sniff_format(seq, times_path=seq) == "user-per-line"
    assert rows(R.read_any(pairs)) == [("1", "10", None), ("1", "11", None), ("2", "20", None)]
    assert rows(R.read_any(seq))[-1] == ("3", "7", None)
    assert rows(R.read_any(inter)) == [("1", "2", 4)]
    assert rows(R.read_any(js)) == [("A", "B", 1)]
    tab = write(tmp_path, "t.csv", "a,b\n1,2\n")
    with pytest.raises(ValueError, match="columns"):
        R.read_any(tab)
    assert rows(R.read_any(tab, columns={"user": "a", "item": "b"})) == [("1", "2", None)]


# ---------------------------------------------- fast path == slow path, no tracebacks

CLEAN = {
    "pairs": ("p.txt", "1 1 5\n1 2 6\n2 1 7\n", {}),
    "movielens-dat": ("ratings.dat", "1::10::5::100\n2::20::4::200.0\n", {}),
    "movielens-csv": ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,3,,5\n", {}),
    "recbole": ("x.inter", INTER_HEADER + "1\t2\t3\t4.5\n5\t6\t7\t8\n", {}),
    "table": ("t.csv", 'u,i,t\n1,"2",2020-01-01\n3,4,5\n',
              {"columns": {"user": "u", "item": "i", "time": "t"}}),
    "json": ("r.json", '{"reviewerID": "A", "asin": "B", "unixReviewTime": 1}\n'
                       '{"reviewerID": 7, "asin": "C", "unixReviewTime": "2"}\n', {}),
}


@pytest.mark.parametrize("case", sorted(CLEAN))
def test_fast_and_slow_paths_agree(tmp_path, monkeypatch, case):
    name, text, kw = CLEAN[case]
    p = write(tmp_path, name, text)
    full_decodes = []
    decode = R._decode
    monkeypatch.setattr(R, "_decode", lambda path, data: (
        full_decodes.append(len(data) == p.stat().st_size), decode(path, data))[1])
    fast = R.read_any(p, **kw)
    assert not any(full_decodes), "the clean file should not need the slow path"
    monkeypatch.setattr(R, "_polars_csv", lambda *a, **k: None)
    monkeypatch.setattr(R, "_json_fast", lambda *a, **k: None)
    monkeypatch.setattr(R, "_pairs_fast", lambda *a, **k: None)
    slow = R.read_any(p, **kw)
    assert rows(fast) == rows(slow)
    assert len(rows(fast)) >= 2


_GARBAGE = st.lists(
    st.text(alphabet=st.sampled_from(list("12ab:,\t \"'{}[].-eZ")), max_size=12),
    min_size=0, max_size=6,
).map(lambda ls: "\n".join(ls))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_GARBAGE, fmt=st.sampled_from(sorted(CLEAN)))
def test_garbage_gives_data_format_error_or_result(tmp_path, body, fmt):
    """Whatever the content, a reader returns or raises DataFormatError, never a traceback."""
    name, text, kw = CLEAN[fmt]
    header = text.split("\n")[0] + "\n" if fmt in ("movielens-csv", "recbole", "table") else ""
    p = write(tmp_path, name, header + body)
    for on_error in ("raise", "skip"):
        try:
            raw = R.read_any(p, on_error=on_error, **kw)
        except DataFormatError:
            assert on_error == "raise" or fmt == "json" or header
            continue
        assert isinstance(raw, RawInteractions)
        assert raw.frame.columns == ["user", "item", "time"]
        assert raw.frame["user"].null_count() == 0 and raw.frame["item"].null_count() == 0


# ------------------------------------------------------------------ shared data


def test_ml1m_user_per_line_speed_and_counts(shared_datasets):
    path = shared_datasets / "ml-1m" / "ml-1m_seq.txt"
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        raw = R.read_user_per_line(path)
        best = min(best, time.perf_counter() - t0)
    f = raw.frame
    assert (f.height, f["user"].n_unique(), f["item"].n_unique()) == (1_000_209, 6040, 3706)
    assert best < 2.0, f"reading ml-1m_seq.txt took {best:.2f}s"
