"""The one in-memory form every reader returns: raw interactions in file order."""
from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

RAW_SCHEMA = {"user": pl.Utf8, "item": pl.Utf8, "time": pl.Int64}


@dataclass
class RawInteractions:
    """Interactions as read from a file.

    ``frame`` has the columns ``user`` (str), ``item`` (str) and ``time`` (Int64, all null
    when the format has no timestamps), one row per interaction, in file order, plus a
    Float64 ``rating`` column only when the reader was asked for ratings (``rating=True``;
    ``prepare(min_rating=...)`` filters on it). Raw ids stay strings so that predictions can
    be written back with the ids the user knows. ``skipped`` counts lines that were dropped
    under ``on_error="skip"`` (documented skips). ``header`` is the file's header line split
    into column names, for formats that have one, so that an empty result can say "a header
    but no data rows" instead of "empty file".
    """

    frame: pl.DataFrame
    source: str
    skipped: int = 0
    notes: list[str] = field(default_factory=list)
    header: list[str] | None = None

    def __post_init__(self):
        missing = set(RAW_SCHEMA) - set(self.frame.columns)
        if missing:
            raise ValueError(f"RawInteractions frame lacks columns {sorted(missing)}")
        cols = [pl.col(c).cast(t) for c, t in RAW_SCHEMA.items()]
        if "rating" in self.frame.columns:
            cols.append(pl.col("rating").cast(pl.Float64))
        self.frame = self.frame.select(cols)

    @property
    def has_time(self) -> bool:
        return self.frame["time"].null_count() < self.frame.height

    @property
    def has_rating(self) -> bool:
        return "rating" in self.frame.columns
