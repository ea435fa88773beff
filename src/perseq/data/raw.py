"""The one in-memory form every reader returns: raw interactions in file order."""
from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

RAW_SCHEMA = {"user": pl.Utf8, "item": pl.Utf8, "time": pl.Int64}


@dataclass
class RawInteractions:
    """Interactions as read from a file.

    ``frame`` has exactly the columns ``user`` (str), ``item`` (str) and ``time`` (Int64,
    all null when the format has no timestamps), one row per interaction, in file order.
    Raw ids stay strings so that predictions can be written back with the ids the user knows.
    ``skipped`` counts lines that were dropped under ``on_error="skip"`` (documented skips).
    """

    frame: pl.DataFrame
    source: str
    skipped: int = 0
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        missing = set(RAW_SCHEMA) - set(self.frame.columns)
        if missing:
            raise ValueError(f"RawInteractions frame lacks columns {sorted(missing)}")
        self.frame = self.frame.select(
            [pl.col(c).cast(t) for c, t in RAW_SCHEMA.items()]
        )

    @property
    def has_time(self) -> bool:
        return self.frame["time"].null_count() < self.frame.height
