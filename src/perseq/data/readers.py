"""Readers for every supported interaction-file format.

Each reader turns one file into :class:`~perseq.data.raw.RawInteractions`: string ids, an
``Int64`` time column (all null when the format has none) and the rows **in file order**.
Readers never sort, deduplicate or filter; that is the job of ``prepare``, which sorts
each user's rows stably by time, so that file order breaks ties.

Errors. Malformed input raises :class:`~perseq.data.errors.DataFormatError` naming the file
and the 1-based line (``path:line: message``); no polars or Python parsing traceback is
allowed to escape. With ``on_error="skip"`` a malformed line is dropped instead, counted in
``RawInteractions.skipped``, and the first such problem is kept in ``notes``. Blank lines are
never errors: they are ignored and counted in ``notes``. Invalid UTF-8 and, for tables, a
missing or wrong header are file-level problems and always raise.

Ratings. Readers drop ratings (this is implicit feedback) unless asked with ``rating=True``:
then the MovieLens, RecBole (``rating`` field), Amazon JSON (``overall``/``rating``) and
table (a ``rating`` column mapping) readers add a Float64 ``rating`` column, which
``prepare(min_rating=...)`` filters on. A rating must be a finite number, else the line is
malformed. Formats without ratings (user-per-line, pairs) refuse ``rating=True``.

Timestamps. A time value must be an integer (``"881250949"``) or a number with an integral
value (``"881250949.0"``); anything else (``"12.5"``, ``"abc"``, ``"nan"``) is a
``DataFormatError`` at its line. Exceptions, documented per reader: RecBole ``.inter`` files
declare timestamps as ``float``, so fractional seconds are floored there; the JSON and
generic table readers also accept ISO-8601 dates (``"2017-12-17"``, naive means UTC) because
Yelp and Steam store dates that way.

Speed. Table-like formats are parsed by polars (all columns read as strings so that ids are
kept verbatim). Only when the fast path fails or finds a bad value do we re-read the file
line by line in Python; that slow path is the definition of what is valid, so the fast path
only ever accepts files that the slow path accepts too, and the slow path is what names the
offending line or implements ``on_error="skip"``. User-per-line files are split in plain
Python, which reads ML-1M (1M tokens) in about 0.2 s.
"""
from __future__ import annotations

import ast
import codecs
import csv
import gzip
import io
import json
import math
import zlib
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Callable, Iterator, Literal, Mapping, Sequence

import polars as pl

from perseq.data.errors import DataFormatError
from perseq.data.raw import RawInteractions

OnError = Literal["raise", "skip"]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# Rows are matched to lines only in the slow path; this is the separator polars sees when a
# multi-character separator such as MovieLens' "::" is mapped to one byte for the fast path.
_UNIT_SEP = "\x1f"


# --------------------------------------------------------------------------- helpers


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")


def _plain_name(path) -> str:
    """Lower-case file name without a trailing ``.gz``: what format detection looks at."""
    name = PurePath(str(path)).name.lower()
    return name[:-3] if name.endswith(".gz") else name


def _read_bytes(path) -> bytes:
    """File content, gunzipped when the name ends in ``.gz``, without a UTF-8 BOM."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such data file: {p}")
    data = p.read_bytes()
    if p.name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataFormatError(p, None, f"not a valid gzip file ({e})") from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    return data


def _decode(path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataFormatError(path, line, f"not valid UTF-8 ({e.reason})") from None


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """``(line_number, line)`` pairs, 1-based, without the empty piece after a final newline."""
    parts = text.split("\n")
    if parts and parts[-1] == "":
        parts.pop()
    return enumerate(parts, 1)


class _Problems:
    """Raises or counts malformed lines according to ``on_error``."""

    def __init__(self, path, on_error: str):
        _check_on_error(on_error)
        self.path = str(path)
        self.raise_ = on_error == "raise"
        self.skipped = 0
        self.first: str | None = None

    def report(self, line: int | None, message: str, path=None) -> None:
        err = DataFormatError(self.path if path is None else path, line, message)
        if self.raise_:
            raise err
        self.skipped += 1
        if self.first is None:
            self.first = str(err)

    def notes(self) -> list[str]:
        if not self.skipped:
            return []
        return [f"skipped {self.skipped} malformed line(s); first: {self.first}"]


def _blank_note(path, blank: int) -> list[str]:
    return [f"{path}: ignored {blank} blank line(s)"] if blank else []


def _parse_time(text: str, *, fractional: str = "error", dates: bool = False) -> int:
    """One time value as int64 seconds; ``ValueError`` with a readable reason otherwise.

    This is the single definition of a valid time value: the vectorized path below only
    accelerates the cases this function accepts.
    """
    s = text.strip()
    value: int | None = None
    try:
        value = int(s)
    except ValueError:
        try:
            f = float(s)
        except ValueError:
            f = None
        if f is not None:
            if not math.isfinite(f):
                raise ValueError(f"time value {text!r} is not a finite number") from None
            if f != math.floor(f) and fractional != "floor":
                raise ValueError(f"time value {text!r} is not an integer") from None
            value = math.floor(f)
        elif dates:
            iso = s[:-1] + "+00:00" if s[-1:] in ("Z", "z") else s
            try:
                dt = datetime.fromisoformat(iso)
            except ValueError:
                pass
            else:
                if dt.tzinfo is None:
                    dt = dt.replace(tzinfo=timezone.utc)
                value = math.floor(dt.timestamp())
    if value is None:
        what = "an integer or an ISO-8601 date" if dates else "an integer"
        raise ValueError(f"time value {text!r} is not {what}")
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"time value {text!r} does not fit in int64")
    return value


def _times_vectorized(s: pl.Series, *, fractional: str, dates: bool) -> pl.Series | None:
    """Vectorized :func:`_parse_time`; ``None`` if any value is missing or invalid."""
    s = s.cast(pl.Utf8).str.strip_chars()
    if s.null_count() or (s == "").any():
        return None
    out = s.cast(pl.Int64, strict=False)
    todo = out.is_null()
    if todo.any():
        f = s.cast(pl.Float64, strict=False)
        ok = f.is_finite().fill_null(False) & (f.abs() < 9.2e18).fill_null(False)
        if fractional != "floor":
            ok = ok & (f == f.floor()).fill_null(False)
        as_int = f.floor().fill_nan(None).cast(pl.Int64, strict=False)
        out = pl.select(pl.when(todo & ok).then(as_int).otherwise(out)).to_series()
        todo = out.is_null()
    if todo.any():
        # Whatever polars cannot cast (dates, exotic spellings) goes through the Python
        # definition, once per distinct value.
        keys = s.filter(todo).unique().to_list()
        vals = []
        for k in keys:
            try:
                vals.append(_parse_time(k, fractional=fractional, dates=dates))
            except ValueError:
                return None
        mapped = s.replace_strict(keys, vals, default=None, return_dtype=pl.Int64)
        out = pl.select(pl.coalesce(out, mapped)).to_series()
    return out.alias("time")


def _result(path, users, items, times, *, ratings=None, skipped=0, notes=(),
            header=None) -> RawInteractions:
    """Build the ``RawInteractions`` from columns (lists or polars Series); ``ratings`` None
    means no rating column at all (not a column of nulls)."""
    n = len(users)
    cols = {
        "user": pl.Series("user", users, dtype=pl.Utf8),
        "item": pl.Series("item", items, dtype=pl.Utf8),
        "time": (
            pl.Series("time", [None] * n, dtype=pl.Int64)
            if times is None
            else pl.Series("time", times, dtype=pl.Int64)
        ),
    }
    if ratings is not None:
        cols["rating"] = pl.Series("rating", ratings, dtype=pl.Float64)
    return RawInteractions(pl.DataFrame(cols), source=str(path), skipped=skipped,
                           notes=list(notes), header=header)


def _parse_rating(text) -> float:
    """One rating as a finite float; ``ValueError`` naming the value otherwise."""
    try:
        r = float(str(text).strip())
    except ValueError:
        r = math.nan
    if not math.isfinite(r):
        raise ValueError(f"rating value {text!r} is not a number")
    return r


def _ratings_vectorized(s: pl.Series) -> pl.Series | None:
    """Vectorized :func:`_parse_rating`; ``None`` if any value is missing or not a number."""
    out = s.cast(pl.Utf8).str.strip_chars().cast(pl.Float64, strict=False)
    if out.null_count() or not out.is_finite().all():
        return None
    return out.alias("rating")


def _blank_rows(df: pl.DataFrame) -> pl.Series:
    """Rows whose every field is empty or whitespace: what a blank line becomes in polars."""
    if df.width == 0:
        return pl.Series([], dtype=pl.Boolean)
    return df.select(
        pl.all_horizontal(
            [pl.col(c).cast(pl.Utf8).str.strip_chars().fill_null("") == "" for c in df.columns]
        )
    ).to_series()


def _polars_csv(body: bytes, *, sep: str, header: bool, quote: bool) -> pl.DataFrame | None:
    """Fast parse of delimited text into all-string columns; ``None`` on any failure."""
    try:
        return pl.read_csv(
            io.BytesIO(body),
            separator=sep,
            has_header=header,
            infer_schema=False,
            quote_char='"' if quote else None,
        )
    except Exception:  # noqa: BLE001 - any polars failure means "use the slow path"
        return None


# ----------------------------------------------------------------- user-per-line


def read_user_per_line(
    path, *, times_path=None, on_error: OnError = "raise"
) -> RawInteractions:
    """Read ``user item item ...`` lines (S3Rec/ICLRec format), one user per line.

    Tokens are whitespace separated and items are in the file's (chronological) order, so
    the time column is null unless ``times_path`` is given. ``times_path`` is the TiCoSeRec
    companion file with the same layout, ``user t1 t2 ...``, aligned token for token; its
    lines are matched to the item lines in order (blank lines ignored in both). A different
    user or a different length on a times line is a ``DataFormatError`` naming the times file
    and its line, as is a time value that is not an integer.

    Timestamps that *decrease* within a line are not an error: rows are returned in file
    order and a note records how many adjacent decreasing pairs there were, because the
    caller sorts each user stably by time and that sort is the documented fix.

    A line holding a user and no items ("empty user") raises under ``on_error="raise"``; under
    ``"skip"`` it is dropped and counted in ``skipped``. A user appearing on several lines
    simply gets all those rows, in file order.
    """
    problems = _Problems(path, on_error)
    text = _decode(path, _read_bytes(path))
    users: list[str] = []
    items: list[str] = []
    notes: list[str] = []

    if times_path is None:
        recs, blank = _records(text)
        for ln, toks in recs:
            if len(toks) == 1:
                problems.report(ln, f"user {toks[0]!r} has no items (empty user)")
                continue
            users.extend([toks[0]] * (len(toks) - 1))
            items.extend(toks[1:])
        notes += _blank_note(path, blank)
        return _result(path, users, items, None, skipped=problems.skipped,
                       notes=notes + problems.notes())

    times_text = _decode(times_path, _read_bytes(times_path))
    item_recs, item_blank = _records(text)
    time_recs, time_blank = _records(times_text)
    notes += _blank_note(path, item_blank) + _blank_note(times_path, time_blank)
    times: list[int] = []
    decreasing = bad_lines = 0
    for (iln, itoks), (tln, ttoks) in zip(item_recs, time_recs):
        if len(itoks) == 1:
            problems.report(iln, f"user {itoks[0]!r} has no items (empty user)")
            continue
        if ttoks[0] != itoks[0]:
            problems.report(
                tln,
                f"times line is for user {ttoks[0]!r} but line {iln} of {path} is for user "
                f"{itoks[0]!r} (files misaligned)",
                path=times_path,
            )
            continue
        if len(ttoks) != len(itoks):
            problems.report(
                tln,
                f"{len(ttoks) - 1} time value(s) for user {itoks[0]!r} but line {iln} of "
                f"{path} has {len(itoks) - 1} item(s)",
                path=times_path,
            )
            continue
        try:
            ts = [int(t) for t in ttoks[1:]]
            if any(not _INT64_MIN <= t <= _INT64_MAX for t in ts):
                raise ValueError
        except ValueError:
            try:
                ts = [_parse_time(t) for t in ttoks[1:]]
            except ValueError as e:
                problems.report(tln, str(e), path=times_path)
                continue
        down = sum(1 for a, b in zip(ts, ts[1:]) if b < a)
        if down:
            decreasing += down
            bad_lines += 1
        users.extend([itoks[0]] * len(ts))
        items.extend(itoks[1:])
        times.extend(ts)
    for iln, itoks in item_recs[len(time_recs):]:
        last = time_recs[-1][0] if time_recs else 0
        problems.report(
            last + 1,
            f"times file ended but line {iln} of {path} (user {itoks[0]!r}) has no times line",
            path=times_path,
        )
    for tln, ttoks in time_recs[len(item_recs):]:
        problems.report(
            tln, f"times line for user {ttoks[0]!r} has no matching line in {path}",
            path=times_path,
        )
    if decreasing:
        notes.append(
            f"{times_path}: {decreasing} decreasing adjacent timestamp pair(s) on "
            f"{bad_lines} line(s); rows kept in file order (sort stably by time)"
        )
    return _result(path, users, items, times, skipped=problems.skipped,
                   notes=notes + problems.notes())


def _records(text: str) -> tuple[list[tuple[int, list[str]]], int]:
    """Non-blank lines as ``(line_number, tokens)``, plus the number of blank lines."""
    recs, blank = [], 0
    for ln, line in _lines(text):
        toks = line.split()
        if toks:
            recs.append((ln, toks))
        else:
            blank += 1
    return recs, blank


# ------------------------------------------------------------------------- pairs


def read_pairs(path, *, on_error: OnError = "raise") -> RawInteractions:
    """Read SASRec-style ``user item`` lines (one interaction per line, in order).

    Fields are whitespace separated. A third column is read as an integer timestamp when
    the file has one; the first non-blank line decides whether it has 2 or 3 columns and
    every other line must have the same count (a line that differs is a malformed line).
    """
    problems = _Problems(path, on_error)
    data = _read_bytes(path)
    fast = _pairs_fast(data)
    if fast is not None:
        return _result(path, *fast[:3], notes=_blank_note(path, fast[3]))

    text = _decode(path, data)
    users, items, times = [], [], []
    width: int | None = None
    first_line = 0
    recs, blank = _records(text)
    for ln, toks in recs:
        if width is None:
            if len(toks) not in (2, 3):
                problems.report(ln, f"expected 2 fields (user item) or 3 (user item time), "
                                    f"got {len(toks)}")
                continue
            width, first_line = len(toks), ln
        elif len(toks) != width:
            problems.report(ln, f"expected {width} fields like line {first_line}, got {len(toks)}")
            continue
        if width == 3:
            try:
                t = _parse_time(toks[2])
            except ValueError as e:
                problems.report(ln, str(e))
                continue
            times.append(t)
        users.append(toks[0])
        items.append(toks[1])
    return _result(path, users, items, times if width == 3 else None,
                   skipped=problems.skipped, notes=_blank_note(path, blank) + problems.notes())


def _pairs_fast(data: bytes):
    """polars parse of a clean pairs file: ``(users, items, times|None, blank)`` or None."""
    first = data.split(b"\n", 1)[0]
    sep = "\t" if b"\t" in first else " "
    df = _polars_csv(data, sep=sep, header=False, quote=False)
    if df is None or df.width not in (2, 3):
        return None
    n_blank = 0
    if df.to_series(0).null_count():
        blank = _blank_rows(df)
        n_blank = int(blank.sum())
        df = df.filter(~blank)
    cols = [df.to_series(i).str.strip_chars() for i in range(df.width)]
    for c in cols:
        # An empty field or embedded whitespace means the line is not "a b [c]" with single
        # separators; let the slow path judge it.
        if c.null_count() or (c == "").any() or c.str.contains(r"\s").any():
            return None
    times = None
    if df.width == 3:
        times = _times_vectorized(cols[2], fractional="error", dates=False)
        if times is None:
            return None
    return cols[0], cols[1], times, n_blank


# ----------------------------------------------------------------- delimited tables


def _split_header(line: str, sep: str, quote: bool) -> list[str]:
    if len(sep) > 1:
        return [c.strip() for c in line.split(sep)]
    row = next(csv.reader([line], delimiter=sep, quoting=csv.QUOTE_MINIMAL if quote
                          else csv.QUOTE_NONE), [])
    return [c.strip() for c in row]


def _first_line(data: bytes) -> bytes:
    return data.split(b"\n", 1)[0].rstrip(b"\r")


def _read_delimited(
    path,
    data: bytes,
    *,
    sep: str,
    header: bool,
    columns: Mapping[str, str | int | None],
    quote: bool,
    on_error: str,
    fractional: str = "error",
    dates: bool = False,
    width: int | None = None,
    header_name: Callable[[str], str] = lambda c: c,
) -> RawInteractions:
    """Shared engine of the MovieLens, RecBole and generic CSV/TSV readers.

    ``columns`` maps ``user``/``item``/``time`` (and ``rating``, when ratings are wanted) to
    a header name (``header=True``) or a 0-based position. A row may not have more fields
    than the header (or ``width`` when there is no header); a shorter row is accepted only
    if every used column is present, since trailing unused fields are often left off.
    """
    problems = _Problems(path, on_error)
    names: list[str] = []
    header_line: list[str] | None = None
    if header:
        head = _first_line(data)
        if not head.strip():
            what = "the file is empty" if not data.strip() else "the first line is empty"
            raise DataFormatError(path, 1, f"expected a header line but {what}")
        header_line = _split_header(_decode(path, head), sep, quote)
        names = [header_name(c) for c in header_line]
        width = len(names)
        index = {}
        for role, col in columns.items():
            if col is None:
                continue
            if col not in names:
                raise DataFormatError(
                    path, 1,
                    f"no column {col!r} (mapped to {role!r}); available columns: {names}",
                )
            index[role] = names.index(col)
    else:
        index = {role: col for role, col in columns.items() if col is not None}
    has_time = "time" in index
    has_rating = "rating" in index

    # Fast path: polars on the whole file, accepted only if every row is clean.
    body = data
    fast_sep = sep
    if len(sep) > 1:
        fast_sep = _UNIT_SEP
        body = None if _UNIT_SEP.encode() in data else data.replace(sep.encode(), fast_sep.encode())
    df = None if body is None else _polars_csv(body, sep=fast_sep, header=header, quote=quote)
    if df is not None and (width is None or df.width == width):
        n_blank = 0
        if any(df.to_series(index[r]).null_count() for r in ("user", "item")):
            # Blank lines arrive as all-null rows; they are the only rows we may drop here.
            blank = _blank_rows(df)
            n_blank = int(blank.sum())
            df = df.filter(~blank)
        # Only the used columns must be filled in: unused ones may be empty, or missing
        # at the end of a short row (polars gives null for both), as in the slow path.
        user, item = (df.to_series(index[r]).str.strip_chars() for r in ("user", "item"))
        if all(c.null_count() == 0 and not (c == "").any() for c in (user, item)):
            times = ratings = None
            if has_time:
                times = _times_vectorized(df.to_series(index["time"]), fractional=fractional,
                                          dates=dates)
            if has_rating:
                ratings = _ratings_vectorized(df.to_series(index["rating"]))
            if (times is not None or not has_time) and (ratings is not None or not has_rating):
                return _result(path, user, item, times, ratings=ratings,
                               notes=_blank_note(path, n_blank), header=header_line)

    # Slow path: line by line; defines validity, names lines, implements "skip".
    text = _decode(path, data)
    users, items, times_l, ratings_l = [], [], [], []
    blank = 0
    for ln, fields in _delimited_rows(text, sep, quote, problems):
        if all(not f.strip() for f in fields):
            blank += 1
            continue
        if header and ln == 1:
            continue
        # Too many fields is always an error; too few only when a used column is missing.
        if (width is not None and len(fields) > width) or max(index.values()) >= len(fields):
            what = f"{width} fields as in {'the header' if header else 'this format'}" \
                if width is not None else f"at least {max(index.values()) + 1} fields"
            problems.report(ln, f"expected {what}, got {len(fields)}")
            continue
        user = fields[index["user"]].strip()
        item = fields[index["item"]].strip()
        if not user or not item:
            problems.report(ln, f"empty {'user' if not user else 'item'} field")
            continue
        try:
            t = _parse_time(fields[index["time"]], fractional=fractional,
                            dates=dates) if has_time else None
            r = _parse_rating(fields[index["rating"]]) if has_rating else None
        except ValueError as e:
            problems.report(ln, str(e))
            continue
        times_l.append(t)
        ratings_l.append(r)
        users.append(user)
        items.append(item)
    return _result(path, users, items, times_l if has_time else None,
                   ratings=ratings_l if has_rating else None, skipped=problems.skipped,
                   notes=_blank_note(path, blank) + problems.notes(), header=header_line)


def _delimited_rows(text: str, sep: str, quote: bool,
                    problems: _Problems) -> Iterator[tuple[int, list[str]]]:
    """``(first_line_of_record, fields)``; quoting errors are reported, not raised raw."""
    if len(sep) > 1:
        for ln, line in _lines(text):
            yield ln, line.rstrip("\r").split(sep)
        return
    reader = csv.reader(
        io.StringIO(text, newline=""),
        delimiter=sep,
        quoting=csv.QUOTE_MINIMAL if quote else csv.QUOTE_NONE,
        strict=quote,
    )
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            problems.report(start, f"malformed quoting ({e})")
            start = reader.line_num + 1
            continue
        yield start, row
        start = reader.line_num + 1


# --------------------------------------------------------------------- MovieLens


def read_movielens(path, *, on_error: OnError = "raise", rating: bool = False) -> RawInteractions:
    """Read a MovieLens ratings file; ratings themselves are dropped (implicit feedback)
    unless ``rating=True`` asks for them as a ``rating`` column.

    Supported layouts, chosen by file name and then by content:

    * ``ratings.dat`` (ML-1M, ML-10M): ``UserID::MovieID::Rating::Timestamp``;
    * ``ratings.csv`` (ML-20M, ML-25M, ml-latest): header ``userId,movieId,rating,timestamp``;
    * ``u.data`` (ML-100K): tab separated ``user item rating timestamp``, no header.
    """
    data = _read_bytes(path)
    name = _plain_name(path)
    head = _first_line(data)
    by_position = {"user": 0, "item": 1, "time": 3, **({"rating": 2} if rating else {})}
    if name.endswith(".dat") or b"::" in head:
        return _read_delimited(path, data, sep="::", header=False, quote=False, width=4,
                               columns=by_position, on_error=on_error)
    if name.endswith(".csv") or b"movieid" in head.lower():
        return _read_delimited(path, data, sep=",", header=True, quote=True,
                               columns={"user": "userid", "item": "movieid", "time": "timestamp",
                                        **({"rating": "rating"} if rating else {})},
                               header_name=str.lower, on_error=on_error)
    if name.endswith(".data") or head.count(b"\t") == 3 or not head.strip():
        return _read_delimited(path, data, sep="\t", header=False, quote=False, width=4,
                               columns=by_position, on_error=on_error)
    raise DataFormatError(
        path, 1,
        "not a MovieLens ratings file (expected 'UserID::MovieID::Rating::Timestamp', a "
        "'userId,movieId,rating,timestamp' header, or tab-separated u.data lines)",
    )


# ------------------------------------------------------------------------ RecBole


def read_recbole_inter(
    path,
    *,
    on_error: OnError = "raise",
    user_field: str = "user_id",
    item_field: str = "item_id",
    time_field: str = "timestamp",
    rating: bool = False,
    rating_field: str = "rating",
) -> RawInteractions:
    """Read a RecBole atomic ``.inter`` file (TSV with a ``name:type`` header).

    Columns are found by the name before the colon. Without a ``timestamp`` column the time
    column is null. With ``rating=True`` the ``rating_field`` column, when the file has one,
    becomes the ``rating`` column. RecBole declares timestamps as ``float``, so fractional
    seconds are floored to int64 seconds here. Rows are returned in file order, which for RecBole
    files is no particular order: the caller sorts by time. Fields are not quoted.
    """
    data = _read_bytes(path)
    head = _decode(path, _first_line(data))
    names = [c.split(":", 1)[0].strip() for c in head.split("\t")]
    if user_field not in names or item_field not in names:
        missing = user_field if user_field not in names else item_field
        raise DataFormatError(
            path, 1, f"no column {missing!r} in the .inter header; available columns: {names}"
        )
    columns = {"user": user_field, "item": item_field,
               "time": time_field if time_field in names else None,
               "rating": rating_field if rating and rating_field in names else None}
    return _read_delimited(path, data, sep="\t", header=True, quote=False, columns=columns,
                           fractional="floor", header_name=lambda c: c.split(":", 1)[0].strip(),
                           on_error=on_error)


# ------------------------------------------------------------------ generic tables

_PARQUET = (".parquet", ".pq")
_JSONL = (".json", ".jsonl", ".ndjson")


def _check_mapping(columns: Mapping[str, str]) -> dict[str, str]:
    extra = set(columns) - {"user", "item", "time", "rating"}
    if extra:
        raise ValueError(f"column mapping keys must be 'user', 'item' and optionally 'time' "
                         f"and 'rating'; got unexpected {sorted(extra)}")
    for role in ("user", "item"):
        if not columns.get(role):
            raise ValueError(f"column mapping needs a {role!r} entry")
    return {k: v for k, v in columns.items() if v is not None}


# Column names a table's header is matched against when no mapping is given, in order of
# preference, compared after lower-casing and removing "_", "-" and spaces (so "userId",
# "user_id" and "User ID" are all "userid"). They are the spellings of MovieLens, RecBole,
# Amazon (2014 and 2023), Yelp, Steam, Last.fm and the usual hand-made logs.
_COLUMN_GUESSES = {
    "user": ("user", "userid", "uid", "username", "reviewerid", "customerid", "visitorid",
             "memberid", "sessionid"),
    "item": ("item", "itemid", "iid", "movieid", "productid", "parentasin", "asin",
             "businessid", "trackid", "songid", "bookid", "isbn", "articleid", "videoid",
             "gameid", "appid", "poiid", "venueid", "movie", "product", "track", "song"),
    "time": ("timestamp", "time", "ts", "datetime", "date", "unixreviewtime", "unixtime",
             "eventtime", "createdat", "epoch"),
    "rating": ("rating", "ratings", "overall", "stars", "score"),
}


def _norm_column(name: str) -> str:
    return "".join(c for c in name.lower() if c not in "_- ")


def _guess_mapping(names: Sequence[str], rating: bool = False) -> tuple[dict[str, str], list[str]]:
    """``(mapping, roles it could not find)`` for a header; ``user``/``item`` are required.

    Each role takes the header column matching its most preferred spelling. Two columns
    that normalize to that same spelling (``user_id`` and ``userId``) are ambiguous: the
    role is reported as not found rather than picked at random.
    """
    by_norm: dict[str, list[str]] = {}
    for n in names:
        by_norm.setdefault(_norm_column(n), []).append(n)
    mapping: dict[str, str] = {}
    missing: list[str] = []
    roles = ("user", "item", "time", "rating") if rating else ("user", "item", "time")
    for role in roles:
        hits = [by_norm[c] for c in _COLUMN_GUESSES[role] if c in by_norm]
        if hits and len(hits[0]) == 1:
            mapping[role] = hits[0][0]
        elif role in ("user", "item"):
            missing.append(role)
    return mapping, missing


def _mapping_text(mapping: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in mapping.items())


def _table_header(path, sep: str | None = None) -> tuple[list[str], int | None]:
    """Column names of a table file and the line they are on (None for Parquet)."""
    name = _plain_name(path)
    if name.endswith(_PARQUET):
        try:
            return list(pl.read_parquet_schema(path)), None
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - polars/arrow raise many types for bad files
            raise DataFormatError(path, None, f"not a readable Parquet file ({e})") from None
    if name.endswith(_JSONL):
        for ln, line in enumerate(_sample_lines(path, limit=1), 1):
            rec = _json_record(line)
            if rec is None:
                raise DataFormatError(path, ln, "not a JSON object")
            return list(rec), ln
        raise DataFormatError(path, None, "the file is empty (no JSON records)")
    data = _read_bytes(path)
    head = _first_line(data)
    if not head.strip():
        what = "the file is empty" if not data.strip() else "the first line is empty"
        raise DataFormatError(path, 1, f"expected a header line but {what}")
    sep = sep or _table_sep(name, head)
    return _split_header(_decode(path, head), sep, sep == ","), 1


def _table_sep(name: str, head: bytes) -> str:
    """Tab for ``.tsv``/``.tab``, comma for ``.csv``, else tab if the header has one."""
    if name.endswith((".tsv", ".tab")) or (not name.endswith(".csv") and b"\t" in head):
        return "\t"
    return ","


def guess_table_columns(path, *, rating: bool = False, sep: str | None = None) -> dict[str, str]:
    """The column mapping :func:`read_table` uses when given none, guessed from the header.

    Header names are matched case-insensitively, ignoring ``_``/``-``/spaces, against the
    usual spellings (``user``/``userId``/``user_id``/``reviewerID``..., ``item``/``itemId``/
    ``movieId``/``product_id``/``asin``..., ``timestamp``/``time``/``date``...; with
    ``rating=True`` also ``rating``/``overall``/``stars``...). Without a user or an item
    column this raises a one-line ``DataFormatError`` that lists the header and says how to
    give the mapping.
    """
    names, line = _table_header(path, sep)
    mapping, missing = _guess_mapping(names, rating=rating)
    if missing:
        raise DataFormatError(
            path, line,
            f"cannot tell which column holds the {' and the '.join(missing)} (header: "
            f"{names}); give the column mapping: --columns user=COL,item=COL[,time=COL] "
            "(Python: columns={'user': COL, 'item': COL}), or the right --format if it is not a table",
        )
    return mapping


def read_table(
    path, columns: Mapping[str, str] | None = None, *, sep: str | None = None,
    on_error: OnError = "raise", rating: bool = False,
) -> RawInteractions:
    """Read a CSV, TSV, Parquet or JSON-lines table, with a column mapping or a guessed one.

    ``columns`` is ``{"user": <col>, "item": <col>, "time": <col>, "rating": <col>}``
    (``time`` and ``rating`` optional); ``None`` guesses it from the header with
    :func:`guess_table_columns` (a note says what was guessed). ``rating=True`` only matters
    for a guessed mapping: it also looks for a rating column. A column missing from the
    file is a ``DataFormatError`` listing the available columns.
    Text tables need a header line. ``sep`` defaults to tab for ``.tsv``/``.tab``, comma for
    ``.csv`` and otherwise to whichever of tab or comma the header contains; double-quoted
    fields are understood for comma-separated files only (TSVs often contain stray quotes).
    Time values may be integers, integral numbers or ISO-8601 dates (naive means UTC);
    Parquet datetime/date columns are converted to epoch seconds. Parquet has no lines, so
    its errors name the 1-based row instead. ``.json``/``.jsonl`` files are handed to
    :func:`read_amazon_json` with the mapping as its ``fields``.
    """
    guessed = columns is None
    mapping = guess_table_columns(path, rating=rating, sep=sep) if guessed else _check_mapping(columns)
    name = _plain_name(path)
    if name.endswith(_PARQUET):
        raw = _read_parquet(path, mapping, on_error)
    elif name.endswith(_JSONL):
        raw = read_amazon_json(path, fields=mapping, on_error=on_error)
    else:
        data = _read_bytes(path)
        if sep is None:
            sep = _table_sep(name, _first_line(data))
        raw = _read_delimited(path, data, sep=sep, header=True, quote=sep == ",",
                              columns=mapping, dates=True, on_error=on_error)
    if guessed:
        raw.notes.append(f"{path}: guessed the columns {_mapping_text(mapping)} from the "
                         "header (--columns overrides)")
    return raw


def _read_parquet(path, mapping: dict[str, str], on_error: str) -> RawInteractions:
    problems = _Problems(path, on_error)
    try:
        available = list(pl.read_parquet_schema(path))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - polars/arrow raise many types for bad files
        raise DataFormatError(path, None, f"not a readable Parquet file ({e})") from None
    for role, col in mapping.items():
        if col not in available:
            raise DataFormatError(
                path, None, f"no column {col!r} (mapped to {role!r}); available columns: "
                            f"{available}"
            )
    try:
        df = pl.read_parquet(path, columns=list(dict.fromkeys(mapping.values())))
    except Exception as e:  # noqa: BLE001
        raise DataFormatError(path, None, f"not a readable Parquet file ({e})") from None

    user = df[mapping["user"]].cast(pl.Utf8).str.strip_chars()
    item = df[mapping["item"]].cast(pl.Utf8).str.strip_chars()
    bad = user.is_null() | (user == "") | item.is_null() | (item == "")
    rating = None
    if "rating" in mapping:
        rating = df[mapping["rating"]].cast(pl.Utf8).str.strip_chars().cast(pl.Float64, strict=False)
        bad = bad | ~rating.is_finite().fill_null(False)
    time = None
    if "time" in mapping:
        col = df[mapping["time"]]
        if col.dtype == pl.Date:
            col = col.cast(pl.Datetime("ms"))
        if isinstance(col.dtype, pl.Datetime):
            time = col.dt.epoch("s")
            bad = bad | time.is_null()
        elif col.dtype.is_integer():
            time = col.cast(pl.Int64, strict=False)
            bad = bad | time.is_null()
        else:
            as_text = col.cast(pl.Utf8)
            time = _times_vectorized(as_text, fractional="error", dates=True)
            if time is None:
                # Locate the invalid rows by parsing each distinct value once.
                keys = as_text.unique().to_list()
                parsed = {}
                for k in keys:
                    try:
                        parsed[k] = None if k is None else _parse_time(k, dates=True)
                    except ValueError:
                        parsed[k] = None
                ks = [k for k in keys if k is not None]
                time = as_text.replace_strict(ks, [parsed[k] for k in ks], default=None,
                                              return_dtype=pl.Int64)
                bad = bad | time.is_null()
    if bad.any():
        rows = bad.arg_true().to_list()
        for r in rows:
            if user[r] in (None, "") or item[r] in (None, ""):
                why = "empty user or item"
            elif rating is not None and not (rating[r] is not None and math.isfinite(rating[r])):
                why = f"rating value {df[mapping['rating']][r]!r} is not a number"
            else:
                why = f"invalid time value {df[mapping['time']][r]!r}"
            problems.report(None, f"row {r + 1}: {why}")
        keep = ~bad
        user, item = user.filter(keep), item.filter(keep)
        time = None if time is None else time.filter(keep)
        rating = None if rating is None else rating.filter(keep)
    return _result(path, user, item, time, ratings=rating, skipped=problems.skipped,
                   notes=problems.notes())


# ------------------------------------------------------------------ JSON lines

# (user key, item key, time key, rating key, divisor to seconds), tried in order on the
# first record.
_AMAZON_SCHEMAS = (
    ("reviewerID", "asin", "unixReviewTime", "overall", 1),  # 2014, 2018 dumps (seconds)
    ("user_id", "parent_asin", "timestamp", "rating", 1000),  # Reviews 2023 (milliseconds)
    ("user_id", "asin", "timestamp", "rating", 1000),
)


def read_amazon_json(
    path,
    *,
    on_error: OnError = "raise",
    fields: Mapping[str, str] | None = None,
    time_unit: Literal["s", "ms"] = "s",
    rating: bool = False,
) -> RawInteractions:
    """Read Amazon review JSON lines (optionally ``.gz``), or any JSON-lines interaction log.

    The schema is recognised from the first record: ``reviewerID``/``asin``/
    ``unixReviewTime`` (2014 and 2018 dumps, seconds) or ``user_id``/``parent_asin``/
    ``timestamp`` (the 2023 release, milliseconds, converted to seconds by flooring).
    ``fields={"user": ..., "item": ..., "time": ...}`` overrides the detection for other
    logs (Yelp ``user_id``/``business_id``/``date``, Steam ``username``/``product_id``/
    ``date``), with ``time_unit`` giving the unit of numeric times. String times may be
    ISO-8601 dates. Some dumps (Steam, old Amazon metadata) are Python literals rather than
    JSON; such lines are read with ``ast.literal_eval``, which evaluates no code.

    ``rating=True`` adds the ``rating`` column from ``overall`` (2014/2018) or ``rating``
    (2023) when the first record has it; with ``fields`` the mapping's ``rating`` entry is
    used whatever ``rating`` says.
    """
    problems = _Problems(path, on_error)
    data = _read_bytes(path)
    if fields is not None:
        mapping = _check_mapping(fields)
        keys = (mapping["user"], mapping["item"], mapping.get("time"), mapping.get("rating"))
        div = 1000 if time_unit == "ms" else 1
    else:
        keys, div = _detect_json_schema(path, data, rating)

    fast = _json_fast(data, keys, div)
    if fast is not None:
        users, items, times, ratings, blank = fast
        return _result(path, users, items, times, ratings=ratings,
                       notes=_blank_note(path, blank))

    text = _decode(path, data)
    users, items, times, ratings = [], [], [], []
    blank = 0
    for ln, line in _lines(text):
        if not line.strip():
            blank += 1
            continue
        rec = _json_record(line)
        if rec is None:
            problems.report(ln, "not a JSON object")
            continue
        try:
            user = _json_id(rec, keys[0])
            item = _json_id(rec, keys[1])
            t = _json_time(rec, keys[2], div) if keys[2] is not None else None
            r = _json_rating(rec, keys[3]) if keys[3] is not None else None
        except ValueError as e:
            problems.report(ln, str(e))
            continue
        users.append(user)
        items.append(item)
        times.append(t)
        ratings.append(r)
    return _result(path, users, items, times if keys[2] is not None else None,
                   ratings=ratings if keys[3] is not None else None,
                   skipped=problems.skipped, notes=_blank_note(path, blank) + problems.notes())


def _json_record(line: str) -> dict | None:
    try:
        rec = json.loads(line)
    except ValueError:
        try:
            rec = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            return None
    return rec if isinstance(rec, dict) else None


def _detect_json_schema(path, data: bytes, rating: bool = False):
    text_head = data[: 1 << 20].decode("utf-8", errors="replace")
    for ln, line in _lines(text_head):
        if not line.strip():
            continue
        rec = _json_record(line)
        if rec is None:
            raise DataFormatError(path, ln, "not a JSON object")
        for user_key, item_key, time_key, rating_key, div in _AMAZON_SCHEMAS:
            if user_key in rec and item_key in rec:
                return (user_key, item_key, time_key if time_key in rec else None,
                        rating_key if rating and rating_key in rec else None), div
        raise DataFormatError(
            path, ln,
            f"unrecognised review schema (keys {sorted(rec)}); expected reviewerID/asin/"
            "unixReviewTime or user_id/parent_asin/timestamp, or name the keys with "
            "--format table --columns user=KEY,item=KEY[,time=KEY] (Python: fields={...})",
        )
    return ("reviewerID", "asin", None, None), 1  # empty file: no rows either way


def _json_id(rec: dict, key: str) -> str:
    if key not in rec:
        raise ValueError(f"missing field {key!r}")
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise ValueError(f"field {key!r} is not a string or integer id: {v!r}")
    s = str(v).strip()
    if not s:
        raise ValueError(f"field {key!r} is empty")
    return s


def _json_rating(rec: dict, key: str) -> float:
    if key not in rec:
        raise ValueError(f"missing field {key!r}")
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise ValueError(f"rating value {v!r} in field {key!r} is not a number")
    return _parse_rating(v)


def _json_time(rec: dict, key: str, div: int) -> int:
    if key not in rec:
        raise ValueError(f"missing field {key!r}")
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise ValueError(f"time value {v!r} in field {key!r} is not a number or date")
    if isinstance(v, str):
        t = _parse_time(v, dates=True)
        # An ISO date is already in seconds; only numbers carry the file's unit.
        try:
            float(v)
        except ValueError:
            return t
    else:
        t = _parse_time(repr(v) if isinstance(v, float) else str(v))
    return t // div


# polars renders objects, arrays, booleans and floats as text when asked for a string; the
# slow path rejects those as ids, so a value that may have been one sends us there.
_NOT_AN_ID = r"^[\[{]|^(?:true|false)$|^-?[0-9]*\.[0-9]*(?:[eE][-+]?[0-9]+)?$|^-?[0-9]+[eE]"


def _json_fast(data: bytes, keys, div: int):
    """polars NDJSON parse with only the needed keys, as strings; ``None`` if not clean."""
    user_key, item_key, time_key, rating_key = keys
    schema = {user_key: pl.Utf8, item_key: pl.Utf8}
    if time_key is not None:
        schema[time_key] = pl.Utf8
    if rating_key is not None:
        schema[rating_key] = pl.Utf8
    try:
        df = pl.read_ndjson(io.BytesIO(data), schema=schema)
    except Exception:  # noqa: BLE001 - Python literals, bad lines: slow path decides
        return None
    user = df[user_key].str.strip_chars()
    item = df[item_key].str.strip_chars()
    for c in (user, item):
        if c.null_count() or (c == "").any() or c.str.contains(_NOT_AN_ID).any():
            return None
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    blank = sum(1 for line in parts if not line.strip())
    if len(parts) - blank != df.height:
        return None
    times = None
    if time_key is not None:
        raw = df[time_key].str.strip_chars()
        numeric = raw.cast(pl.Float64, strict=False)
        if numeric.null_count():
            return None  # dates and mixed values: the slow path handles them per record
        times = _times_vectorized(raw, fractional="error", dates=False)
        if times is None:
            return None
        if div != 1:
            times = times // div
    ratings = None
    if rating_key is not None:
        raw = df[rating_key]
        # booleans would read as "true"/"false" and fail the cast; the slow path names them
        ratings = _ratings_vectorized(raw)
        if ratings is None:
            return None
    return user, item, times, ratings, blank


# ------------------------------------------------------------------- dispatch

READERS: dict[str, Callable[..., RawInteractions]] = {
    "user-per-line": read_user_per_line,
    "pairs": read_pairs,
    "movielens": read_movielens,
    "recbole": read_recbole_inter,
    "table": read_table,
    "amazon-json": read_amazon_json,
}


def sniff_format(path, **kw) -> str:
    """Guess the reader name for ``path`` from its name, then its first lines.

    Keyword arguments meant for a reader are hints: ``times_path`` means user-per-line and
    ``columns`` means a generic table. A ``.csv``/``.tsv``/Parquet file is MovieLens when its
    header is, else a generic table (whose columns ``read_table`` guesses from the header),
    and so is any text file whose first line is a header naming a user and an item column.
    Other plain text is user-per-line unless every sampled line has 2 or 3 fields and some
    user occurs on more than one line, which is the pairs layout.
    """
    if "times_path" in kw:
        return "user-per-line"
    name = _plain_name(path)
    if "columns" in kw:
        return "table"
    if name.endswith(".inter"):
        return "recbole"
    if name.endswith(_JSONL):
        return "amazon-json"
    if name.endswith((".dat", ".data")):
        return "movielens"
    if name.endswith(_PARQUET):
        return "table"
    head = _sample_lines(path)
    first = head[0] if head else ""
    if name.endswith((".csv", ".tsv")):
        low = first.lower()
        if "userid" in low and "movieid" in low:
            return "movielens"
        return "table"
    if ":token" in first or ":float" in first:
        return "recbole"
    if "::" in first:
        return "movielens"
    if first.count("\t") == 3 and all(f.strip().isdigit() for f in first.split("\t")):
        return "movielens"
    for sep in ("\t", ","):
        if sep in first and not _guess_mapping(_split_header(first, sep, sep == ","))[1]:
            return "table"  # a header line such as "user_id<TAB>item_id<TAB>timestamp"
    toks = [line.split() for line in head]
    lengths = {len(t) for t in toks}
    firsts = [t[0] for t in toks]
    if lengths in ({2}, {3}) and len(set(firsts)) < len(firsts):
        return "pairs"
    return "user-per-line"


def _sample_lines(path, limit: int = 200) -> list[str]:
    """Up to ``limit`` non-blank lines from the start of the file, for sniffing."""
    p = Path(path)
    opener = gzip.open if p.name.lower().endswith(".gz") else open
    out: list[str] = []
    try:
        with opener(p, "rt", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    out.append(line.lstrip("\ufeff").rstrip("\r\n"))
                    if len(out) >= limit:
                        break
    except (OSError, EOFError) as e:
        if not p.is_file():
            raise FileNotFoundError(f"no such data file: {p}") from None
        raise DataFormatError(p, None, f"cannot read file ({e})") from None
    return out


# Readers that can return a rating column (``rating=True``); the others have no ratings.
RATED_FORMATS = ("movielens", "recbole", "table", "amazon-json")


def read_any(path, fmt: str | None = None, *, rating: bool = False, **kw) -> RawInteractions:
    """Read ``path`` with the reader named ``fmt`` (see ``READERS``), or a sniffed one.

    ``rating=True`` means the caller needs ratings (``min_rating``): a format without them,
    or a file of a rated format that has no rating column, is a ``ValueError`` saying so.
    """
    if fmt is None:
        fmt = sniff_format(path, **kw)
    if fmt not in READERS:
        raise ValueError(f"unknown data format {fmt!r}; valid formats: {sorted(READERS)}")
    if fmt == "table" and "columns" in kw and not kw["columns"]:
        kw.pop("columns")  # an empty mapping means "guess", as no mapping does
    if not rating:
        return READERS[fmt](path, **kw)
    if fmt not in RATED_FORMATS:
        raise ValueError(f"{path}: a minimum rating (data.min_rating, --min-rating) needs "
                         f"ratings, and the {fmt!r} format has none; formats with ratings: "
                         f"{', '.join(RATED_FORMATS)}")
    if fmt == "amazon-json" and kw.get("fields"):
        raw = READERS[fmt](path, **kw)
    else:
        raw = READERS[fmt](path, rating=True, **kw)
    if not raw.has_rating:
        hint = (": map one with --columns ...,rating=COL" if fmt == "table"
                else " (RecBole: a 'rating' field)" if fmt == "recbole" else "")
        raise ValueError(f"{path}: a minimum rating (data.min_rating, --min-rating) needs a "
                         f"rating column, and this {fmt} file has none{hint}")
    return raw


__all__: Sequence[str] = [
    "RATED_FORMATS",
    "READERS",
    "guess_table_columns",
    "read_any",
    "read_amazon_json",
    "read_movielens",
    "read_pairs",
    "read_recbole_inter",
    "read_table",
    "read_user_per_line",
    "sniff_format",
]
