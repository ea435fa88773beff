"""The service's logic apart from HTTP: recommend from a given history, take a user's events
(idempotent, in order, state advanced incrementally), recommend from the stored state,
forget a user. ``app.py`` puts it behind FastAPI.

Policies (README "Serving"):
* event ids make posts idempotent: an id the user already has (a retry) is skipped, and
  the response counts it under ``duplicates``;
* events apply in the order the server commits them (posts of one user are serialized by
  the store); timestamps are stored as given and never reorder events: an event that
  arrives late counts as the newest;
* unknown item ids: ``ignore`` (default) stores such events (a later model may know the
  item) without applying them to the state, and lists them in the response; ``reject``
  answers 422 and stores nothing;
* a user without usable history gets the most popular items of the run's data, flagged
  ``cold_start``.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from .engine import Engine
from .store import Conflict, Event, SQLiteStore


class NoAdaptation(Exception):
    """``adapt`` was asked for, and the run folder holds no stored choice."""


class Busy(Exception):
    """Too many concurrent writers on one user: the client may retry."""


class UnknownItems(ValueError):
    def __init__(self, ids: list[str]):
        super().__init__(f"unknown item ids: {ids[:20]}{' ...' if len(ids) > 20 else ''}")
        self.ids = ids


class Service:
    def __init__(self, engine: Engine, store: SQLiteStore, unknown_items: str = "ignore",
                 cache_max_bytes: int = 256 * 2**20):
        if unknown_items not in ("ignore", "reject"):
            raise ValueError(f"unknown_items must be 'ignore' or 'reject', got {unknown_items!r}")
        self.engine, self.store, self.unknown_items = engine, store, unknown_items
        self._adapted = None
        # user -> (revision, state, bytes) this process last committed: a post whose user
        # still has that revision in the store skips reading and unpacking the state blob
        self._cache: OrderedDict[str, tuple[str, dict, int]] = OrderedDict()
        self._cache_bytes = 0
        self.cache_max_bytes = cache_max_bytes

    def _known(self, raw: list[str]) -> tuple[list[int], list[str]]:
        idx, unknown = self.engine.ids(raw)
        if unknown and self.unknown_items == "reject":
            raise UnknownItems(unknown)
        return idx, unknown

    def _answer(self, hidden, k: int, exclude: set[int], extra: dict, scores=None) -> dict:
        if hidden is None and scores is None:
            return {"items": self.engine.popular(k, exclude), "cold_start": True, **extra}
        return {"items": self.engine.top_k(hidden, k, exclude, scores), "cold_start": False, **extra}

    # -- stateless ------------------------------------------------------------------------
    def recommend(self, history: list[str], k: int, exclude_seen: bool = True, adapt: bool = False) -> dict:
        idx, unknown = self._known(history)
        exclude = set(idx) if exclude_seen else set()
        if not idx:
            return self._answer(None, k, exclude, {"unknown": unknown})
        if adapt:
            e = self.engine
            x = torch.tensor(idx[-e.W :])[None]
            with torch.no_grad():
                scores = self._personalized().scores(x, torch.tensor([x.shape[1]]))[0]
            return self._answer(None, k, exclude, {"unknown": unknown, "adapted": True}, scores=scores)
        return self._answer(self.engine.stateless_hidden(idx), k, exclude, {"unknown": unknown})

    def _personalized(self):
        """PCRec-simple with the choice ``perseq adapt`` stored in the run folder."""
        if self._adapted is None:
            from ..personalize import Personalized
            from ..personalize.sweep import load_choice

            choice = load_choice(str(self.engine.run_dir))
            if choice is None:
                raise NoAdaptation(f"{self.engine.run_dir} has no stored adaptation (run 'perseq adapt' on it first)")
            self._adapted = Personalized(self.engine.model, choice)
        return self._adapted

    # -- per user -------------------------------------------------------------------------
    def _load(self, tx, user: str) -> dict:
        """The user's state, rebuilt from the stored events when it was built by another
        model version (or never)."""
        e = self.engine
        stored = tx.state()
        if stored is not None and stored[0] == e.version:
            return e.unpack(stored[1], stored[2])
        idx, _ = e.ids([ev.item_id for ev in tx.events()])
        # an erased user who comes back starts without what the run held about them (PFSR's
        # personal parameters): the model's own
        return e.add_seen(e.advance(e.init(None if e.personal_names and tx.erased() else user), idx), idx)

    def post_events(self, user: str, events: list[dict], k: int | None = None, exclude_seen: bool = True) -> dict:
        """events: [{"id", "item_id", "ts"}] in order. Returns counts, unknown ids and, with
        k, the recommendations after them."""
        e = self.engine
        first = {}
        for ev in events:  # an id twice in one post: the first one counts
            first.setdefault(str(ev["id"]), ev)
        in_post_dups = len(events) - len(first)
        for _ in range(100):  # optimistic: compute outside the writer lock, commit if nothing moved
            with self.store.user(user, write=False) as tx:
                rev = tx.revision()
                dup = tx.known_ids(list(first))
                hit = self._uncache(user)
                state = hit[1] if hit is not None and rev is not None and hit[0] == rev else self._load(tx, user)
            fresh = [ev for i, ev in first.items() if i not in dup]
            idx, unknown = self._known([str(ev["item_id"]) for ev in fresh])
            applied = len(fresh) - len(unknown)
            state = e.add_seen(e.advance(state, idx), idx)
            spec, blob = e.pack(state)
            try:
                with self.store.user(user) as tx:
                    if tx.revision() != rev:  # another writer (or a delete) got there first: read again
                        continue
                    # every event is kept, an unknown item's too: a later model may know it
                    n = tx.add_events([Event(str(ev["id"]), str(ev["item_id"]), ev.get("ts")) for ev in fresh])
                    new_rev = tx.save_state(e.version, spec, blob, n)
            except Conflict:  # the same, seen at commit (Redis)
                continue
            self._remember(user, new_rev, state, e.memory_bytes(state, blob))
            break
        else:
            raise Busy(f"user {user!r}: 100 concurrent writers in a row; retry")
        out = {"user_id": user, "applied": applied, "duplicates": len(dup) + in_post_dups, "unknown": unknown,
               "n_events": n}
        if k:
            out["recommendations"] = self._from_state(state, k, exclude_seen)
        return out

    def _uncache(self, user: str):
        hit = self._cache.pop(user, None)
        if hit is not None:
            self._cache_bytes -= hit[2]
        return hit

    def _remember(self, user: str, rev: str, state: dict, size: int) -> None:
        """Keep the state this process committed (``size``: its bytes in memory), within
        ``cache_max_bytes`` (least recently written users leave first)."""
        self._uncache(user)
        self._cache[user] = (rev, state, size)
        self._cache_bytes += size
        while self._cache_bytes > self.cache_max_bytes and self._cache:
            self._uncache(next(iter(self._cache)))

    def _from_state(self, state: dict, k: int, exclude_seen: bool) -> dict:
        exclude = self.engine.seen(state) if exclude_seen else ()
        return self._answer(self.engine.state_hidden(state), k, exclude, {})

    def recommendations(self, user: str, k: int, exclude_seen: bool = True) -> dict:
        with self.store.user(user, write=False) as tx:
            hit = self._cache.get(user)
            if hit is not None and hit[0] == tx.revision():  # the state this process last wrote
                return {"user_id": user, **self._from_state(hit[1], k, exclude_seen)}
            stored = tx.state()
            if stored is None:
                return {"user_id": user, **self._answer(None, k, (), {})}
            if stored[0] == self.engine.version:
                state = self.engine.unpack(stored[1], stored[2])
            else:
                state = None
        if state is None:  # built by another model version: rebuild (and store) it
            try:
                with self.store.user(user) as tx:
                    if tx.revision() is None:  # deleted meanwhile: nothing to rebuild or store
                        return {"user_id": user, **self._answer(None, k, (), {})}
                    state = self._load(tx, user)
                    tx.save_state(self.engine.version, *self.engine.pack(state))
            except Conflict:  # someone stored a newer state meanwhile; this answer stands
                pass
        return {"user_id": user, **self._from_state(state, k, exclude_seen)}

    def recent_events(self, user: str, limit: int) -> dict:
        with self.store.user(user, write=False) as tx:
            events = tx.recent_events(limit)
        e = self.engine
        return {"user_id": user, "events": [{"id": ev.event_id, "item_id": ev.item_id, "ts": ev.ts,
                                             **({"title": e.titles[ev.item_id]} if ev.item_id in e.titles else {})}
                                            for ev in events]}

    def delete(self, user: str) -> bool:
        self._uncache(user)
        with self.store.user(user) as tx:
            return tx.delete()
