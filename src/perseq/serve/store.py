"""Where the service keeps each user's events and state, behind one interface: a store's
``user(user_id, write)`` is a transaction on one user (``UserTxn``'s methods), and
``recent_users``/``n_users`` look across users.

Writes are optimistic. The service reads a user's revision (a random token that every
commit replaces, so it never repeats, not even after the user is deleted and re-created),
computes the new state outside any lock, and commits it only if the revision is still the
one it read; otherwise it reads again (``Conflict``, or an unchanged-revision check). The lock covers the writes alone, so workers step their models in parallel, and
events of one user apply in order with none lost whatever worker takes them. A user's row
keeps the model version its state was built with; a server with another model rebuilds the
state from the stored events.

``SQLiteStore`` (the default) is one file in WAL mode. A write runs ``BEGIN IMMEDIATE`` under
a lock that serializes writers across threads (a ``threading.Lock``) and worker processes
(``flock`` on ``<store>.lock``); waiting on those wakes a writer as soon as the previous one
commits, where SQLite's busy handler would poll with sleeps of up to 100 ms. Durability:
``"process"`` (default, ``synchronous=NORMAL``) fsyncs the WAL at checkpoints only, so an
acknowledged event survives a crash or ``kill -9`` of the server (the WAL is in the OS's page
cache) but a power loss or OS crash may roll back to the last checkpoint (never corrupting
the file); ``"power"`` (``synchronous=FULL``) fsyncs every commit and also survives a power
loss.

``RedisStore`` serves several API replicas on several machines. A write ``WATCH``es the
user's revision key and commits in one ``MULTI``/``EXEC``; a concurrent write makes EXEC fail
and the service reads again. Durability is the Redis server's: ``appendonly yes`` with
``appendfsync always`` matches "power", ``everysec`` may lose the last second.
"""
from __future__ import annotations

import fcntl
import json
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def new_revision() -> str:
    return secrets.token_hex(8)


class Conflict(Exception):
    """Another writer changed the user since this transaction read it: read again."""


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

    def revision(self) -> str | None:
        """The token of the user's last commit (None: no user): what a writer checks before
        committing a state it computed outside the lock."""
        row = self.con.execute("SELECT rev FROM users WHERE user_id = ?", (self.user,)).fetchone()
        return None if row is None else row[0]

    def n_events(self) -> int:
        row = self.con.execute("SELECT n_events FROM users WHERE user_id = ?", (self.user,)).fetchone()
        return 0 if row is None else row[0]

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
        n = self.n_events()
        self.con.executemany("INSERT INTO events (user_id, seq, event_id, item_id, ts) VALUES (?, ?, ?, ?, ?)",
                             [(self.user, n + i, e.event_id, e.item_id, e.ts) for i, e in enumerate(events)])
        return n + len(events)

    def save_state(self, version: str, spec: str, blob: bytes, n_events: int | None = None) -> str:
        """Store the state; ``n_events``: the events stored for the user (default:
        unchanged). Returns the new revision."""
        n = self.n_events() if n_events is None else n_events
        rev = new_revision()
        self.con.execute("INSERT INTO users (user_id, version, spec, blob, n_events, updated, rev) VALUES (?, ?, ?, ?, ?, ?, ?) "
                         "ON CONFLICT(user_id) DO UPDATE SET version = excluded.version, spec = excluded.spec, "
                         "blob = excluded.blob, n_events = excluded.n_events, updated = excluded.updated, rev = excluded.rev",
                         (self.user, version, spec, blob, n, time.time_ns(), rev))
        return rev

    def delete(self) -> bool:
        """Erase the user's events and state; the id is remembered as erased (``erased``)."""
        n = self.con.execute("DELETE FROM events WHERE user_id = ?", (self.user,)).rowcount
        n += self.con.execute("DELETE FROM users WHERE user_id = ?", (self.user,)).rowcount
        self.con.execute("INSERT OR IGNORE INTO erased (user_id) VALUES (?)", (self.user,))
        return n > 0

    def erased(self) -> bool:
        """Whether this user id was ever erased: what the server held from elsewhere about
        it (a federated run's personal parameters) is not used again."""
        return self.con.execute("SELECT 1 FROM erased WHERE user_id = ?", (self.user,)).fetchone() is not None


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
                                              blob BLOB NOT NULL, n_events INTEGER NOT NULL DEFAULT 0,
                                              updated INTEGER NOT NULL DEFAULT 0, rev TEXT NOT NULL DEFAULT '');
            CREATE TABLE IF NOT EXISTS events (user_id TEXT NOT NULL, seq INTEGER NOT NULL, event_id TEXT NOT NULL,
                                               item_id TEXT NOT NULL, ts INTEGER,
                                               PRIMARY KEY (user_id, seq), UNIQUE (user_id, event_id));
            CREATE TABLE IF NOT EXISTS erased (user_id TEXT PRIMARY KEY);
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
        return [r[0] for r in self._con().execute("SELECT user_id FROM users ORDER BY updated DESC LIMIT ?", (limit,))]

    def n_users(self) -> int:
        return self._con().execute("SELECT COUNT(*) FROM users").fetchone()[0]


class _RedisTxn:
    """``UserTxn`` on Redis: reads go to the server at once, writes are buffered as plain
    commands and run at the end by one script (``_COMMIT``), atomically and only if the
    user's revision, and whether the user was ever erased, are still what the transaction
    read when it began. Every change of the user's metadata changes its revision (a fresh
    token per save; a delete removes it), and a user created and deleted meanwhile is erased
    now: so this is WATCH on the metadata and the erased set, in one round trip instead of
    three."""

    def __init__(self, r, prefix: str, user: str):
        self.r, self.user, self.ops = r, user, []
        k = f"{prefix}:u:{user}"
        self.k_meta, self.k_events, self.k_ids = k + ":meta", k + ":events", k + ":ids"
        self.k_users, self.k_erased = f"{prefix}:users", f"{prefix}:erased"
        self._n = None  # the event count after the buffered writes
        self._head_ = None  # (rev, n_events, erased) as stored: one round trip (writes are buffered, so it holds)

    def _head(self):
        if self._head_ is None:
            pipe = self.r.pipeline(transaction=False)
            pipe.hmget(self.k_meta, "rev", "n_events")
            pipe.sismember(self.k_erased, self.user)
            (rev, n), erased = pipe.execute()
            self._head_ = rev, n, bool(erased)
        return self._head_

    def _write(self, *command):
        self.ops.append(command)

    def state(self):
        meta = self.r.hgetall(self.k_meta)  # one read: version, spec and blob of one commit
        if not meta:
            return None
        return meta[b"version"].decode(), meta[b"spec"].decode(), meta[b"blob"]

    def revision(self):
        rev = self._head()[0]
        return None if rev is None else rev.decode()

    def n_events(self) -> int:
        n = self._head()[1]
        return 0 if n is None else int(n)

    @staticmethod
    def _event(raw: bytes) -> Event:
        return Event(*json.loads(raw))

    def events(self):
        return [self._event(x) for x in self.r.lrange(self.k_events, 0, -1)]

    def recent_events(self, limit: int):
        return [self._event(x) for x in reversed(self.r.lrange(self.k_events, -limit, -1))]

    def known_ids(self, ids):
        if not ids:
            return set()
        return {i for i, hit in zip(ids, self.r.smismember(self.k_ids, ids)) if hit}

    def add_events(self, events):
        n = self.n_events()
        if events:
            for i in range(0, len(events), 1000):  # a Lua call takes a few thousand arguments at most
                part = events[i : i + 1000]
                self._write("RPUSH", self.k_events, *[json.dumps([e.event_id, e.item_id, e.ts]) for e in part])
                self._write("SADD", self.k_ids, *[e.event_id for e in part])
        self._n = n + len(events)
        return self._n

    def save_state(self, version, spec, blob, n_events=None):
        if n_events is None:
            n_events = self._n if self._n is not None else self.n_events()
        rev = new_revision()
        self._write("HSET", self.k_meta, "version", version, "spec", spec, "blob", blob, "n_events", n_events, "rev", rev)
        self._write("ZADD", self.k_users, time.time_ns(), self.user)
        return rev

    def delete(self):
        existed = self.r.exists(self.k_meta, self.k_events) > 0
        self._write("DEL", self.k_meta, self.k_events, self.k_ids)
        self._write("ZREM", self.k_users, self.user)
        self._write("SADD", self.k_erased, self.user)
        return existed

    def erased(self) -> bool:
        return self._head()[2]


# a write transaction's commit: KEYS[1] the user's metadata, KEYS[2] the erased set; ARGV[1]
# the revision the transaction read ("" none), ARGV[2] the user, ARGV[3] whether it was
# erased (0/1), then each buffered command as its length and its words
_COMMIT = """
local rev = redis.call('HGET', KEYS[1], 'rev')
if (rev or '') ~= ARGV[1] then return 0 end
if redis.call('SISMEMBER', KEYS[2], ARGV[2]) ~= tonumber(ARGV[3]) then return 0 end
local i = 4
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return 1
"""


class RedisStore:
    """The store on a Redis server (``redis://host:port/db``), keys under ``prefix``."""

    def __init__(self, url: str, prefix: str = "perseq"):
        import redis

        self.r = redis.Redis.from_url(url)
        self.r.ping()  # a wrong address is an error at start-up, not at the first request
        self.prefix = prefix
        self._commit = self.r.register_script(_COMMIT)

    @contextmanager
    def user(self, user_id: str, write: bool = True):
        if not write:
            yield _RedisTxn(self.r, self.prefix, user_id)
            return
        txn = _RedisTxn(self.r, self.prefix, user_id)
        rev, erased = txn.revision(), txn.erased()  # what the commit checks (one read; the txn's own reads are free)
        yield txn
        if not txn.ops:
            return
        flat = [rev or "", user_id, int(erased)]
        for command in txn.ops:
            flat += [len(command), *command]
        if not self._commit(keys=[txn.k_meta, txn.k_erased], args=flat):
            raise Conflict(f"user {user_id!r} changed during the write")

    def recent_users(self, limit: int) -> list[str]:
        return [u.decode() for u in self.r.zrevrange(f"{self.prefix}:users", 0, limit - 1)]

    def n_users(self) -> int:
        return self.r.zcard(f"{self.prefix}:users")


def open_store(spec: str, durability: str = "process"):
    """A store from its command-line form: ``redis://...`` or a SQLite file path."""
    if spec.startswith(("redis://", "rediss://", "unix://")):
        if durability != "process":
            raise ValueError("with Redis, durability is the Redis server's setting (appendonly/appendfsync)")
        return RedisStore(spec)
    return SQLiteStore(spec, durability)
