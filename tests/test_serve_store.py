"""The state stores (perseq.serve.store): SQLite and Redis pass the same tests."""
import threading
import time

import pytest

from perseq.serve.store import Conflict, Event, RedisStore, SQLiteStore


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return SQLiteStore(tmp_path / "s.sqlite")
    url = request.getfixturevalue("redis_url")
    return RedisStore(url, prefix=f"t{time.time_ns()}")


def _ev(i, item="x"):
    return Event(f"e{i}", item, i)


def test_events_state_and_revision(store):
    with store.user("u", write=False) as tx:
        assert tx.state() is None and tx.revision() is None and tx.events() == []
    with store.user("u") as tx:
        assert tx.add_events([_ev(0, "a"), _ev(1, "b")]) == 2
        r1 = tx.save_state("v1", "{}", b"\x00\x01", 2)
    with store.user("u") as tx:
        assert tx.revision() == r1 and tx.add_events([_ev(2, "c")]) == 3
        r2 = tx.save_state("v1", '{"x": 1}', b"\x02", 3)
    with store.user("u", write=False) as tx:
        assert tx.state() == ("v1", '{"x": 1}', b"\x02") and tx.revision() == r2 != r1 and tx.n_events() == 3
        assert [e.item_id for e in tx.events()] == ["a", "b", "c"]
        assert [e.event_id for e in tx.recent_events(2)] == ["e2", "e1"]
        assert tx.known_ids(["e0", "e9", "e2"]) == {"e0", "e2"}
        assert tx.events()[2] == Event("e2", "c", 2)


def test_a_deleted_and_recreated_user_never_repeats_a_revision(store):
    """A writer that read the user before a delete and a re-creation with as many events
    must not commit over them: the revision is a fresh token, not the event count."""
    with store.user("u") as tx:
        tx.add_events([_ev(0)])
        old = tx.save_state("v", "{}", b"old", 1)
    with store.user("u") as tx:
        tx.delete()
    with store.user("u") as tx:
        tx.add_events([_ev(1)])
        new = tx.save_state("v", "{}", b"new", 1)
    assert new != old


def test_users_listing_and_delete(store):
    for u in ("a", "b", "c"):
        with store.user(u) as tx:
            tx.add_events([_ev(0)])
            tx.save_state("v", "{}", b"", 1)
    with store.user("a") as tx:  # updated last
        tx.save_state("v", "{}", b"", 1)
    assert store.recent_users(2) == ["a", "c"] and store.n_users() == 3
    with store.user("b") as tx:
        assert tx.delete()
    with store.user("b", write=False) as tx:
        assert tx.state() is None and tx.events() == [] and tx.known_ids(["e0"]) == set()
    with store.user("b") as tx:
        assert not tx.delete()
    assert store.n_users() == 2
    with store.user("b", write=False) as tx:
        assert tx.erased()  # the erased id is remembered, nothing else of it
    with store.user("a", write=False) as tx:
        assert not tx.erased()


def test_a_failed_write_leaves_nothing(store):
    with pytest.raises(RuntimeError):
        with store.user("u") as tx:
            tx.add_events([_ev(0)])
            tx.save_state("v", "{}", b"", 1)
            raise RuntimeError("the service failed half way")
    with store.user("u", write=False) as tx:
        assert tx.state() is None and tx.events() == []


def test_concurrent_writers_commit_only_on_an_unchanged_revision(store):
    """Eight threads append to one user with the service's optimistic loop (read the
    revision, write if it is unchanged, else retry): every event lands, in one order."""
    def writer(w):
        for j in range(20):
            while True:
                with store.user("hot", write=False) as tx:
                    rev = tx.revision()
                try:
                    with store.user("hot") as tx:
                        if tx.revision() != rev:
                            continue
                        n = tx.add_events([Event(f"w{w}-{j}", f"i{w}", None)])
                        tx.save_state("v", "{}", str(n).encode(), n)
                except Conflict:
                    continue
                break
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with store.user("hot", write=False) as tx:
        events = tx.events()
        assert tx.n_events() == 160 and tx.state()[2] == b"160"
    assert len({e.event_id for e in events}) == 160
    for w in range(8):  # each writer's events in its own order
        mine = [e.event_id for e in events if e.event_id.startswith(f"w{w}-")]
        assert mine == [f"w{w}-{j}" for j in range(20)]


def test_a_redis_writer_does_not_commit_over_a_user_created_and_erased_meanwhile(redis_url):
    """Redis writers run side by side (SQLite's take the writer lock in turn): one that began
    while the user did not exist must not resurrect them after others created and then
    erased them, since its state was built as for a user never erased."""
    store = RedisStore(redis_url, prefix=f"t{time.time_ns()}")
    with pytest.raises(Conflict):
        with store.user("z") as a:
            assert a.revision() is None and not a.erased()
            with store.user("z") as b:
                b.add_events([_ev(0)])
                b.save_state("v", "{}", b"b", 1)
            with store.user("z") as c:
                c.delete()
            a.add_events([_ev(1)])
            a.save_state("v", "{}", b"a", 1)
    with store.user("z", write=False) as tx:
        assert tx.erased() and tx.state() is None and tx.events() == []


def test_a_redis_write_of_many_events_commits(redis_url):
    store = RedisStore(redis_url, prefix=f"t{time.time_ns()}")
    with store.user("big") as tx:
        assert tx.add_events([_ev(i) for i in range(9000)]) == 9000
        tx.save_state("v", "{}", b"", 9000)
    with store.user("big", write=False) as tx:
        assert tx.n_events() == 9000 and [e.event_id for e in tx.recent_events(2)] == ["e8999", "e8998"]
