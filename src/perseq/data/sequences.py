"""Jagged columnar storage of user sequences, preparation (k-core, vocabularies, time order)
and the splits.

Storage (DESIGN.md §3): ``offsets[int64, U+1]``, ``items[int32, N]`` (1-based; 0 = padding),
``times[int64, N]`` or None, plus the raw-id vocabularies. User u's sequence is
``items[offsets[u]:offsets[u+1]]`` in time order. Nothing in the hot path is a per-user list.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from .raw import RawInteractions

PAD = "[PAD]"


@dataclass(frozen=True)
class SequenceData:
    offsets: np.ndarray  # int64 [U+1]
    items: np.ndarray  # int32 [N], values in 1..n_items
    times: np.ndarray | None  # int64 [N] or None
    user_ids: np.ndarray  # raw user ids, str [U]
    item_ids: np.ndarray  # raw item ids, str [n_items + 1]; index 0 is PAD
    name: str = "data"

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def n_interactions(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def seq(self, u: int) -> np.ndarray:
        return self.items[self.offsets[u] : self.offsets[u + 1]]

    def stats(self) -> dict:
        lens = self.lengths
        out = {
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.n_interactions,
            "avg_len": round(float(lens.mean()), 2) if len(lens) else 0.0,
            "median_len": float(np.median(lens)) if len(lens) else 0.0,
            "min_len": int(lens.min()) if len(lens) else 0,
            "max_len": int(lens.max()) if len(lens) else 0,
            "density": round(self.n_interactions / max(1, self.n_users * self.n_items), 6),
            "timestamps": self.times is not None,
        }
        return out

    # -- persistence: numpy arrays + parquet vocabularies; loads without pickle --------
    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        arrays = {"offsets": self.offsets, "items": self.items}
        if self.times is not None:
            arrays["times"] = self.times
        np.savez(d / "sequences.npz", **arrays)
        pl.DataFrame({"user_id": self.user_ids.astype(str)}).write_parquet(d / "users.parquet")
        pl.DataFrame({"item_id": self.item_ids.astype(str)}).write_parquet(d / "items.parquet")
        (d / "meta.json").write_text(json.dumps({"name": self.name, **self.stats()}, indent=1))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "SequenceData":
        d = Path(directory)
        z = np.load(d / "sequences.npz", allow_pickle=False)
        meta = json.loads((d / "meta.json").read_text())
        return cls(
            offsets=z["offsets"],
            items=z["items"],
            times=z["times"] if "times" in z.files else None,
            user_ids=pl.read_parquet(d / "users.parquet")["user_id"].to_numpy().astype(object),
            item_ids=pl.read_parquet(d / "items.parquet")["item_id"].to_numpy().astype(object),
            name=meta.get("name", d.name),
        )


def kcore(frame: pl.DataFrame, min_user: int, min_item: int, max_rounds: int = 100) -> pl.DataFrame:
    """Iteratively drop users with < min_user and items with < min_item interactions until
    both hold (removing items can push users below the threshold and vice versa)."""
    for _ in range(max_rounds):
        n = frame.height
        if min_item > 1:
            frame = frame.filter(pl.len().over("item") >= min_item)
        if min_user > 1:
            frame = frame.filter(pl.len().over("user") >= min_user)
        if frame.height == n:
            return frame
    return frame


def _no_rows_message(raw: RawInteractions | pl.DataFrame) -> str:
    """Why there is nothing to prepare before any filter ran: empty file, a header alone,
    or every line malformed and skipped."""
    if not isinstance(raw, RawInteractions):
        return "no interactions to prepare: the table is empty"
    if raw.skipped:
        return (f"{raw.source}: no interactions to prepare: all {raw.skipped} data line(s) were "
                "malformed and skipped (data.on_error=skip)")
    if raw.header is not None:
        return f"{raw.source} has a header line ({', '.join(raw.header)}) but no data rows"
    return f"{raw.source} has no data rows (the file is empty or blank)"


def count_duplicates(frame: pl.DataFrame) -> tuple[int, int]:
    """``(repeats, exact)``: events whose (user, item) pair occurred earlier for that user,
    and of those the ones whose timestamp is the same too (0 without timestamps, where
    "the same time" cannot be told). ``dedup`` drops exactly the ``repeats``."""
    repeats = frame.height - frame.select(["user", "item"]).n_unique()
    has_time = frame.height and frame["time"].null_count() < frame.height
    exact = frame.height - frame.select(["user", "item", "time"]).n_unique() if has_time else 0
    return repeats, exact


def prepare(
    raw: RawInteractions | pl.DataFrame,
    *,
    name: str = "data",
    min_user: int = 0,
    min_item: int = 0,
    dedup: bool = False,
    min_rating: float | None = None,
    log=None,
) -> SequenceData:
    """Raw interactions -> time-ordered jagged sequences with contiguous ids.

    Order: by timestamp when the data has them, stably, so ties keep file order (our
    ML-1M copy has no timestamp values, and for day-granular Amazon data the file order is
    the best tie-break there is); otherwise file order. Users are numbered in order of first
    appearance, items likewise from 1 (0 is padding).

    Filters, in this order: ``min_rating`` keeps events rated at least that (needs the
    ``rating`` column: read with ``rating=True``); ``dedup`` keeps only the earliest event
    of each (user, item) pair (RecBole's ``rm_dup_inter: first``); then the k-core
    (``min_user``, ``min_item``). A *duplicate* is an event whose user and item already
    occurred in an earlier event of that user, whatever the time. Without ``dedup`` they are
    kept, and their count (with how many also repeat the timestamp) is passed to ``log``.
    ``log`` (a ``print``-like callable, or None for silence) also gets how many events
    ``dedup`` dropped. Nothing left, with or without filters, is a ``ValueError`` that says
    which step emptied the data.
    """
    source = raw.source if isinstance(raw, RawInteractions) else "the data"
    frame = raw.frame if isinstance(raw, RawInteractions) else raw
    if frame.height == 0:
        raise ValueError(_no_rows_message(raw))
    frame = frame.with_row_index("_row")
    has_time = frame["time"].null_count() < frame.height
    if has_time and frame["time"].null_count():
        raise ValueError(f"{frame['time'].null_count()} interactions lack a timestamp while others have one")
    steps = [f"{source} has {frame.height} events"]  # what each filter left, for the empty case
    if min_rating is not None:
        if "rating" not in frame.columns:
            raise ValueError(f"min_rating={min_rating} needs ratings, and {source} was read without a rating column")
        frame = frame.filter(pl.col("rating") >= min_rating)
        steps.append(f"min_rating={min_rating:g} kept {frame.height}")
    repeats, exact = count_duplicates(frame)
    if dedup:
        # keep each pair's earliest event in time order (file order breaks ties), then put
        # the rows back in file order, which numbers users and items by first appearance
        order = ["time", "_row"] if has_time else ["_row"]
        frame = frame.sort(order).unique(subset=["user", "item"], keep="first", maintain_order=True).sort("_row")
        steps.append(f"dedup kept {frame.height}")
        if log and repeats:
            log(f"note: dedup dropped {repeats} duplicate event(s) (a user-item pair seen earlier for that user; "
                "the earliest of each pair kept)")
    elif log and repeats:
        same = f", {exact} of them also at the same timestamp" if has_time else ""
        log(f"note: {repeats} duplicate event(s) kept (a user-item pair seen earlier for that user{same}); "
            "data.dedup=true / --dedup keeps only each pair's earliest event")
    if min_user > 1 or min_item > 1:
        frame = kcore(frame, min_user, min_item)
        steps.append(f"k-core (min_user={min_user}, min_item={min_item}) kept {frame.height}")
    if frame.height == 0:
        raise ValueError(f"no interactions left after filtering: {'; '.join(steps)}; relax those settings")
    user_vocab = frame["user"].unique(maintain_order=True)
    item_vocab = frame["item"].unique(maintain_order=True)
    frame = frame.with_columns(
        pl.col("user").replace_strict(user_vocab, pl.int_range(len(user_vocab), eager=True), return_dtype=pl.Int64).alias("u"),
        pl.col("item").replace_strict(item_vocab, pl.int_range(1, len(item_vocab) + 1, eager=True), return_dtype=pl.Int32).alias("i"),
    )
    sort_cols = ["u", "time", "_row"] if has_time else ["u", "_row"]
    frame = frame.sort(sort_cols)
    u = frame["u"].to_numpy()
    counts = np.bincount(u, minlength=len(user_vocab))
    offsets = np.zeros(len(user_vocab) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return SequenceData(
        offsets=offsets,
        items=frame["i"].to_numpy().astype(np.int32),
        times=frame["time"].to_numpy().astype(np.int64) if has_time else None,
        user_ids=user_vocab.to_numpy().astype(object),
        item_ids=np.concatenate([[PAD], item_vocab.to_numpy().astype(object)]),
        name=name,
    )


# --------------------------------------------------------------------------- splits
@dataclass(frozen=True)
class Split:
    """Where each user's sequence is cut.

    ``train_len[u]``: the first train_len[u] events are training data (every one of them
    after the first is a next-item target). ``valid_pos[u]`` / ``test_pos[u]``: index of the
    evaluated target in u's sequence, -1 if u is not evaluated; the model input for that
    target is everything before it (so the leave-one-out test input includes the
    validation item, DESIGN.md §3).
    """

    data: SequenceData
    train_len: np.ndarray  # int64 [U]
    valid_pos: np.ndarray  # int64 [U]
    test_pos: np.ndarray  # int64 [U]
    kind: str

    def eval_users(self, stage: str) -> np.ndarray:
        pos = self.valid_pos if stage == "valid" else self.test_pos
        if stage not in ("valid", "test"):
            raise ValueError(f"stage must be 'valid' or 'test', got {stage!r}")
        return np.flatnonzero(pos >= 0)

    def positions(self, stage: str) -> np.ndarray:
        return self.valid_pos if stage == "valid" else self.test_pos


def leave_one_out(data: SequenceData) -> Split:
    """valid = second-to-last event, test = last; users with < 3 events only train."""
    lens = data.lengths
    ok = lens >= 3
    return Split(
        data=data,
        train_len=np.where(ok, lens - 2, lens),
        valid_pos=np.where(ok, lens - 2, -1),
        test_pos=np.where(ok, lens - 1, -1),
        kind="leave_one_out",
    )


def temporal_split(data: SequenceData, valid_frac: float = 0.1, test_frac: float = 0.1) -> Split:
    """Global temporal split: two time cut-offs at the (1 - valid - test) and (1 - test)
    quantiles of all timestamps. Training = events before the first cut-off. For every user
    with an event after a cut-off, the first such event is the target and everything before
    it is the input, so no event after a cut-off ever reaches training."""
    if data.times is None:
        raise ValueError(f"temporal split needs timestamps; dataset {data.name!r} has none (use leave_one_out)")
    t_valid, t_test = np.quantile(data.times, [1 - valid_frac - test_frac, 1 - test_frac])
    starts = data.offsets[:-1]
    # per user: number of events strictly before each cut-off (times are sorted per user)
    user_of = np.repeat(np.arange(data.n_users), data.lengths)
    n_before_valid = np.bincount(user_of, weights=data.times < t_valid, minlength=data.n_users).astype(np.int64)
    n_before_test = np.bincount(user_of, weights=data.times < t_test, minlength=data.n_users).astype(np.int64)
    lens = data.lengths
    valid_pos = np.where((n_before_test > n_before_valid) & (n_before_valid > 0), n_before_valid, -1)
    test_pos = np.where((lens > n_before_test) & (n_before_test > 0), n_before_test, -1)
    del starts
    return Split(data=data, train_len=n_before_valid, valid_pos=valid_pos, test_pos=test_pos, kind="temporal")


SPLITS = {"leave_one_out": leave_one_out, "temporal": temporal_split}


def make_split(data: SequenceData, kind: str = "leave_one_out", **kw) -> Split:
    if kind not in SPLITS:
        raise ValueError(f"unknown split {kind!r}; valid: {sorted(SPLITS)}")
    return SPLITS[kind](data, **kw)


# ------------------------------------------------------------------ degenerate splits
def _summary(data: SequenceData) -> str:
    lens = data.lengths
    return (f"{data.n_users} users, {data.n_interactions} events, {data.n_items} items; events per user "
            f"min {int(lens.min())}, median {float(np.median(lens)):g}, max {int(lens.max())}")


def _stage_rule(split: Split, stage: str) -> str:
    """How the split picks users for ``stage``, with the count that explains why none was."""
    lens = split.data.lengths
    if split.kind.startswith("leave_one_out"):
        return (f"leave-one-out {'validates' if stage == 'valid' else 'tests'} users with at least 3 events, "
                f"and {int((lens >= 3).sum())} of {len(lens)} users have that many")
    return (f"the temporal split {'validates' if stage == 'valid' else 'tests'} users with an event after the "
            f"{'validation' if stage == 'valid' else 'test'} cut-off and at least one before it")


def empty_stage_message(split: Split, stage: str) -> str:
    """The one line both ``check_split`` and ``evaluate`` give for a stage without users."""
    what = "validation" if stage == "valid" else "test"
    return (f"no users to evaluate at the {what} stage of the {split.kind} split: {_stage_rule(split, stage)} "
            f"({_summary(split.data)})")


def check_split(split: Split) -> None:
    """Refuse data that cannot be trained or measured, before any training: a one-item
    catalogue (every ranking is trivially perfect), no training target (an event preceded
    by another training event of the same user; without one, the loss is 0 and the model
    is untrained, yet a tiny catalogue can still score HR@10 = 1.0), or no validation or
    test user. Raises ``ValueError`` with one line that gives the counts."""
    data = split.data
    if data.n_items < 2:
        raise ValueError(f"the catalogue has {data.n_items} item(s): ranking one item is trivially perfect, so "
                         f"nothing can be learned or measured ({_summary(data)})")
    n_targets = int(np.maximum(split.train_len - 1, 0).sum())
    if n_targets == 0:
        if split.kind == "leave_one_out":
            lens = split.data.lengths
            why = ("leave-one-out keeps each user's last 2 events for validation and test when the user has at "
                   f"least 3, so only users with exactly 2 or at least 4 events give training targets, and none "
                   f"does ({int((lens == 1).sum())} users have 1 event, {int((lens == 3).sum())} have 3)")
        elif split.kind == "temporal":
            why = "no user has two events before the temporal split's validation cut-off"
        else:
            why = f"no user has two training events in the {split.kind} split"
        raise ValueError(f"no training targets: a target is an event that follows another training event of the "
                         f"same user; {why} ({_summary(data)})")
    for stage in ("valid", "test"):
        if len(split.eval_users(stage)) == 0:
            raise ValueError(empty_stage_message(split, stage))
