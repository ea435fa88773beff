"""Latency and throughput of ``perseq serve`` under concurrent load, measured with wrk.

    perseq bench serve runs/ml-1m-mamba4rec-s0 --model mamba4rec --concurrency 1,8,32 --workers 1,2 \\
        --histories 50,5000 --out benchmarks/results/serve_mamba4rec.json

For each number of uvicorn workers, a fresh server is started with its own store (``--store
sqlite``: a SQLite file; ``redis``: a fresh redis-server on a loopback port, what replicas on
several machines would share); before
each concurrency level, fresh users are given ``history`` events each (random items of the
run's catalogue: long synthetic histories), then wrk (Debian's package, one connection per
concurrent client) drives

* ``/v1/recommend``: a stateless request carrying the whole history, k 10;
* ``/events+recs``: ``POST /v1/users/{id}/events?k=10`` with one new event (a fresh id)
  for one of the users, round robin, and the new top 10 in the response.

wrk (one thread) runs on the same 2 cores as the server (not pinned). One JSON row per measurement:
endpoint, model, store, workers, concurrency, history_len, p50_ms, p99_ms, rps, errors, hardware,
commit.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..report import write_result_file

EVENTS_LUA = """
local users, items, runid, prefix = %(users)d, {%(items)s}, "%(runid)s", "%(prefix)s"
local counter, threads = 0, 0
function setup(thread) thread:set("tid", threads); threads = threads + 1 end
function request()
  counter = counter + 1
  local user = prefix .. ((counter * 7 + tid) %% users)
  local item = items[(counter %% #items) + 1]
  local body = '{"events":[{"id":"' .. runid .. '-' .. tid .. '-' .. counter .. '","item_id":"' .. item .. '"}]}'
  return wrk.format("POST", "/v1/users/" .. user .. "/events?k=10", {["Content-Type"] = "application/json"}, body)
end
"""

RECOMMEND_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '%(body)s'
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: str, store: str, workers: int):
    """``perseq serve`` in its own process group on a free loopback port, once /readyz
    answers -> (process, base url). Its stderr is kept for the error if it dies starting."""
    import httpx

    port = _free_port()
    p = subprocess.Popen([sys.executable, "-m", "perseq.cli", "serve", run, "--store", store, "--port", str(port),
                          "--workers", str(workers)], start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return p, url
        except httpx.HTTPError:
            pass
        if p.poll() is not None:
            raise RuntimeError("perseq serve exited during start-up: " + p.stderr.read().decode()[-2000:])
        time.sleep(0.1)
    raise TimeoutError("perseq serve did not become ready in 120 s")


def start_redis(tmp: str):
    """A throwaway redis-server (no persistence) on a free loopback port -> (process, url)."""
    import redis

    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
    port = _free_port()
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--dir", tmp], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            redis.Redis.from_url(url).ping()
            return p, url
        except redis.ConnectionError:
            time.sleep(0.05)
    p.kill()
    raise TimeoutError("redis-server did not answer in 5 s")


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def parse_wrk(out: str) -> dict:
    """p50/p99 (ms), requests per second and errors from wrk --latency output."""
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, flags=re.M))
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"p50_ms": _ms(lat["50"]), "p99_ms": _ms(lat["99"]), "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "errors": errors + (int(non2xx.group(1)) if non2xx else 0)}


def run_wrk(url: str, path: str, script: str, concurrency: int, seconds: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    try:
        threads = 1  # one wrk thread drives every connection: fewer threads fighting the server for 2 cores
        out = subprocess.run(["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{seconds}s", "--latency", "--timeout", "10s",
                              "-s", f.name, url + path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return parse_wrk(out)


def main(argv=None) -> None:
    import httpx

    from ..checkpoint import load_model
    import torch

    from ..report import git_commit, hardware_name

    ap = argparse.ArgumentParser(prog="perseq bench serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a trained run folder")
    ap.add_argument("--model", help="the model's name in the rows (default: the run's model.name)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--histories", default="50,5000", help="events per user before the measurement")
    ap.add_argument("--users", type=int, default=16, help="users given a history (the events go round robin)")
    ap.add_argument("--store", choices=("sqlite", "redis"), default="sqlite",
                    help="where the server keeps user states: a SQLite file, or a fresh local redis-server")
    ap.add_argument("--seconds", type=int, default=10, help="wrk duration per measurement")
    ap.add_argument("--out", required=True, help="JSON file of the rows")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)  # the rows' hardware line names one thread: each server worker's
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
    _, meta, item_ids = load_model(a.run)
    model = a.model or meta["run"]["model"]["name"]
    rng = random.Random(0)
    catalogue = [str(x) for x in item_ids[1:]]
    rows = []
    for workers in [int(w) for w in a.workers.split(",")]:
        for hist in [int(h) for h in a.histories.split(",")]:
            with tempfile.TemporaryDirectory() as tmp:
                redis_server, store = start_redis(tmp) if a.store == "redis" else (None, str(Path(tmp) / "state.sqlite"))
                server, url = start_server(a.run, store, workers)
                try:
                    def populate(prefix):  # fresh users, each given `hist` events, 1,000 a post
                        with httpx.Client(base_url=url, timeout=600) as c:
                            for u in range(a.users):
                                items = [rng.choice(catalogue) for _ in range(hist)]
                                for s in range(0, hist, 1000):
                                    ev = [{"id": f"h{s + i}", "item_id": it} for i, it in enumerate(items[s : s + 1000])]
                                    c.post(f"/v1/users/{prefix}{u}/events", json={"events": ev}).raise_for_status()

                    def events_script(prefix, runid):
                        return EVENTS_LUA % {"users": a.users, "items": sample, "runid": runid, "prefix": prefix}

                    history = json.dumps({"history": [rng.choice(catalogue) for _ in range(hist)], "k": 10})
                    sample = ",".join(f'"{rng.choice(catalogue)}"' for _ in range(256))
                    # warm-up, not measured, with enough connections to reach every worker: JIT
                    # kernels, first-call allocations
                    top = max(int(x) for x in a.concurrency.split(","))
                    populate("warm")
                    run_wrk(url, "/v1/recommend", RECOMMEND_LUA % {"body": history}, top, 4)
                    run_wrk(url, "/", events_script("warm", "warm"), top, 4)
                    for conc in [int(x) for x in a.concurrency.split(",")]:
                        # every events row starts from users with exactly `hist` events (they gain
                        # about rps x seconds / users more during the row)
                        prefix = f"c{conc}u"
                        populate(prefix)
                        for endpoint, path, script in (
                                ("/v1/recommend", "/v1/recommend", RECOMMEND_LUA % {"body": history}),
                                ("/events+recs", "/", events_script(prefix, f"w{workers}c{conc}"))):
                            r = run_wrk(url, path, script, conc, a.seconds)
                            row = {"endpoint": endpoint, "model": model, "store": a.store, "workers": workers, "concurrency": conc,
                                   "history_len": hist, **r, "hardware": hardware_name("cpu"), "commit": git_commit()}
                            rows.append(row)
                            print(json.dumps(row), flush=True)
                finally:
                    os.killpg(server.pid, signal.SIGTERM)
                    server.wait(60)
                    if redis_server is not None:
                        os.killpg(redis_server.pid, signal.SIGTERM)
                        redis_server.wait(60)
    write_result_file(a.out, {"benchmark": "serve", "run": a.run, "model": model, "seconds": a.seconds,
                              "users": a.users, "load_tool": "wrk 4.1.0 (Debian), same 2 cores, not pinned",
                              "rows": rows})
