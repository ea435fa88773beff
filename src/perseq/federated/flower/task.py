"""The torch side of the Flower apps (the role of ``task.py`` in Flower's quickstart): the
data a node holds, the seeded initial model, one client's training round and its
evaluation, and the node's on-disk store of personal parameters. Imports no Flower, so the
apps stay thin: unpack the message, call one function here, pack the reply.

Everything here reproduces the in-process simulator (``perseq.federated.simulate``) step
for step: the same round-0 model (``simulate.initial_model``), the same partition of users into clients, the same training windows,
loss and ``local_update`` call with the same round number, so a Flower run and a
simulation of the same config train the same clients the same way.

What a node reads: the whole dataset its config names, from which it keeps its own
partition's users (a research deployment: every node reads the same file). A real device
would hold only its user's events; nothing below uses another client's events.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ...data.batching import TrainWindows
from ...data.loading import load_data
from ...data.sequences import Split, make_split
from ...evaluate import rank_targets, summarize_ranks, train_item_counts
from ...losses import get_loss
from ...runtime import apply_threads, choose_threads
from ...train import select_device
from ..client import local_update, shared_names
from ..partition import active_clients, client_windows, partition
from ..simulate import initial_model


def check_flower_settings(fc) -> None:
    """Refuse the simulator-only knobs: on Flower, dropouts and stragglers are real
    failures (a node that does not answer in time), not dice rolls, and the poisoning
    attack is an experiment of the simulator's."""
    for key in ("dropout", "stragglers", "poisoned"):
        if getattr(fc, key):
            raise ValueError(f"federated.{key}={getattr(fc, key)!r} is a simulator setting; on the Flower engine "
                             "set it to 0 (real nodes fail on their own)")


@dataclass
class FederatedSetup:
    """What one process (a SuperNode's ClientApp, or the ServerApp) derives from a config
    once: the data, its clients, the loss, and a working model. Not thread-safe: the model
    is reused by every call (each call loads the full state it needs first)."""

    cfg: object  # perseq RunConfig
    split: Split
    windows: TrainWindows
    clients: list[np.ndarray]  # client -> its user indices (perseq.federated.partition)
    mine: list[np.ndarray]  # client -> its training windows
    loss_fn: object
    device: torch.device
    model: torch.nn.Module  # the working copy
    init_state: dict[str, torch.Tensor]  # the round-0 state: all parameters and buffers
    shared: tuple[str, ...]  # the parameters that travel (all but personal.*), in order

    @property
    def n_clients(self) -> int:
        return len(self.clients)

    def active(self) -> np.ndarray:
        """The clients that hold a training target (the simulator samples only these)."""
        return active_clients(self.mine)

    def client_of(self, partition_id: int, num_partitions: int) -> int:
        """This node's client: node i is client i, so the federation must have one node
        per client (ValueError naming both ways to make them agree)."""
        if num_partitions != self.n_clients:
            fc, n_users = self.cfg.federated, self.split.data.n_users
            raise ValueError(
                f"{n_users} users in groups of federated.users_per_client={fc.users_per_client} make "
                f"{self.n_clients} clients, but the federation has num-partitions={num_partitions} nodes: "
                f"start {self.n_clients} nodes (options.num-supernodes), or set users_per_client so that "
                f"ceil({n_users} / users_per_client) = {num_partitions}")
        return partition_id

    def full_state(self, shared: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The global weights as a whole state dict: the round-0 state with ``shared`` over it."""
        return {**self.init_state, **{n: t.to(self.device) for n, t in shared.items()}}


def load_setup(cfg) -> FederatedSetup:
    """The setup for ``cfg``, built once per process (reading and splitting the data each
    message would dominate a round). Keyed by the whole config, so another run's config in
    the same process gets its own."""
    return _load_setup(cfg.to_json())


@functools.lru_cache(maxsize=2)
def _load_setup(cfg_json: str) -> FederatedSetup:
    import json

    from ...config import from_dict

    cfg = from_dict(json.loads(cfg_json))
    tc, fc = cfg.train, cfg.federated
    device = select_device(tc.device)
    data, _ = load_data(cfg.data, log=lambda s: None)
    split = make_split(data, cfg.data.split)
    model = initial_model(cfg, data.n_items, device)
    windows = TrainWindows(split, model.max_len, cfg.data.windows)
    clients = partition(data.n_users, fc.users_per_client, tc.seed)
    return FederatedSetup(
        cfg=cfg, split=split, windows=windows, clients=clients, mine=client_windows(windows, clients),
        loss_fn=get_loss(cfg.loss, train_item_counts(split)), device=device, model=model,
        init_state={k: v.detach().clone() for k, v in model.state_dict().items()},
        shared=tuple(shared_names(model)),
    )


@functools.lru_cache(maxsize=1)
def use_threads_once(requested: int | None) -> int:
    """Set this process's torch (and numba) thread count for training, once: ``train.threads``,
    else perseq's automatic choice (``perseq.runtime``). The ClientApp calls it; the
    ServerApp, which only aggregates, leaves its process alone."""
    n = choose_threads(requested).n
    apply_threads(n)
    return n


# ---------------------------------------------------------------- a client's round
@dataclass(frozen=True)
class TrainResult:
    weights: dict[str, torch.Tensor]  # the shared parameters after local training (global + update)
    n_targets: int
    loss: float


def train_client(setup: FederatedSetup, client: int, shared: dict[str, torch.Tensor], round_: int,
                 store: PersonalStore, keep_upto: int = -1) -> TrainResult:
    """One client's round: ``local_update`` from the global ``shared`` weights with the
    client's personal parameters as of before ``round_`` (from ``store``); the new personal
    ones go back to ``store``. Returns the new shared weights themselves (not the update),
    so that the server's ``reply - global`` is the simulator's update bit for bit."""
    cfg = setup.cfg
    personal = store.latest(upto=round_ - 1)
    up, kept = local_update(setup.model, setup.full_state(shared), setup.windows, setup.mine[client],
                            cfg.federated, cfg.train, setup.loss_fn, round_, personal)
    if kept:
        store.save(round_, kept)
        store.prune(keep=(round_ - 1, keep_upto))
    params = dict(setup.model.named_parameters())  # local_update trained the model in place
    return TrainResult({n: params[n].detach().cpu().clone() for n in setup.shared}, up.n_targets, up.loss)


def evaluate_client(setup: FederatedSetup, client: int, shared: dict[str, torch.Tensor], stage: str,
                    personal: dict[str, torch.Tensor] | None) -> tuple[int, dict[str, float]]:
    """Score the client's own users at ``stage`` ("valid" or "test") with the global
    ``shared`` weights and the client's ``personal`` parameters; -> (users scored, {hr@K,
    ndcg@K for K in eval.ks}: means over them, 0.0 when none)."""
    cfg = setup.cfg
    model = setup.model
    model.load_state_dict(setup.full_state(shared))
    if personal:
        model.load_state_dict(personal, strict=False)
    users = setup.clients[client]
    users = users[setup.split.positions(stage)[users] >= 0]
    keys = [f"{m}@{k}" for k in cfg.eval.ks for m in ("hr", "ndcg")]
    if not len(users):
        return 0, {k: 0.0 for k in keys}
    ranks, _, hist, targets = rank_targets(model, setup.split, stage, cfg.eval, setup.device, users=users, progress=False)
    res = summarize_ranks(ranks, hist, targets, setup.split, cfg.eval)
    return int(len(users)), {k: float(res[k]) for k in keys}


# ------------------------------------------------------- the node's personal parameters
class PersonalStore:
    """A client's personal parameters (``personal.*``) on its node's disk, one safetensors
    file per round it trained in (``round-000003.safetensors``: the state after round 3).
    On disk, not in Flower's ``context.state`` (memory only), so they survive a SuperNode
    restart; per round, so that a server resumed from an earlier round, and the final test
    of the best round, read the state as of that round. Files are replaced atomically."""

    _NAME = re.compile(r"round-(\d{6,})\.safetensors")

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _rounds(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := self._NAME.fullmatch(p.name)))

    def _path(self, round_: int) -> Path:
        return self.root / f"round-{round_:06d}.safetensors"

    def latest(self, upto: int) -> dict[str, torch.Tensor] | None:
        """The state as of round ``upto``: the newest file of a round <= upto, or None (the
        client had not trained by then: it keeps the model's initial personal parameters)."""
        done = [r for r in self._rounds() if r <= upto]
        return load_file(str(self._path(done[-1]))) if done else None

    def save(self, round_: int, tensors: dict[str, torch.Tensor]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self._path(round_).with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self._path(round_))

    def prune(self, keep: tuple[int, ...]) -> None:
        """Delete every file but the newest one and, for each round in ``keep``, the one
        ``latest(round)`` reads."""
        rounds = self._rounds()
        wanted = {rounds[-1]} if rounds else set()
        for k in keep:
            done = [r for r in rounds if r <= k]
            if done:
                wanted.add(done[-1])
        for r in set(rounds) - wanted:
            self._path(r).unlink(missing_ok=True)


def personal_store(state_dir: str | Path, run: str, client: int) -> PersonalStore:
    """The store of ``client`` in run ``run`` (``records.run_key``) under a node's state dir."""
    return PersonalStore(Path(state_dir) / run / f"client-{client}")
