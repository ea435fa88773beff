"""What a federated round costs on this machine: seconds per round of the in-process
simulator (each engine, at several clients per round), its peak memory, the bytes each
client sends and receives, and a round of the Flower engine (Ray simulation) of the same size.

    perseq bench federated --config configs/ml-1m/mamba4rec-fedavg.yaml --set federated.local_epochs=1 \\
        --clients 256,2048 --engines loop,batched --flower 256 --out benchmarks/results/federated_speed_cpu.json

Every measurement runs in its own process, so its peak resident memory (``peak_rss_gib``)
is its own. A measurement trains 2 rounds from the config's round-0 model, one local epoch
each unless the config says otherwise, and reports both rounds' seconds; the second is the
steady figure (the first pays one-off costs: allocator warm-up, first-touch pages, the
kernels' compilation). The evaluation after the last round is not in these seconds.

The Flower measurement registers one SuperNode per client of the data (one user each) in
Flower's simulation engine, samples ``--flower`` of them per round as the simulator does,
times round 2 from the server's run folder, and stops the federation there (its full
evaluation over every node is not part of a round). Flower's round seconds run from the end of
one round to the end of the next, so they include the server committing its round state; the
simulator's leave that out (a few milliseconds at ML-1M's size).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..report import write_result_file


def _one_simulator(config: str, overrides: list[str]) -> dict:
    """Runs in the child: 2 rounds of the simulator; -> the rounds' seconds, bytes, peak RSS."""
    from ..config import load_config
    from ..data.loading import load_data
    from ..data.sequences import make_split
    from ..federated.simulate import simulate
    from ..runtime import use_threads

    cfg = load_config(config, overrides + ["federated.rounds=2", "federated.eval_every=1000"])
    use_threads(cfg.train.threads, log=lambda s: None)
    data, _ = load_data(cfg.data, log=lambda s: None)
    split = make_split(data, cfg.data.split)
    res = simulate(cfg, split, out_dir=None, log=lambda s: print(s, file=sys.stderr))
    h = res["history"]
    return {"round_seconds": [r["seconds"] for r in h], "clients_reported": [r["reported"] for r in h],
            "bytes_per_client_per_round": res["federated"]["bytes_per_client_per_round"],
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _child(args: list[str], timeout: float) -> dict:
    proc = subprocess.run([sys.executable, "-m", "perseq.bench.federated", *args], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _flower_round(config: str, overrides: list[str], clients: int, timeout: float) -> dict:
    """One Flower simulation with a SuperNode per client; -> the seconds of rounds 1 and 2
    as the server's run folder records them (round 1 includes the nodes' registration)."""
    from ..config import load_config
    from ..data.loading import load_data
    from ..federated.partition import partition

    cfg = load_config(config, overrides)
    data, _ = load_data(cfg.data, log=lambda s: None)
    n_nodes = len(partition(data.n_users, cfg.federated.users_per_client, cfg.train.seed))
    out = Path(tempfile.mkdtemp(prefix="perseq-bench-flower-"))
    sets = " ".join(overrides + [f"federated.clients_per_round={clients}", "federated.rounds=3",
                                 "federated.eval_every=1000"])
    script = (
        "import json, sys\n"
        "from flwr.simulation import run_simulation\n"
        "from perseq.federated.flower.client_app import make_client_app\n"
        "from perseq.federated.flower.server_app import make_server_app\n"
        f"d = {{'config': {config!r}, 'set': {sets!r}, 'out': {str(out / 'server')!r}, "
        f"'client-state-dir': {str(out / 'nodes')!r}}}\n"
        f"run_simulation(server_app=make_server_app(d), client_app=make_client_app(d), num_supernodes={n_nodes}, "
        "backend_config={'client_resources': {'num_cpus': 1, 'num_gpus': 0.0}})\n")
    t0 = time.perf_counter()
    log = open(out / "log", "w")
    # its own session: killing the group stops the driver and the Ray processes it started,
    # and nothing else (another Flower run or test on this machine keeps its Ray)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=log,
                            start_new_session=True)
    state_file = out / "server" / "trainer_state.json"
    failed = False
    try:
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                failed = True
                raise RuntimeError(f"the Flower simulation ended early; its log: {out / 'log'}")
            if state_file.exists():
                try:
                    state = json.loads(state_file.read_text())
                except json.JSONDecodeError:  # being replaced right now
                    state = {"round": 0}
                if state["round"] >= 2:
                    h = state["history"]
                    return {"nodes": n_nodes, "round_seconds": [h[0]["seconds"], h[1]["seconds"]],
                            "clients_reported": [h[0]["reported"], h[1]["reported"]],
                            "wall_seconds_to_round_2": time.perf_counter() - t0}
            time.sleep(1.0)
        failed = True
        raise TimeoutError(f"no second Flower round within {timeout:.0f} s; its log: {out / 'log'}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray workers
        except ProcessLookupError:  # it had already ended
            pass
        proc.wait()
        log.close()
        if not failed:  # the run folder and one state folder per node; a failure keeps its log
            shutil.rmtree(out, ignore_errors=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="perseq bench federated", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/ml-1m/mamba4rec-fedavg.yaml", help="a federated run config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config value")
    ap.add_argument("--clients", default="256,2048", help="clients per round, comma-separated")
    ap.add_argument("--engines", default="loop,batched", help="simulator engines, comma-separated (loop, batched)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each measurement")
    ap.add_argument("--flower", type=int, default=0, metavar="N", help="also time a Flower round of N clients "
                    "(0: no; needs flwr[simulation])")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one measurement may take")
    ap.add_argument("--out", help="JSON file to write")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: the child process of one measurement
    a = ap.parse_args(argv)
    base = a.set + [f"train.threads={a.threads}"]
    if a.one:
        print(json.dumps(_one_simulator(a.config, base + a.one.split())))
        return {}
    rows = []
    for clients in [int(c) for c in a.clients.split(",")]:
        for engine in a.engines.split(","):
            one = f"federated.engine={engine} federated.clients_per_round={clients}"
            r = _child(["--config", a.config, "--one", one, *sum((["--set", s] for s in base), [])], a.timeout)
            rows.append({"engine": engine, "clients_per_round": clients, **r})
            print(f"{engine:8s} {clients:5d} clients: rounds {', '.join(f'{s:.1f}' for s in r['round_seconds'])} s, "
                  f"peak {r['peak_rss_gib']:.2f} GiB", file=sys.stderr)
    if a.flower:
        r = _flower_round(a.config, base, a.flower, a.timeout)
        rows.append({"engine": "flower", "clients_per_round": a.flower, **r})
        print(f"flower   {a.flower:5d} clients: rounds {', '.join(f'{s:.1f}' for s in r['round_seconds'])} s "
              f"({r['nodes']} nodes)", file=sys.stderr)
    import torch

    torch.set_num_threads(a.threads)  # as the measurements ran: the result's hardware line names the thread count
    result = {"config": a.config, "overrides": a.set, "threads": a.threads, "rows": rows}
    if a.out:
        write_result_file(a.out, result)
    return result


if __name__ == "__main__":
    main()
