"""The in-process federated simulator: every round's sampling, local training, aggregation
and evaluation in one process, resumable round by round. The reference engine (``loop``)
runs the sampled clients one after another through ``client.local_update``, i.e. through
the library's ``train_step``; it is what tests and benchmarks compare others to.

A run folder is a normal one (``perseq evaluate`` and ``predict`` read it):
  config.json, vocab/            as ``perseq train`` writes them
  model.safetensors              the global weights of the best round (validation)
  last.safetensors               the global weights after the last finished round
  server_state.safetensors       the server optimizer's buffers and the RNG state
  personal.safetensors           the simulated devices' storage: each client's personal
                                 parameters (models with ``personal.*`` ones), never
                                 mixed into the shared weights
  trainer_state.json             round, best, patience counter, per-round history
  results.json                   at the end: validation and test of the best round
  curve.png                      at the end: the validation metric per round
Each round's files are one ``checkpoint.commit`` set, so a kill at any moment resumes
from the last finished round and ends with the same model as an uninterrupted run.

Per round (round r, seeds derived from train.seed and r, so resuming changes nothing):
  1. sample ``clients_per_round`` of the clients that hold training windows;
  2. each sampled client drops out with probability ``dropout`` and misses the deadline
     with probability ``stragglers``: its update never counts (and nothing it did is kept);
  3. the others train locally and send ``ClientUpdate``s;
  4. the server aggregates them (``strategies.aggregate``, or ``privacy.dp_aggregate``
     with client-level DP) and steps its optimizer;
  5. every ``eval_every`` rounds the global model is scored on every user's validation
     event (with one user per client: each client scores its own event and the server
     averages, which is this number); the best round's weights are kept, and
     ``patience`` evaluations without improvement stop the run.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..checkpoint import commit, json_writer, read_json, read_run_file, recover, tensors_writer, write_results, write_run_files
from ..data.batching import TrainWindows
from ..data.sequences import Split
from ..evaluate import evaluate, train_item_counts
from ..losses import get_loss
from ..report import hardware_name
from ..train import check_same_run, prepare_run_folder, run_model, seed_everything, select_device
from .batched import batched_updates
from .compress import compress_update, round_seed, update_bytes
from .client import SENT_METADATA, local_update, personal_names, shared_names
from .personal import PersonalScores, client_of_user
from .partition import active_clients, client_windows, partition
from .privacy import PrivacyLedger, dp_aggregate
from .strategies import ServerOptConfig, ServerOptimizer, aggregate

PERSONAL_FILE = "personal.safetensors"  # the simulated devices' storage: kept apart from the shared model


def _shared(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def initial_model(cfg, n_items: int, device="cpu") -> torch.nn.Module:
    """The round-0 model: seeded, then built as centralized training builds it. The
    simulator and the Flower apps (server and clients) all start from it; a client's
    personal parameters start from its values too."""
    seed_everything(cfg.train.seed)
    model = run_model(cfg, n_items, device)
    if model.objective != "causal":
        raise ValueError(f"federated training needs a causal model; {cfg.model['name']} is trained with {model.objective!r}")
    return model


def sample_round(active: np.ndarray, fcfg, seed: int, round_: int) -> tuple[np.ndarray, np.ndarray]:
    """(sampled clients, which of them report back) for round ``round_``: a function of
    the seed and the round only, so a resumed run samples exactly as the first one did.
    Dropping out and missing the deadline look the same to the server: no update."""
    rng = np.random.default_rng([seed, round_])
    k = len(active) if fcfg.clients_per_round == 0 else min(fcfg.clients_per_round, len(active))
    if fcfg.dp_clip is not None:
        # with DP, each client joins independently with probability q = k / N (Poisson
        # sampling), the scheme the accountant's ε is proven for; k clients on average
        sampled = active[rng.random(len(active)) < k / len(active)]
    else:
        sampled = np.sort(rng.choice(active, size=k, replace=False))
    back = (rng.random(len(sampled)) >= fcfg.dropout) & (rng.random(len(sampled)) >= fcfg.stragglers)
    return sampled, back


def simulate(cfg, split: Split, out_dir: str | Path | None = None, resume: bool = False, overwrite: bool = False,
             log=print, extra_meta: dict | None = None) -> dict:
    """Federated training of ``cfg.model`` on ``split`` under ``cfg.federated``; -> a
    result like ``fit``'s (test of the best round, per-round history, the protocol)."""
    fc, tc = cfg.federated, cfg.train
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        prepare_run_folder(out, resume, overwrite, log)
        if resume:
            recover(out)
    device = select_device(tc.device)
    data = split.data
    model = initial_model(cfg, data.n_items, device)
    windows = TrainWindows(split, model.max_len, cfg.data.windows)
    loss_fn = get_loss(cfg.loss, train_item_counts(split))
    clients = partition(data.n_users, fc.users_per_client, tc.seed)
    mine = client_windows(windows, clients)
    active = active_clients(mine)
    per_round = len(active) if fc.clients_per_round == 0 else min(fc.clients_per_round, len(active))
    ledger = PrivacyLedger(noise_multiplier=fc.dp_noise, sample_rate=per_round / len(active), delta=fc.dp_delta) \
        if fc.dp_clip is not None else None

    server = ServerOptimizer(ServerOptConfig(kind=fc.server_optimizer, lr=fc.server_lr, momentum=fc.server_momentum))
    state = {"round": 0, "best": -math.inf, "best_round": 0, "bad": 0, "history": [], "train_seconds": 0.0}
    global_ = model.state_dict()
    global_ = {k: v.detach().clone() for k, v in global_.items()}
    best_weights = {k: v.clone() for k, v in global_.items()}
    personal: dict[int, dict[str, torch.Tensor]] = {}  # client -> its personal parameters (never on the server)
    best_personal: dict[int, dict[str, torch.Tensor]] = {}  # as they were at the best round
    owner = client_of_user(clients, data.n_users)

    def scorer(personal_state):
        """The model as each client scores its own users: with their personal parameters."""
        return PersonalScores(model, personal_state, owner) if personal_names(model) else model
    if resume and out is not None and (out / "config.json").exists():
        check_same_run(out, cfg, model)  # another config's round state would mix two experiments
    if resume and out is not None and (out / "trainer_state.json").exists():
        state = read_json(out, "trainer_state.json")
        global_ = read_run_file(out, "last.safetensors", lambda p: load_file(str(p)))
        srv = read_run_file(out, "server_state.safetensors", lambda p: load_file(str(p)))
        torch.set_rng_state(srv.pop("__rng_cpu"))
        server.load_state_dict({"tensors": srv, "steps": state["server_steps"]})
        best_weights = read_run_file(out, "model.safetensors", lambda p: load_file(str(p)))
        if (out / PERSONAL_FILE).exists():
            stored = _unflatten_personal(read_run_file(out, PERSONAL_FILE, lambda p: load_file(str(p))))
            personal, best_personal = stored.get("last", {}), stored.get("best", {})
        log(f"resumed from {out} at round {state['round']}")
    if out is not None:
        write_run_files(out, cfg, model, data, extra_meta)
    shared = shared_names(model)
    shapes = {n: global_[n].shape for n in shared}
    sent = update_bytes(shapes, 32)  # the global weights down, float32
    up_bytes = update_bytes(shapes, fc.update_bits) + 8 * len(SENT_METADATA)
    metric = cfg.eval.metric
    generator = torch.Generator().manual_seed(tc.seed * 7919 + 17)  # the DP noise (resumed below per round)

    for r in range(state["round"], fc.rounds):
        if state["bad"] >= fc.patience:
            break
        t0 = time.perf_counter()
        sampled, back = sample_round(active, fc, tc.seed, r)
        ups = []
        reporting = [int(c) for c in sampled[back]]
        if fc.engine == "loop":
            done = [local_update(model, global_, windows, mine[c], fc, tc, loss_fn, r, personal.get(c)) for c in reporting]
        else:
            done = []
            for i in range(0, len(reporting), fc.clients_per_batch):
                part = reporting[i : i + fc.clients_per_batch]
                done += batched_updates(model, global_, windows, [mine[c] for c in part], fc, tc, loss_fn, cfg.loss, r,
                                        [personal.get(c) for c in part])
        for c, (up, kept) in zip(reporting, done):
            if fc.update_bits != 32:  # what the client sends, as the server decodes it
                up = dataclasses.replace(up, delta=compress_update(up.delta, fc.update_bits, round_seed(tc.seed, r, c)))
            ups.append(up)
            if kept:
                personal[c] = kept  # the simulated device's own storage
        for i in range(min(fc.poisoned, len(ups))):  # the attack (robustness experiments): the first reporters lie
            ups[i] = dataclasses.replace(ups[i], delta={n: d * fc.poison_scale for n, d in ups[i].delta.items()})
        rec = {"round": r + 1, "sampled": int(len(sampled)), "reported": len(ups)}
        if ups:
            stacked = {n: torch.stack([u.delta[n] for u in ups]) for n in shared}  # (C, ...) per parameter
            weights = torch.tensor([float(u.n_targets) for u in ups])
            if ledger is not None:
                generator.manual_seed(tc.seed * 7919 + r)
                agg = dp_aggregate(stacked, clip_norm=fc.dp_clip, noise_multiplier=fc.dp_noise,
                                   expected_clients=per_round, generator=generator)
                ledger.record(1)
            else:
                agg = aggregate(stacked, weights, name=fc.aggregator, trim=fc.trim, max_norm=fc.max_update_norm)
            new = server.step({n: global_[n] for n in shared}, agg)
            global_ = {**global_, **new}
            rec["loss"] = float(sum(u.loss * u.n_targets for u in ups) / max(sum(u.n_targets for u in ups), 1))
        secs = time.perf_counter() - t0
        state["train_seconds"] += secs
        rec |= {"seconds": secs, "bytes_down_per_client": sent, "bytes_up_per_client": up_bytes}
        if ledger is not None:
            rec["epsilon"] = ledger.epsilon()
        improved = False
        if (r + 1) % fc.eval_every == 0 or r + 1 == fc.rounds:
            model.load_state_dict(global_)
            val = evaluate(scorer(personal), split, "valid", cfg.eval, device, progress=False)
            rec["valid"] = {k: v for k, v in val.items() if isinstance(v, float)}
            if val[metric] > state["best"]:
                state.update(best=val[metric], best_round=r + 1, bad=0)
                best_weights, improved = {k: v.clone() for k, v in global_.items()}, True
                best_personal = {c: dict(ps) for c, ps in personal.items()}  # tensors are never modified in place
            else:
                state["bad"] += 1
        state["history"].append(rec)
        state["round"] = r + 1
        state["wall_seconds"] = state.get("wall_seconds", 0.0) + time.perf_counter() - t0  # training and evaluation
        state["server_steps"] = server.state_dict()["steps"]
        shown = f"valid {metric} {rec['valid'][metric]:.4f}  best {state['best']:.4f}@{state['best_round']}  " if "valid" in rec else ""
        log(f"round {r + 1}: {rec['reported']}/{rec['sampled']} clients  loss {rec.get('loss', float('nan')):.4f}  "
            f"{shown}{secs:.1f}s")
        if out is not None:
            srv = {**server.state_dict()["tensors"], "__rng_cpu": torch.get_rng_state()}
            files = {"last.safetensors": tensors_writer(global_), "server_state.safetensors": tensors_writer(srv),
                     "trainer_state.json": json_writer(state)}
            if personal:
                files[PERSONAL_FILE] = tensors_writer(_flatten_personal({"last": personal, "best": best_personal}))
            if improved or not (out / "model.safetensors").exists():
                files["model.safetensors"] = tensors_writer(best_weights)
            commit(out, files)

    model.load_state_dict(best_weights)
    test = evaluate(scorer(best_personal), split, "test", cfg.eval, device, breakdown=True, progress=False)
    valid = evaluate(scorer(best_personal), split, "valid", cfg.eval, device, progress=False)
    rounds_done = state["round"]
    result = {
        "model": method_name(cfg),
        "dataset": cfg.data.dataset,
        "seed": tc.seed,
        "best_epoch": state["best_round"],  # the best round, under the key every result reader knows
        "best_round": state["best_round"],
        "epochs": rounds_done,
        "valid": valid,
        "test": test,
        "epoch_seconds": state["train_seconds"] / max(rounds_done, 1),
        "train_seconds": state["train_seconds"],  # the rounds' training and aggregation
        # the rounds with their validation (not the per-round checkpoint commits nor the final
        # test); None: a run from before it was kept
        "wall_seconds": state.get("wall_seconds"),
        "federated": {"clients": int(len(active)), "clients_per_round": per_round, "rounds": rounds_done,
                      "local_epochs": fc.local_epochs, "passes": rounds_done * fc.local_epochs * per_round / len(active),
                      "bytes_per_client_per_round": {"down": sent, "up": up_bytes},
                      "update_bits": fc.update_bits,
                      "sent_metadata": list(SENT_METADATA),
                      **({"privacy": ledger.to_dict()} if ledger is not None else {})},
        "hardware": hardware_name(device),
        "history": state["history"],
    }
    if out is not None:
        write_results(out, result)
        _plot_rounds(out, metric, log)
    result["model_obj"] = model
    return result


def _plot_rounds(out: Path, metric: str, log) -> None:
    """<out>/curve.png: the validation metric per evaluated round and per training minute
    (``perseq bench curves`` draws the same from several run folders)."""
    from ..bench.curves import plot, read_curve

    plot([read_curve(out, metric)], metric, out / "curve", title=f"{out.name}: validation {metric} per round")
    log(f"validation {metric} per round: {out / 'curve.png'}")


def method_name(cfg) -> str:
    """The name a result file gives the method: <model>+<aggregator> (mamba4rec+fedavg), or
    for PFSR "pfsr", "pfsr-no-amb" / "-no-vrm" / "-no-dml" with a part switched off; "+dp"
    with client-level DP."""
    fc, name = cfg.federated, cfg.model["name"]
    if name == "pfsr":
        off = [p for p, on in (("amb", cfg.model.get("amb", True)), ("vrm", cfg.model.get("vrm", True)), ("dml", fc.dml > 0))
               if not on]
        base = "pfsr" + "".join(f"-no-{p}" for p in off)
    else:
        base = f"{name}+{fc.aggregator}"
    return base + ("+dp" if fc.dp_clip is not None else "")


def _flatten_personal(states: dict[str, dict[int, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """{"last": {client: {name: t}}, "best": ...} -> {"last/<client>/<name>": t, ...}."""
    return {f"{which}/{c}/{n}": t for which, st in states.items() for c, ps in st.items() for n, t in ps.items()}


def _unflatten_personal(flat: dict[str, torch.Tensor]) -> dict[str, dict[int, dict[str, torch.Tensor]]]:
    out: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, t in flat.items():
        which, c, n = key.split("/", 2)
        out.setdefault(which, {}).setdefault(int(c), {})[n] = t
    return out
