"""Where the service keeps each user's events and state, behind one interface.

``SQLiteStore`` (the default) is one file in WAL mode. Every change to a user runs in one
``BEGIN IMMEDIATE`` transaction, taken under a lock that serializes writers across threads
(a ``threading.Lock``) and worker processes (``flock`` on ``<store>.lock``), so events of one
user apply in order and none is lost when several workers take posts for the same user.
Waiting on those locks wakes a writer as soon as the previous one commits; SQLite's own
busy handler would poll with sleeps of up to 100 ms, which made the latency's tail. With ``durability="power"`` (``synchronous=FULL``) a
transaction is durable on disk
before the request is answered, so an acknowledged event survives a ``kill -9`` of the
server and a power loss, at the price of one fsync per request, which also serializes
the writers. ``synchronous=NORMAL`` (``durability="process"``, the default) fsyncs the WAL
only at checkpoints: an acknowledged event still survives a crash or ``kill -9`` of the
server (the WAL is in the OS's page cache), but a power loss or OS crash may lose the
transactions since the last checkpoint (never corrupting the database).

A write computes the user's new state outside the lock and commits it only if the user's
event count (``revision``) is still the one it read, retrying otherwise (optimistic
concurrency): the lock covers the SQL writes alone, so workers step their models in
parallel. A user's row holds the model version its state was built with; a server with another model
finds the version changed and rebuilds the state from the stored events.
"""
from __future__ import annotations

import fcntl
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Event:
    event_id: str
    item_id: str  # raw id, as given
    ts: int | None


class UserTxn:
    """One user's data inside a transaction (the methods a service needs)."""

    def __init__(self, con: sqlite3.Connection, user: str):
        self.con, self.user = con, user

    def state(self) -> tuple[str, str, bytes] | None:
        """(model version, spec, blob) of the stored state, or None."""
        row = self.con.execute("SELECT version, spec, blob FROM users WHERE user_id = ?", (self.user,)).fetchone()
        return None if row is None else (row[0], row[1], bytes(row[2]))

    def revision(self) -> int | None:
        """How many events the stored state holds (None: no user): what a writer checks
        before committing a state it computed outside the lock."""
        row = self.con.execute("SELECT n_events FROM users WHERE user_id = ?", (self.user,)).fetchone()
        return None if row is None else row[0]

    def events(self) -> list[Event]:
        rows = self.con.execute("SELECT event_id, item_id, ts FROM events WHERE user_id = ? ORDER BY seq", (self.user,))
        return [Event(*r) for r in rows]

    def recent_events(self, limit: int) -> list[Event]:
        """The newest ``limit`` events, newest first."""
        rows = self.con.execute("SELECT event_id, item_id, ts FROM events WHERE user_id = ? ORDER BY seq DESC LIMIT ?",
                                (self.user, limit))
        return [Event(*r) for r in rows]

    def known_ids(self, ids: list[str]) -> set[str]:
        """Which of these event ids this user already has (a retried post)."""
        out = set()
        for s in range(0, len(ids), 500):
            chunk = ids[s : s + 500]
            q = f"SELECT event_id FROM events WHERE user_id = ? AND event_id IN ({','.join('?' * len(chunk))})"
            out |= {r[0] for r in self.con.execute(q, (self.user, *chunk))}
        return out

    def add_events(self, events: list[Event]) -> int:
        """Append in order; returns the user's event count after."""
        n = self.revision() or 0
        self.con.executemany("INSERT INTO events (user_id, seq, event_id, item_id, ts) VALUES (?, ?, ?, ?, ?)",
                             [(self.user, n + i, e.event_id, e.item_id, e.ts) for i, e in enumerate(events)])
        return n + len(events)

    def save_state(self, version: str, spec: str, blob: bytes, n_events: int | None = None) -> None:
        """Store the state; ``n_events``: the events it holds (default: unchanged)."""
        n = (self.revision() or 0) if n_events is None else n_events
        self.con.execute("INSERT INTO users (user_id, version, spec, blob, n_events) VALUES (?, ?, ?, ?, ?) "
                         "ON CONFLICT(user_id) DO UPDATE SET version = excluded.version, spec = excluded.spec, "
                         "blob = excluded.blob, n_events = excluded.n_events", (self.user, version, spec, blob, n))

    def delete(self) -> bool:
        n = self.con.execute("DELETE FROM events WHERE user_id = ?", (self.user,)).rowcount
        n += self.con.execute("DELETE FROM users WHERE user_id = ?", (self.user,)).rowcount
        return n > 0


class SQLiteStore:
    def __init__(self, path: str | Path, durability: str = "process"):
        if durability not in ("process", "power"):
            raise ValueError(f"durability must be 'process' (synchronous=NORMAL) or 'power' (FULL), got {durability!r}")
        self.path = str(path)
        self.synchronous = "FULL" if durability == "power" else "NORMAL"
        self._local = threading.local()
        self._thread_lock = threading.Lock()
        self._lock_file = open(self.path + ".lock", "a+")  # noqa: SIM115 - held for the store's life
        con = self._con()
        con.executescript("""
            CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, version TEXT NOT NULL, spec TEXT NOT NULL,
                                              blob BLOB NOT NULL, n_events INTEGER NOT NULL DEFAULT 0);
            CREATE TABLE IF NOT EXISTS events (user_id TEXT NOT NULL, seq INTEGER NOT NULL, event_id TEXT NOT NULL,
                                               item_id TEXT NOT NULL, ts INTEGER,
                                               PRIMARY KEY (user_id, seq), UNIQUE (user_id, event_id));
        """)

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            # autocommit mode: transactions are the explicit BEGIN IMMEDIATE ... COMMIT below
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute(f"PRAGMA synchronous={self.synchronous}")
            con.execute("PRAGMA busy_timeout=30000")
            self._local.con = con
        return con

    @contextmanager
    def user(self, user_id: str, write: bool = True):
        """A transaction on one user: with ``write``, BEGIN IMMEDIATE takes the writer lock
        first, so two changes to the same user never interleave."""
        con = self._con()
        if not write:
            con.execute("BEGIN")
            try:
                yield UserTxn(con, user_id)
            finally:
                con.execute("COMMIT")
            return
        with self._thread_lock:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX)
            try:
                con.execute("BEGIN IMMEDIATE")
                try:
                    yield UserTxn(con, user_id)
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
            finally:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    def recent_users(self, limit: int) -> list[str]:
        """Users whose state changed last, newest first."""
        return [r[0] for r in self._con().execute("SELECT user_id FROM users ORDER BY rowid DESC LIMIT ?", (limit,))]

    def n_users(self) -> int:
        return self._con().execute("SELECT COUNT(*) FROM users").fetchone()[0]
