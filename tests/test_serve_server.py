"""perseq serve as a real server on loopback: several workers, concurrent posts, kill -9."""
import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from perseq.bench.serve import start_server  # noqa: E402
from perseq.cli import main  # noqa: E402

pytestmark = pytest.mark.slow


def test_concurrent_posts_from_two_workers_lose_nothing_and_kill_9_loses_no_acknowledged_event(tmp_path):
    assert main(["train", "--set", "data.synthetic={n_users: 40, n_items: 40, n_clusters: 4, mean_len: 20, max_len: 40}",
                 "--set", "model.name=gru4rec", "--set", "model.d=16", "--set", "train.epochs=1",
                 "--out", str(tmp_path), "--name", "g", "--no-progress"]) == 0
    run, store = str(tmp_path / "g-s0"), str(tmp_path / "state.sqlite")
    server, url = start_server(run, store, workers=2)
    try:
        def post(i):  # 8 clients, 10 posts each, 3 events a post, all for one user
            with httpx.Client(base_url=url, timeout=30) as c:
                for j in range(10):
                    ev = [{"id": f"c{i}-{j}-{e}", "item_id": f"i{(i * 7 + j + e) % 40}"} for e in range(3)]
                    r = c.post("/v1/users/hot/events", json={"events": ev})
                    assert r.status_code == 200, r.text
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(post, range(8)))
        # exclude_seen off: the user has seen most of the 40 items
        before = httpx.get(f"{url}/v1/users/hot/recommendations", params={"k": 5, "exclude_seen": False}).json()
        # the state the workers built between them (each caching what it last committed) is
        # the state of the stored events, in their stored order
        events = httpx.get(f"{url}/v1/users/hot/events", params={"limit": 1000}).json()["events"][::-1]
        assert len(events) == 240
        replay = httpx.post(f"{url}/v1/recommend", json={"history": [e["item_id"] for e in events], "k": 5,
                                                                   "exclude_seen": False}).json()
        assert [x["item_id"] for x in replay["items"]] == [x["item_id"] for x in before["items"]]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(replay["items"], before["items"])) < 1e-4
        # /metrics counts what both workers answered, whichever one is asked
        text = httpx.get(f"{url}/metrics").text
        posts = re.search(r'perseq_requests_total\{endpoint="/v1/users/\{user_id\}/events",method="POST",status="200"\} ([\d.]+)', text)
        assert posts is not None and float(posts.group(1)) == 80, text[-2000:]  # the posts; the GET above apart
        gets = re.search(r'perseq_requests_total\{endpoint="/v1/users/\{user_id\}/events",method="GET",status="200"\} ([\d.]+)', text)
        assert gets is not None and float(gets.group(1)) == 1
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # no shutdown, no flush: kill -9 of the server and its workers
        server.wait()
    server, url = start_server(run, store, workers=1)
    try:
        # every acknowledged event is there: all 240 ids are duplicates now, and the count is exact
        ev = [{"id": f"c{i}-{j}-{e}", "item_id": "i1"} for i in range(8) for j in range(10) for e in range(3)]
        r = httpx.post(f"{url}/v1/users/hot/events", json={"events": ev}).json()
        assert (r["applied"], r["duplicates"], r["n_events"]) == (0, 240, 240)
        assert httpx.get(f"{url}/v1/users/hot/recommendations", params={"k": 5, "exclude_seen": False}).json() == before
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def test_bench_serve_drives_both_endpoints_with_wrk_and_every_request_succeeds(tmp_path, wrk):
    """The wrk loop of ``perseq bench serve`` end to end: its Lua scripts must build requests
    the server accepts (a malformed body or a wrong path would come back as non-2xx, which the
    rows count as errors), and the rows must carry what BENCHMARKS.md reads from them."""
    import json

    assert main(["train", "--set", "data.synthetic={n_users: 40, n_items: 40, n_clusters: 4, mean_len: 20, max_len: 40}",
                 "--set", "model.name=gru4rec", "--set", "model.d=16", "--set", "train.epochs=1",
                 "--out", str(tmp_path), "--name", "g", "--no-progress"]) == 0
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", str(tmp_path / "g-s0"), "--concurrency", "2", "--workers", "1", "--histories", "30",
                 "--users", "3", "--seconds", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert [(r["endpoint"], r["workers"], r["concurrency"], r["history_len"]) for r in rows] == \
        [("/v1/recommend", 1, 2, 30), ("/events+recs", 1, 2, 30)]
    for r in rows:
        assert r["errors"] == 0, r
        assert r["rps"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"], r
        assert r["model"] == "gru4rec" and r["store"] == "sqlite"
