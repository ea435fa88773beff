"""The serving layer (perseq.serve) through its HTTP API (FastAPI's TestClient)."""
import pytest
import torch

from perseq.cli import main

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from perseq.serve.app import create_app  # noqa: E402

DATA = "data.synthetic={n_users: 60, n_items: 40, n_clusters: 4, mean_len: 30, min_len: 20, max_len: 50}"
MODELS = {  # name -> extra settings; windows of 12 events, so 30 events slide them
    "gru4rec": [],
    "mamba4rec": [],
    "sasrec": [],
    "hstu": [],
    "sasrec+persrec": ["--set", "model.recent=4"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve_runs")
    for name, extra in MODELS.items():
        assert main(["train", "--set", DATA, "--set", f"model.name={name}", "--set", "data.max_len=12", "--set", "model.d=16",
                     "--set", "train.epochs=1", "--set", "eval.exclude_seen=false", *extra, "--out", str(out),
                     "--name", name, "--no-progress"]) == 0
    return {name: str(out / f"{name}-s0") for name in MODELS}


def _client(run, tmp_path, **kw):
    return TestClient(create_app(run, str(tmp_path / "state.sqlite"), **kw))


def _events(items, start=0):
    return {"events": [{"id": f"e{start + i}", "item_id": it} for i, it in enumerate(items)]}


ITEMS = [f"i{(7 * t) % 40}" for t in range(30)]


@pytest.mark.parametrize("name", list(MODELS))
def test_incremental_events_equal_stateless_recommend_on_the_same_window(name, runs, tmp_path):
    """Events posted one at a time, then the user's recommendations, equal a stateless
    recommend of the events the state reads: all 30 for recurrent models and PerSRec, the
    state's sliding window (12 events at most) for SASRec and HSTU."""
    with _client(runs[name], tmp_path) as c:
        svc = c.app.state.service

        def state_window():
            with svc.store.user("u1", write=False) as tx:
                return [str(svc.engine.item_ids[i]) for i in svc.engine.unpack(*tx.state()[1:])["window"].tolist()]

        lengths = []
        for t, it in enumerate(ITEMS):
            r = c.post("/v1/users/u1/events", params={"k": 5, "exclude_seen": False}, json=_events([it], t))
            assert r.status_code == 200 and r.json()["applied"] == 1
            if svc.engine.kind == "window":
                lengths.append(len(state_window()))
        got = c.get("/v1/users/u1/recommendations", params={"k": 10, "exclude_seen": False}).json()
        assert got["items"][:5] == r.json()["recommendations"]["items"]  # the post's k = 5 are the same
        if svc.engine.kind == "window":
            # W = 12, slack 3: events 1-12 fill the window; events 13, 16, ..., 28 each find it
            # full and drop the oldest 3 first (12 -> 9, then +1)
            assert (svc.engine.W, svc.engine.slack) == (12, 3)
            assert lengths == list(range(1, 13)) + [10, 11, 12] * 6
            window = state_window()
            assert window == ITEMS[-12:]
        else:
            window = ITEMS
        want = c.post("/v1/recommend", json={"history": window, "k": 10, "exclude_seen": False}).json()
    assert [x["item_id"] for x in got["items"]] == [x["item_id"] for x in want["items"]]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(got["items"], want["items"])) <= 1e-4


def test_retries_apply_once_and_exclude_seen_masks_the_users_items(runs, tmp_path):
    with _client(runs["gru4rec"], tmp_path) as c:
        first = c.post("/v1/users/u/events", json=_events(ITEMS[:5])).json()
        assert first["applied"] == 5 and first["n_events"] == 5
        again = c.post("/v1/users/u/events", params={"k": 40}, json=_events(ITEMS[:6])).json()  # 5 retried + 1 new
        assert (again["applied"], again["duplicates"], again["n_events"]) == (1, 5, 6)
        recs = [x["item_id"] for x in again["recommendations"]["items"]]
        assert not set(recs) & set(ITEMS[:6]) and len(recs) == 40 - len(set(ITEMS[:6]))
        twice = c.post("/v1/users/u/events", json={"events": [{"id": "z", "item_id": "i1"}, {"id": "z", "item_id": "i2"}]})
        assert (twice.json()["applied"], twice.json()["duplicates"]) == (1, 1)


def test_cold_start_unknown_items_delete_and_restart(runs, tmp_path):
    with _client(runs["mamba4rec"], tmp_path) as c:
        cold = c.get("/v1/users/nobody/recommendations", params={"k": 3}).json()
        assert cold["cold_start"] and len(cold["items"]) == 3 and all(x["score"] is None for x in cold["items"])
        assert c.post("/v1/recommend", json={"history": [], "k": 3}).json()["items"] == cold["items"]
        r = c.post("/v1/users/v/events", json=_events(["i3", "nope", 5, "i4"]))  # 5: an integer id, unknown too
        assert r.json()["applied"] == 2 and r.json()["unknown"] == ["nope", "5"]
        before = c.get("/v1/users/v/recommendations").json()
        assert not before["cold_start"]
    with _client(runs["mamba4rec"], tmp_path) as c:  # a new server on the same store: the state is there
        assert c.get("/v1/users/v/recommendations").json() == before
        assert c.delete("/v1/users/v").status_code == 204
        assert c.get("/v1/users/v/recommendations").json()["cold_start"]
        assert c.delete("/v1/users/v").status_code == 404
    with _client(runs["mamba4rec"], tmp_path, unknown_items="reject") as c:
        r = c.post("/v1/users/w/events", json=_events(["i3", "nope"]))
        assert r.status_code == 422 and r.json()["detail"]["unknown"] == ["nope"]
        assert c.get("/v1/users/w/recommendations").json()["cold_start"]  # nothing was stored


def test_a_changed_model_version_rebuilds_the_state_from_the_events(runs, tmp_path):
    with _client(runs["sasrec"], tmp_path) as c:
        c.post("/v1/users/u/events", json=_events(ITEMS[:8]))
        want = c.get("/v1/users/u/recommendations").json()
        svc = c.app.state.service
        with svc.store.user("u") as tx:
            tx.save_state("another-model", "{}", b"")  # as if another checkpoint had built it
        assert c.get("/v1/users/u/recommendations").json() == want
        with svc.store.user("u", write=False) as tx:
            assert tx.state()[0] == svc.engine.version


def test_auth_rejects_missing_and_wrong_tokens(runs, tmp_path):
    with _client(runs["gru4rec"], tmp_path, token="s3cret") as c:
        body = {"history": ["i1"], "k": 2}
        assert c.post("/v1/recommend", json=body).status_code == 401
        assert c.post("/v1/recommend", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.post("/v1/recommend", json=body, headers={"Authorization": "s3cret"}).status_code == 401
        assert c.post("/v1/recommend", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/healthz").status_code == 200  # probes need no token


@pytest.mark.parametrize("bad", [
    ("post", "/v1/recommend", {"history": ["i1"], "k": 0}),
    ("post", "/v1/recommend", {"history": ["i1"], "k": 5000}),
    ("post", "/v1/recommend", {"history": "i1"}),
    ("post", "/v1/recommend", {"history": [True]}),
    ("post", "/v1/recommend", {"history": ["i1"], "extra": 1}),
    ("post", "/v1/recommend", {"history": ["x"] * 10_001}),
    ("post", "/v1/users/u/events", {"events": []}),
    ("post", "/v1/users/u/events", {"events": [{"id": "", "item_id": "i1"}]}),
    ("post", "/v1/users/u/events", {"events": [{"id": "a", "item_id": "i1", "ts": -1}]}),
    ("get", "/v1/users/u/recommendations?k=-1", None),
])
def test_bad_input_is_a_422_that_says_what_is_wrong(bad, runs, tmp_path):
    method, path, body = bad
    with _client(runs["gru4rec"], tmp_path) as c:
        r = c.request(method.upper(), path, json=body)
    # 422, not any 4xx: a renamed route (404) or method (405) must not pass as validation
    assert r.status_code == 422, (r.status_code, r.text[:200])
    assert r.json()["detail"], r.text[:200]


def test_probes_and_metrics(runs, tmp_path):
    app = create_app(runs["sasrec+persrec"], str(tmp_path / "s.sqlite"))
    assert TestClient(app).get("/readyz").status_code == 503  # lifespan not run: no model yet
    with TestClient(app) as c:
        ready = c.get("/readyz").json()
        assert ready["ready"] and ready["model"] == "sasrec+persrec" and ready["state"] == "persrec"
        c.post("/v1/recommend", json={"history": ["i1", "i2"]})
        text = c.get("/metrics").text
    assert 'perseq_requests_total{endpoint="/v1/recommend",method="POST",status="200"} 1.0' in text
    assert "openapi" in TestClient(app).get("/openapi.json").text


def test_state_bytes_round_trip_for_every_kind(runs):
    from perseq.serve.engine import Engine

    for name, run in runs.items():
        e = Engine(run)
        for events in ([3, 4, 5], [(7 * t) % 40 + 1 for t in range(30)]):  # the second slides SASRec's window
            s = e.advance(e.init(), events)
            spec, blob = e.pack(s)
            back = e.unpack(spec, blob)
            if e.kind == "window":  # stored as its window's ids, the KV cache rebuilt in one pass
                assert len(blob) < 1000 and torch.equal(back["window"], s["window"])
                caches = s["s"]["blocks"] if "blocks" in s["s"] else [s["s"]]  # SASRec's per block, HSTU's stacked
                kv = sum(t.nbytes for c in caches for t in c.values() if isinstance(t, torch.Tensor))
                assert e.memory_bytes(s, blob) == len(blob) + kv  # what the state cache counts
                assert torch.allclose(e.state_hidden(back), e.state_hidden(s), atol=1e-5), name
                assert torch.allclose(e.advance(back, [9])["h"], e.advance(s, [9])["h"], atol=1e-5), name
            else:
                assert torch.equal(e.state_hidden(back), e.state_hidden(s)), name


def test_bodies_over_the_limit_are_413_announced_or_streamed(runs, tmp_path):
    from perseq.serve.app import MAX_BODY

    big = b'{"history": [' + b'"i1",' * (MAX_BODY // 5) + b'"i1"]}'
    with _client(runs["gru4rec"], tmp_path) as c:
        assert c.post("/v1/recommend", content=big, headers={"Content-Type": "application/json"}).status_code == 413

        def chunks():  # no Content-Length: a streamed body is counted as it arrives
            for s in range(0, len(big), 65536):
                yield big[s : s + 65536]
        assert c.post("/v1/recommend", content=chunks(), headers={"Content-Type": "application/json"}).status_code == 413


def test_demo_page_history_and_users_endpoints(runs, tmp_path):
    with _client(runs["gru4rec"], tmp_path) as c:
        page = c.get("/")
        assert page.status_code == 200 and "<ol id=\"recs\">" in page.text and "/v1/users/" in page.text
        c.post("/v1/users/a/events", json=_events(["i1", "i2", "i3"]))
        c.post("/v1/users/b/events", json=_events(["i4"]))
        hist = c.get("/v1/users/a/events", params={"limit": 2}).json()
        assert [e["item_id"] for e in hist["events"]] == ["i3", "i2"]  # newest first
        assert c.get("/v1/users").json()["users"] == ["b", "a"]


def test_ml1m_items_carry_their_titles(shared_datasets):
    from perseq.serve.engine import item_titles

    titles = item_titles("ml-1m")
    assert titles["1"] == "Toy Story (1995)" and len(titles) == 3883
    assert any(not t.isascii() for t in titles.values())  # latin-1 decoded, not mangled
    assert item_titles("synthetic") == {}


def test_the_service_on_redis_gives_what_it_gives_on_sqlite(runs, tmp_path, redis_url):
    got = {}
    for store in (str(tmp_path / "s.sqlite"), redis_url):
        with TestClient(create_app(runs["sasrec"], store)) as c:
            c.delete("/v1/users/r")
            first = c.post("/v1/users/r/events", params={"k": 5}, json=_events(ITEMS[:20])).json()
            retry = c.post("/v1/users/r/events", json=_events(ITEMS[:21])).json()
            got[store] = (first["recommendations"], (retry["applied"], retry["duplicates"]),
                          c.get("/v1/users/r/recommendations").json())
    a, b = got.values()
    assert a == b and a[1] == (1, 20)


def test_a_stale_worker_cache_never_brings_back_an_erased_history(runs, tmp_path):
    """Two workers (services) on one store: A caches u's state; B deletes u and posts as
    many new events; A's next post must build on B's, not on what was erased."""
    from perseq.serve.engine import Engine
    from perseq.serve.service import Service
    from perseq.serve.store import SQLiteStore

    e = Engine(runs["gru4rec"])
    a, b = (Service(e, SQLiteStore(tmp_path / "s.sqlite")) for _ in range(2))
    ev = lambda items, tag: [{"id": f"{tag}{i}", "item_id": it} for i, it in enumerate(items)]  # noqa: E731
    a.post_events("u", ev(["i1", "i2", "i3"], "old"))
    assert b.delete("u")
    b.post_events("u", ev(["i7", "i8", "i9"], "new"))
    out = a.post_events("u", ev(["i10"], "more"))
    assert out["n_events"] == 4
    with a.store.user("u", write=False) as tx:
        state = e.unpack(*tx.state()[1:])
    assert sorted(e.item_ids[i] for i in e.seen(state).tolist()) == ["i10", "i7", "i8", "i9"]


def test_the_seen_set_stops_growing_once_a_bitmap_is_smaller(runs):
    """The seen items (exclude_seen's mask) are an index list while short, then a bitmap of
    the catalogue: the same set, and a stored state whose size no longer grows."""
    from perseq.serve.engine import Engine

    e = Engine(runs["gru4rec"])
    e.n_items = 1000  # as if the catalogue were 1,000 items: a 126-byte bitmap, worth it from 16 items on
    s, want, sizes = {}, set(), []
    for t in range(40):
        s = e.add_seen(s, [t + 1])
        want.add(t + 1)
        assert set(e.seen(s).tolist()) == want
        assert s["seen"].dtype == (torch.long if t + 1 < 16 else torch.uint8), t
        sizes.append(len(e.pack({"seen": s["seen"]})[1]))
    assert len(set(sizes[15:])) == 1  # the stored size no longer grows


def test_unknown_items_are_stored_for_a_later_model_but_not_applied(runs, tmp_path):
    with _client(runs["gru4rec"], tmp_path) as c:
        r = c.post("/v1/users/x/events", json=_events(["i1", "new-item"])).json()
        assert (r["applied"], r["unknown"], r["n_events"]) == (1, ["new-item"], 2)
        assert [e["item_id"] for e in c.get("/v1/users/x/events").json()["events"]] == ["new-item", "i1"]
        assert c.post("/v1/users/x/events", json=_events(["i1", "new-item"])).json()["duplicates"] == 2
