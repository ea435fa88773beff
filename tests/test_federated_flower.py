"""The Flower apps (perseq.federated.flower): what crosses the wire, the ClientApp's
handlers called directly, and Flower simulations (Ray) of 4 nodes x 2 rounds on tiny
synthetic data compared with the in-process simulator of the same config.

The simulations start Ray (about 10-20 s each here); the handler tests do not. Everything is
marked ``flower`` and skipped when flwr is not installed (pip install 'perseq[federated]').
"""
import json
import time

import pytest
import torch

flwr = pytest.importorskip("flwr", reason="the Flower apps need flwr[simulation]: pip install 'perseq[federated]'")

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from perseq.checkpoint import load_model  # noqa: E402
from perseq.data.loading import load_data  # noqa: E402
from perseq.data.sequences import make_split  # noqa: E402
from perseq.federated.client import PERSONAL_PREFIX  # noqa: E402
from perseq.federated.flower import records  # noqa: E402
from perseq.federated.flower.client_app import make_client_app  # noqa: E402
from perseq.federated.flower.records import (KEEP_UPTO, PERSONAL_UPTO, ROUND, STAGE, TRAIN_METRICS,  # noqa: E402
                                             FlowerRunConfig, NodeSettings, eval_metric_keys, from_arrays, to_arrays)
from perseq.federated.flower.task import PersonalStore, load_setup  # noqa: E402
from perseq.federated.simulate import simulate  # noqa: E402

pytestmark = pytest.mark.flower

# 8 users in groups of 2: 4 clients, one Flower node each; no dropout, so local training is
# deterministic and the Flower run can be compared with the simulator number for number
TINY = ("data.synthetic.n_users=8 data.synthetic.n_items=20 data.synthetic.n_clusters=2 data.synthetic.mean_len=8 "
        "data.synthetic.seed=3 data.max_len=10 train.seed=0 train.threads=1 eval.ks=[10] "
        "federated.users_per_client=2 federated.rounds=2 federated.clients_per_round=0 federated.engine=loop "
        "federated.local_batch_size=8 federated.local_lr=0.01")
SASREC = TINY + " model.name=sasrec model.d=8 model.dropout=0.0"
# PFSR has personal parameters (personal.scale / .shift): they must stay on the nodes
PFSR = TINY + (" model.name=pfsr model.d=8 model.d_state=4 model.memory_slots=2 model.backend=torch "
               "model.dropout=0.0")
N_NODES = 4


def _cfg(overrides: str):
    return FlowerRunConfig.from_run_config({"set": overrides}).perseq_config()


def _simulate(overrides: str, out):
    cfg = _cfg(overrides)
    data, _ = load_data(cfg.data)
    return simulate(cfg, make_split(data, cfg.data.split), out_dir=out, log=lambda s: None)


# ------------------------------------------------------------------ records (no Ray)
def test_weights_travel_as_float32_with_their_names_in_order():
    w = {"b": torch.randn(3, dtype=torch.float64), "a": torch.randn(2, 2)}
    rec = to_arrays(w, ["b", "a"])
    assert list(rec.keys()) == ["b", "a"] and all(rec[k].numpy().dtype.name == "float32" for k in rec)
    back = from_arrays(rec, ["b", "a"])
    assert torch.equal(back["a"], w["a"]) and torch.allclose(back["b"], w["b"].float())
    with pytest.raises(ValueError, match="floating-point"):
        to_arrays({"ids": torch.arange(3)}, ["ids"])
    with pytest.raises(ValueError, match="missing"):
        to_arrays(w, ["a", "c"])
    with pytest.raises(ValueError, match="extra"):
        from_arrays(rec, ["b"])
    with pytest.raises(ValueError, match="another order"):
        from_arrays(rec, ["a", "b"])


def test_the_run_config_is_read_once_into_a_frozen_dataclass():
    rc = FlowerRunConfig.from_run_config({"perseq.train.lr": 0.005, "perseq.federated.aggregator": "median",
                                          "set": "federated.rounds=7 train.seed=2", "out": "/x", "resume": True})
    cfg = rc.perseq_config()
    assert (cfg.train.lr, cfg.federated.aggregator, cfg.federated.rounds, cfg.train.seed) == (0.005, "median", 7, 2)
    assert rc.out == "/x" and rc.resume and FlowerRunConfig.from_run_config(rc.to_run_config()) == rc
    with pytest.raises(ValueError, match="unknown run config key 'rounds'"):
        FlowerRunConfig.from_run_config({"rounds": 3})
    with pytest.raises(ValueError, match="federated"):  # a perseq typo is perseq's own error
        FlowerRunConfig.from_run_config({"perseq.federated.round": 3}).perseq_config()
    node = NodeSettings.from_node_config({"partition-id": 1, "num-partitions": 4}, "/state")
    assert (node.partition_id, node.num_partitions, str(node.state_dir)) == (1, 4, "/state")
    with pytest.raises(ValueError, match="partition-id"):
        NodeSettings.from_node_config({})
    # a resume may add rounds: the node must find the same personal store
    assert records.run_key(_cfg(SASREC)) == records.run_key(_cfg(SASREC + " federated.rounds=5"))
    assert records.run_key(_cfg(SASREC)) != records.run_key(_cfg(SASREC + " federated.local_lr=0.1"))


def test_personal_store_keeps_what_a_resume_and_the_best_round_need(tmp_path):
    store = PersonalStore(tmp_path)
    assert store.latest(upto=5) is None
    for r in (0, 2, 3, 4):
        store.save(r, {"personal.x": torch.full((2,), float(r))})
    assert store.latest(upto=1)["personal.x"][0] == 0 and store.latest(upto=3)["personal.x"][0] == 3
    store.prune(keep=(3, 1))  # the newest (4), as of round 3 (3) and as of round 1 (0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000000.safetensors", "round-000003.safetensors",
                                                          "round-000004.safetensors"]


# ------------------------------------------------------ the ClientApp's handlers (no Ray)
@pytest.fixture
def task_identity():
    """Messages need a task identity, which a Flower runtime sets in each process."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield


def _train_msg(setup, shared, round_, extra=None):
    config = ConfigRecord({ROUND: round_, KEEP_UPTO: -1, **(extra or {})})
    return Message(RecordDict({"arrays": to_arrays(shared, setup.shared), "config": config}), dst_node_id=7,
                   message_type=MessageType.TRAIN)


def test_client_replies_only_shared_weights_and_the_documented_metrics(tmp_path, task_identity):
    defaults = {"set": PFSR, "client-state-dir": str(tmp_path / "state")}
    setup = load_setup(FlowerRunConfig.from_run_config(defaults).perseq_config())
    assert any(n.startswith(PERSONAL_PREFIX) for n, _ in setup.model.named_parameters())
    assert not any(n.startswith(PERSONAL_PREFIX) for n in setup.shared)
    app = make_client_app(defaults)
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 2, "num-partitions": N_NODES}, state=RecordDict(),
                  run_config={})
    shared = {n: setup.init_state[n] for n in setup.shared}
    reply = app(_train_msg(setup, shared, 0), ctx)
    c = reply.content
    assert list(c.array_records) == ["arrays"] and list(c.metric_records) == ["metrics"] and not c.config_records
    assert list(c["arrays"].keys()) == list(setup.shared)
    assert sorted(c["metrics"].keys()) == sorted(TRAIN_METRICS) and c["metrics"]["num-examples"] > 0
    # the personal parameters went to the node's disk, not into the reply
    files = list((tmp_path / "state").rglob("round-000000.safetensors"))
    assert len(files) == 1 and set(load_file(str(files[0]))) == {"personal.scale", "personal.shift"}
    # and the next round starts from them (a SuperNode restart reads the same files)
    reply1 = app(_train_msg(setup, from_arrays(c["arrays"], setup.shared), 1), ctx)
    assert reply1.content["metrics"]["num-examples"] == c["metrics"]["num-examples"]
    assert len(list((tmp_path / "state").rglob("round-*.safetensors"))) == 2
    ev = app(Message(RecordDict({"arrays": c["arrays"], "config": ConfigRecord({STAGE: "test", PERSONAL_UPTO: 1})}),
                     dst_node_id=7, message_type=MessageType.EVALUATE), ctx)
    assert list(ev.content.metric_records) == ["metrics"] and not ev.content.array_records
    assert sorted(ev.content["metrics"].keys()) == sorted(eval_metric_keys((10,)))
    assert ev.content["metrics"]["num-examples"] == 2  # the node's 2 users


def test_client_clips_its_update_when_the_dp_wrapper_asks(tmp_path, task_identity):
    defaults = {"set": SASREC + " federated.local_lr=0.5", "client-state-dir": str(tmp_path)}
    setup = load_setup(FlowerRunConfig.from_run_config(defaults).perseq_config())
    app = make_client_app(defaults)
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": N_NODES}, state=RecordDict(),
                  run_config={})
    shared = {n: setup.init_state[n] for n in setup.shared}

    def norm(msg):
        new = from_arrays(msg.content["arrays"], setup.shared)
        return torch.sqrt(sum(((new[n] - shared[n]).double() ** 2).sum() for n in setup.shared)).item()

    free = norm(app(_train_msg(setup, shared, 0), ctx))
    assert free > 0.1
    clipped = norm(app(_train_msg(setup, shared, 0, {"clipping_norm": 0.1}), ctx))
    assert clipped == pytest.approx(0.1, rel=1e-4)


def test_a_federation_that_does_not_match_the_clients_is_refused():
    setup = load_setup(_cfg(SASREC))
    with pytest.raises(ValueError, match="4 clients, but the federation has num-partitions=3"):
        setup.client_of(0, 3)


def test_sampling_returns_registered_node_ids_even_above_2_to_the_63():
    # Flower's node ids are unsigned 64-bit; a list of them mixing values above 2**63 with
    # smaller ones once went through numpy as float64 and came back as ids no node has
    from perseq.federated.config import FederatedConfig
    from perseq.federated.flower.strategy import PerseqFedAvg
    from perseq.federated.strategies import ServerOptConfig, ServerOptimizer

    ids = [2**64 - 1 - 7 * i for i in range(5)] + [12345 + i for i in range(5)]

    class Grid:
        def get_node_ids(self):
            return list(ids)

    strategy = PerseqFedAvg(FederatedConfig(clients_per_round=4), ServerOptimizer(ServerOptConfig()), ("w",),
                            n_clients=len(ids), seed=0)
    picks = [strategy.sample(Grid(), r) for r in range(6)]
    assert all(len(p) == 4 and set(p) <= set(ids) for p in picks)
    assert picks[0] == strategy.sample(Grid(), 0)  # a function of (seed, round)
    assert len({tuple(p) for p in picks}) > 1


# --------------------------------------------------------------- Flower simulations (Ray)
def _run_flower(defaults: dict, secagg: bool = False):
    """A Flower simulation of N_NODES nodes; -> (wall seconds, every reply the server received)."""
    from flwr.simulation import run_simulation

    from perseq.federated.flower.client_app import make_secagg_client_app
    from perseq.federated.flower.server_app import make_secagg_server_app, make_server_app

    replies = []
    if secagg:
        server, client = make_secagg_server_app(defaults), make_secagg_client_app(defaults)
    else:
        server, client = make_server_app(defaults, audit=replies.append), make_client_app(defaults)
    t0 = time.perf_counter()
    run_simulation(server_app=server, client_app=client, num_supernodes=N_NODES,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    return time.perf_counter() - t0, replies


def _max_diff(a, b) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def sasrec_runs(tmp_path_factory):
    """The SASRec config on Flower (round 1, then resumed for round 2, as after a kill) and
    in the simulator (2 rounds straight)."""
    tmp = tmp_path_factory.mktemp("flower-sasrec")
    defaults = {"set": SASREC + " federated.rounds=1", "out": str(tmp / "flower"), "client-state-dir": str(tmp / "nodes")}
    secs1, replies1 = _run_flower(defaults)
    secs2, replies2 = _run_flower({**defaults, "set": SASREC, "resume": True})
    sim = _simulate(SASREC, tmp / "sim")
    print(f"\nflower sasrec: round 1 {secs1:.1f}s, resumed round 2 {secs2:.1f}s")
    return tmp, replies1 + replies2, sim


def test_flower_simulation_runs_end_to_end_and_resumes(sasrec_runs, capsys):
    tmp, _, _ = sasrec_runs
    out = tmp / "flower"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["round"] == 2 and [h["reported"] for h in state["history"]] == [N_NODES, N_NODES]
    result = json.loads((out / "results.json").read_text())
    assert result["engine"] == "flower" and result["epochs"] == 2 and result["test"]["n_users"] == 8
    _, meta, _ = load_model(out)  # a normal run folder: perseq evaluate / predict read it
    assert meta["engine"] == "flower"
    from perseq.cli import main

    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 0
    printed = capsys.readouterr().out
    central = json.loads(printed[printed.index("{"):])  # the best round's model, scored in one process
    assert central["ndcg@10"] == pytest.approx(result["test"]["ndcg@10"], abs=1e-9)


def test_flower_and_the_simulator_compute_the_same_global_model(sasrec_runs):
    tmp, _, sim = sasrec_runs
    flower, ref = load_file(str(tmp / "flower" / "last.safetensors")), load_file(str(tmp / "sim" / "last.safetensors"))
    # not bit for bit: the server sums the 4 float32 updates in node-id order, the simulator
    # in client order (a Flower reply names no client), which can change the last bit
    print(f"\nflower vs simulator (sasrec, 2 rounds, resumed after 1): max |diff| {_max_diff(flower, ref):.2e}")
    assert _max_diff(flower, ref) <= 1e-5
    result = json.loads((tmp / "flower" / "results.json").read_text())
    assert result["best_round"] == sim["best_round"]
    assert result["test"]["ndcg@10"] == pytest.approx(sim["test"]["ndcg@10"], abs=1e-6)


def test_every_client_message_holds_shared_weights_and_the_documented_metrics_only(sasrec_runs):
    tmp, replies, _ = sasrec_runs
    shared = list(load_setup(_cfg(SASREC)).shared)
    trains = [m for m in replies if m.metadata.message_type == MessageType.TRAIN]
    evals = [m for m in replies if m.metadata.message_type == MessageType.EVALUATE]
    # 2 rounds of 4 nodes; validation after each round and the final valid and test, in the
    # first run (round 1) and the resumed one (round 2): every node each time
    assert len(trains) == 2 * N_NODES and len(evals) == (1 + 2 + 1 + 2) * N_NODES
    for m in trains:
        c = m.content
        assert not m.has_error() and not c.config_records
        assert list(c.array_records) == ["arrays"] and list(c["arrays"].keys()) == shared
        assert all(a.numpy().dtype.kind == "f" and a.numpy().dtype.itemsize == 4 for a in c["arrays"].values())
        assert list(c.metric_records) == ["metrics"] and sorted(c["metrics"].keys()) == sorted(TRAIN_METRICS)
    for m in evals:
        c = m.content
        assert not c.array_records and not c.config_records and list(c.metric_records) == ["metrics"]
        assert sorted(c["metrics"].keys()) == sorted(eval_metric_keys((10,)))


def test_pfsr_on_flower_keeps_personal_parameters_on_the_nodes(tmp_path):
    defaults = {"set": PFSR, "out": str(tmp_path / "flower"), "client-state-dir": str(tmp_path / "nodes")}
    secs, replies = _run_flower(defaults)
    print(f"\nflower pfsr: {secs:.1f}s")
    sim = _simulate(PFSR, tmp_path / "sim")
    flower, ref = load_file(str(tmp_path / "flower" / "last.safetensors")), load_file(str(tmp_path / "sim" / "last.safetensors"))
    # the shared weights agree; the server's personal.* are the untouched initial values
    print(f"\npfsr flower vs simulator: max |diff| {_max_diff(flower, ref):.2e}")
    assert _max_diff({k: v for k, v in flower.items() if not k.startswith(PERSONAL_PREFIX)},
                     {k: v for k, v in ref.items() if not k.startswith(PERSONAL_PREFIX)}) <= 1e-5
    for m in replies:
        assert not any(k.startswith(PERSONAL_PREFIX) for r in m.content.array_records.values() for k in r.keys())
    stored = sorted(p.relative_to(tmp_path / "nodes").parts[1:] for p in (tmp_path / "nodes").rglob("*.safetensors"))
    assert stored == [(f"client-{c}", f"round-00000{r}.safetensors") for c in range(N_NODES) for r in (0, 1)]
    # each node's own personal state equals the simulator's for its client. Round 0 moved it
    # from the initial values (the server's untouched personal.*) by far more than that
    # tolerance, so the match also shows that round 1 started from the node's round-0 state
    # (the simulator carries it over): a node that restarted from the initial values would be
    # off by about round 0's step
    sim_personal = load_file(str(tmp_path / "sim" / "personal.safetensors"))
    for c in range(N_NODES):
        mine, before = (load_file(str(next((tmp_path / "nodes").rglob(f"client-{c}/round-00000{r}.safetensors")))) for r in (1, 0))
        for n, t in mine.items():
            assert (t - sim_personal[f"last/{c}/{n}"]).abs().max().item() <= 1e-5
            assert (before[n] - flower[n]).abs().max().item() > 1e-3, (c, n)
    result = json.loads((tmp_path / "flower" / "results.json").read_text())
    assert result["test"]["ndcg@10"] == pytest.approx(sim["test"]["ndcg@10"], abs=1e-6)


def test_client_level_dp_with_flowers_wrapper_and_clipping_mod(tmp_path):
    clip, z = 0.05, 0.5
    dp = SASREC + f" federated.rounds=1 federated.dp_clip={clip} federated.dp_noise={z}"
    secs, replies = _run_flower({"set": dp, "out": str(tmp_path / "flower"), "client-state-dir": str(tmp_path / "n")})
    print(f"\nflower dp: {secs:.1f}s")
    setup = load_setup(_cfg(dp))
    start = {n: setup.init_state[n] for n in setup.shared}
    updates = [{n: t - start[n] for n, t in from_arrays(m.content["arrays"], setup.shared).items()}
               for m in replies if m.metadata.message_type == MessageType.TRAIN]
    assert len(updates) == N_NODES
    for u in updates:  # fixedclipping_mod clipped every update on its node, before it left
        assert torch.sqrt(sum((t.double() ** 2).sum() for t in u.values())).item() <= clip * (1 + 1e-4)
    # the released model is DP-FedAvg's: the clipped updates summed over the 4 sampled
    # clients, divided by 4, plus Flower's Gaussian noise of std z * clip / 4
    last = load_file(str(tmp_path / "flower" / "last.safetensors"))
    noise = torch.cat([(last[n] - start[n] - sum(u[n] for u in updates) / N_NODES).flatten() for n in setup.shared])
    assert noise.std().item() == pytest.approx(z * clip / N_NODES, rel=0.1) and abs(noise.mean().item()) < 1e-3
    state = json.loads((tmp_path / "flower" / "trainer_state.json").read_text())
    assert 0 < state["history"][0]["epsilon"] < float("inf")
    result = json.loads((tmp_path / "flower" / "results.json").read_text())
    assert result["federated"]["privacy"]["rounds"] == 1 and result["model"].endswith("+dp")


def test_secagg_plus_legacy_workflow_matches_the_simulator_to_quantization(tmp_path):
    # one round: SecAgg+ quantizes each weighted update to 2**22 levels over [-8, 8]
    # (stochastic rounding; the weights num-examples / max_weight to as many levels), so the
    # securely summed mean update is the simulator's to about 1e-5 per coordinate. A second
    # round would not compare: local Adam turns such differences into up to ±lr steps on
    # coordinates whose gradient is near zero (measured: 6e-3 after 2 rounds at lr 1e-2)
    one = SASREC + " federated.rounds=1"
    defaults = {"set": one, "out": str(tmp_path / "flower"), "client-state-dir": str(tmp_path / "n")}
    secs, _ = _run_flower(defaults, secagg=True)
    print(f"\nflower secagg+: {secs:.1f}s")
    _simulate(one, tmp_path / "sim")
    flower, ref = load_file(str(tmp_path / "flower" / "last.safetensors")), load_file(str(tmp_path / "sim" / "last.safetensors"))
    print(f"\nsecagg+ vs simulator (1 round): max |diff| {_max_diff(flower, ref):.2e}")
    assert _max_diff(flower, ref) <= 1e-4
    result = json.loads((tmp_path / "flower" / "results.json").read_text())
    assert result["model"].endswith("+secagg") and result["epochs"] == 1 and result["test"]["n_users"] == 8


# ------------------------------------------------- a deployment on loopback (subprocesses)
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, seconds: float) -> bool:
    import socket

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.5)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("secure", [False, True], ids=["insecure", "tls-and-node-auth"])
def test_superlink_and_two_supernodes_on_loopback_run_the_example_app(tmp_path, secure):
    """flower-superlink + 2 flower-supernode (partition-id 0 and 1) + `flwr run` of
    examples/flower-app, all on 127.0.0.1, in this environment (runtime dependency
    installation off), Flower's home in tmp_path. ``secure``: as the example's README
    deploys it, with TLS (the credentials of examples/flower-app/make_credentials.sh) and
    node authentication on (each SuperNode's public key registered before it starts)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    bindir = Path(sys.executable).parent
    app_dir = Path(__file__).resolve().parents[1] / "examples" / "flower-app"
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    port = _free_port()  # flwr 1.42: one HTTP port for the Fleet, Control and Runtime APIs
    creds = tmp_path / "credentials"
    if secure:
        subprocess.run(["bash", str(app_dir / "make_credentials.sh"), str(creds), "2", "127.0.0.1"], check=True,
                       capture_output=True)
    tls = f'root-certificates = "{creds / "ca.crt"}"' if secure else "insecure = true"
    (home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n'
                                      f'[superlink.loopback]\naddress = "127.0.0.1:{port}"\n{tls}\n')
    link_security = ["--ssl-ca-certfile", str(creds / "ca.crt"), "--ssl-certfile", str(creds / "server.pem"),
                     "--ssl-keyfile", str(creds / "server.key"), "--enable-supernode-auth"] if secure else ["--insecure"]
    procs = []

    def start(name, *args):
        log = open(tmp_path / f"{name}.log", "w")
        procs.append(subprocess.Popen([str(bindir / args[0]), *args[1:]], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))

    t0 = time.perf_counter()
    try:
        start("superlink", "flower-superlink", *link_security, "--disable-runtime-dependency-installation",
              "--port", str(port), "--database", str(tmp_path / "state.db"))
        assert _wait_for_port(port, 120), (tmp_path / "superlink.log").read_text()[-2000:]
        for i in range(2):
            node_security = ["--insecure"]
            if secure:  # register the node's public key first: the SuperLink refuses unknown nodes
                reg = subprocess.run([str(bindir / "flwr"), "supernode", "register", str(creds / f"node{i}.pub"),
                                      "loopback"], env=env, capture_output=True, text=True, timeout=60)
                assert reg.returncode == 0, reg.stdout[-2000:] + reg.stderr[-2000:]
                node_security = ["--root-certificates", str(creds / "ca.crt"),
                                 "--auth-supernode-private-key", str(creds / f"node{i}")]
            start(f"node{i}", "flower-supernode", *node_security, "--superlink", f"127.0.0.1:{port}",
                  "--port", str(_free_port()),
                  "--node-config", f'partition-id={i} num-partitions=2 state-dir="{tmp_path / f"node{i}"}"')
        # the example's config, with 2 clients of 4 users (one per SuperNode) and one round
        overrides = SASREC.replace("federated.users_per_client=2", "federated.users_per_client=4") + \
            " federated.rounds=1"
        run = subprocess.run([str(bindir / "flwr"), "run", str(app_dir), "loopback", "--stream", "--run-config",
                              f'set="{overrides}" out="{tmp_path / "run"}"'],
                             env=env, capture_output=True, text=True, timeout=400)
        secs = time.perf_counter() - t0
        print(f"\nflower deployment (superlink + 2 supernodes + flwr run, 1 round, secure={secure}): {secs:.1f}s")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["engine"] == "flower" and result["federated"]["clients"] == 2 and result["test"]["n_users"] == 8
    sim = _simulate(overrides, tmp_path / "sim")
    assert _max_diff(load_file(str(tmp_path / "run" / "last.safetensors")),
                     load_file(str(tmp_path / "sim" / "last.safetensors"))) <= 1e-5
    assert result["test"]["ndcg@10"] == pytest.approx(sim["test"]["ndcg@10"], abs=1e-6)
