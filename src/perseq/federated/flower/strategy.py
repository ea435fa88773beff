"""perseq's aggregation as a Flower strategy (the Message API's ``FedAvg``, subclassed).

Flower's own FedAvg averages the weights its clients reply. :class:`PerseqFedAvg` keeps
FedAvg's messages (one ArrayRecord "arrays" and one ConfigRecord "config" down, "arrays"
and a MetricRecord with ``num-examples`` up) but aggregates as the simulator does:

  update_c = reply_c - global                     (each client's update, exactly the simulator's)
  agg      = strategies.aggregate(updates, num-examples, aggregator, trim, max_update_norm)
  global'  = ServerOptimizer.step(global, agg)    (FedAvg, FedAvgM or FedAdam)

so a Flower run and ``perseq federated simulate`` of the same config compute the same
global weights (up to the order in which float32 updates are summed: the simulator sums
clients in client order; Flower's replies carry no client index, so they are summed in
node-id order, which can differ in the last bit).

Sampling is deterministic in (train.seed, round): ``clients_per_round`` nodes (0 = all),
chosen once every client's node has registered (``min_available_nodes`` = the client
count: Flower's FedAvg samples among the nodes registered at that moment, so waiting for
all of them makes "all" mean all). A reply with ``num-examples`` 0 (a client without a
training target) is left out, as the simulator never samples such a client.

Client-level DP (``federated.dp_clip``) uses Flower's own pieces: the ServerApp wraps this
strategy in ``DifferentialPrivacyClientSideFixedClipping`` and the ClientApp clips with
``fixedclipping_mod``. This strategy then averages the clipped updates unweighted over the
number of clients sampled (a fixed denominator, DP-FedAvg's), and the wrapper adds
N(0, (dp_noise · dp_clip / sampled)²) to the weights this returns. Because the noise comes
after ``aggregate_train``, a server optimizer with state (momentum, Adam) would keep
un-noised aggregates in its buffers; DP therefore needs the plain FedAvg server step
(``check_dp_settings``).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ..privacy import dp_aggregate
from ..strategies import ServerOptimizer, aggregate
from .records import (ARRAYS_KEY, CONFIG_KEY, KEEP_UPTO, NUM_EXAMPLES, PERSONAL_UPTO, ROUND, STAGE, from_arrays,
                      to_arrays)

logger = logging.getLogger("perseq.flower")


def check_dp_settings(fc) -> None:
    """DP on Flower adds its noise after the server step (see the module docs): only the
    plain FedAvg step (sgd, lr 1, no momentum) keeps the guarantee."""
    if fc.dp_clip is None:
        return
    lr = 1.0 if fc.server_lr is None else fc.server_lr
    if fc.server_optimizer != "sgd" or fc.server_momentum or lr != 1.0:
        raise ValueError("client-level DP on the Flower engine needs the plain FedAvg server step "
                         "(federated.server_optimizer=sgd, server_lr 1, server_momentum 0): Flower's DP wrapper adds "
                         "the noise after the server step, so an optimizer's buffers would hold un-noised aggregates")


@dataclass
class RoundReport:
    """What the server saw in one round's training: for the run's history."""

    sampled: int
    reported: int  # replies with an update (num-examples > 0)
    failures: int  # replies that carried an error, and nodes that did not answer
    loss: float | None  # the reported clients' mean training loss, weighted by targets


def wait_for_nodes(grid: Grid, n: int, log_every: float = 30.0) -> list[int]:
    """The registered node ids, sorted, once at least ``n`` are registered (polling each second)."""
    last = 0.0
    while len(nodes := sorted(grid.get_node_ids())) < n:
        if time.monotonic() - last > log_every:
            logger.info("waiting for nodes: %d of %d registered", len(nodes), n)
            last = time.monotonic()
        time.sleep(1.0)
    return nodes


def weighted_metrics(replies: list[RecordDict]) -> tuple[int, dict[str, float]]:
    """(total num-examples, each other metric's mean weighted by num-examples) over replies'
    single MetricRecords; replies with num-examples 0 count for nothing."""
    total, sums = 0, {}
    for content in replies:
        m = next(iter(content.metric_records.values()))
        n = int(m[NUM_EXAMPLES])
        total += n
        for k, v in m.items():
            if k != NUM_EXAMPLES:
                sums[k] = sums.get(k, 0.0) + n * float(v)
    return total, {k: (s / total if total else math.nan) for k, s in sums.items()}


class PerseqFedAvg(FedAvg):
    """Flower's Message-API FedAvg with perseq's sampling, aggregation and server optimizer.

    fc: the run's FederatedConfig; server: the ServerOptimizer (its state is the caller's to
    save); shared: the names of the parameters that travel, in order; n_clients: the
    client count (one node each); seed: train.seed; first_round: rounds already done (a
    resumed run: Flower's rounds 1, 2, ... are rounds first_round + 1, ...).
    ``stopped()`` ends training early (patience), ``keep_upto()`` is the best round so far
    (0-based, -1 none), which clients keep personal state for; ``audit`` sees every reply.
    """

    def __init__(self, fc, server: ServerOptimizer, shared: tuple[str, ...], n_clients: int, seed: int, *,
                 first_round: int = 0, stopped: Callable[[], bool] = lambda: False,
                 keep_upto: Callable[[], int] = lambda: -1, audit: Callable[[Message], None] | None = None):
        self.per_round = n_clients if fc.clients_per_round == 0 else min(fc.clients_per_round, n_clients)
        super().__init__(fraction_train=self.per_round / n_clients, fraction_evaluate=1.0,
                         min_train_nodes=self.per_round, min_evaluate_nodes=n_clients, min_available_nodes=n_clients,
                         weighted_by_key=NUM_EXAMPLES, arrayrecord_key=ARRAYS_KEY, configrecord_key=CONFIG_KEY)
        check_dp_settings(fc)
        if fc.update_bits != 32:
            raise ValueError(f"federated.update_bits={fc.update_bits}: compressed uploads are offered by "
                             "`perseq federated simulate` only; the Flower apps send float32 updates")
        self.fc, self.server, self.shared, self.n_clients, self.seed = fc, server, tuple(shared), n_clients, seed
        self.first_round, self.stopped, self.keep_upto, self.audit = first_round, stopped, keep_upto, audit
        self._global: dict[str, torch.Tensor] | None = None  # the weights sent this round
        self._sampled = 0  # nodes sent this round's training
        self.last_train: RoundReport | None = None  # this round's training, None when none ran
        self.last_valid: dict[str, float] | None = None  # this round's aggregated validation, None when not evaluated

    def perseq_round(self, server_round: int) -> int:
        """Flower's 1-based round of this run -> perseq's 0-based round of the whole run."""
        return self.first_round + server_round - 1

    def eval_due(self, round_: int) -> bool:
        """Validation after 0-based round ``round_``: every eval_every rounds and after the last."""
        return (round_ + 1) % self.fc.eval_every == 0 or round_ + 1 == self.fc.rounds

    def summary(self) -> None:
        super().summary()
        logger.info("perseq: %s aggregation, %s server step, %d of %d clients per round", self.fc.aggregator,
                    self.fc.server_optimizer, self.per_round, self.n_clients)

    # ---------------------------------------------------------------------- training
    def sample(self, grid: Grid, round_: int) -> list[int]:
        """``per_round`` node ids, a function of (seed, round) and the registered nodes."""
        nodes = wait_for_nodes(grid, self.min_available_nodes)
        if self.per_round >= len(nodes):
            return nodes
        rng = np.random.default_rng([self.seed, round_])
        # choose positions, not ids: node ids are unsigned 64-bit, and numpy turns a list of
        # Python ints above 2**63 mixed with smaller ones into float64, which rounds them
        picked = rng.choice(len(nodes), size=self.per_round, replace=False)
        return sorted(nodes[int(i)] for i in picked)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.last_train, self.last_valid, self._sampled = None, None, 0
        if self.stopped():
            return []
        r = self.perseq_round(server_round)
        self._global = from_arrays(arrays, self.shared)
        config["server-round"] = server_round
        config[ROUND] = r
        config[KEEP_UPTO] = self.keep_upto()
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        nodes = self.sample(grid, r)
        logger.info("round %d: training on %d of %d nodes", r + 1, len(nodes), len(list(grid.get_node_ids())))
        self._sampled = len(nodes)
        return self._construct_messages(record, nodes, MessageType.TRAIN)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if not self._sampled:  # no training this round (patience ran out)
            return None, None
        replies = sorted(replies, key=lambda m: m.metadata.src_node_id)  # a fixed summation order
        for m in replies:
            if self.audit is not None:
                self.audit(m)
        valid, errors = self._check_and_log_replies(replies, is_train=True)
        valid = [m for m in valid if int(next(iter(m.content.metric_records.values()))[NUM_EXAMPLES]) > 0]
        failures = len(errors) + self._sampled - len(replies)  # error replies and nodes that never answered
        if not valid:
            self.last_train = RoundReport(self._sampled, 0, failures, None)
            return None, None
        updates = [from_arrays(m.content[self.arrayrecord_key], self.shared) for m in valid]
        stacked = {n: torch.stack([u[n] for u in updates]) - self._global[n] for n in self.shared}  # (C, ...)
        n_ex, metrics = weighted_metrics([m.content for m in valid])
        if self.fc.dp_clip is not None:
            # the wrapper adds the noise to what this returns; clipping again is a no-op for
            # clients that clipped (fixedclipping_mod) and a guard against one that did not
            agg = dp_aggregate(stacked, clip_norm=self.fc.dp_clip, noise_multiplier=0.0,
                               expected_clients=self.per_round)
        else:
            weights = torch.tensor([float(next(iter(m.content.metric_records.values()))[NUM_EXAMPLES]) for m in valid])
            agg = aggregate(stacked, weights, name=self.fc.aggregator, trim=self.fc.trim,
                            max_norm=self.fc.max_update_norm)
        new = self.server.step(self._global, agg)
        self.last_train = RoundReport(self._sampled, len(valid), failures, metrics.get("train_loss"))
        return to_arrays(new, self.shared), MetricRecord({**metrics, NUM_EXAMPLES: n_ex})

    # -------------------------------------------------------------------- evaluation
    def eval_messages(self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord, stage: str,
                      personal_upto: int) -> list[Message]:
        """An evaluate message to every client's node: score ``stage`` with ``arrays`` and
        the personal state as of round ``personal_upto``."""
        config[STAGE] = stage
        config[PERSONAL_UPTO] = personal_upto
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, wait_for_nodes(grid, self.min_available_nodes), MessageType.EVALUATE)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        r = self.perseq_round(server_round)
        if self.last_train is None or not self.eval_due(r):
            return []
        config["server-round"] = server_round
        return self.eval_messages(grid, arrays, config, "valid", r)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = self.aggregate_scores(replies)
        self.last_valid = metrics
        return None if metrics is None else MetricRecord(metrics)

    def aggregate_scores(self, replies: Iterable[Message]) -> dict[str, float] | None:
        """The evaluate replies' metrics, averaged over every scored user (each client's
        means weighted by its num-examples): the simulator's mean over all users. None
        when no reply scored anyone."""
        replies = sorted(replies, key=lambda m: m.metadata.src_node_id)  # a fixed summation order
        for m in replies:
            if self.audit is not None:
                self.audit(m)
        valid, _ = self._check_and_log_replies(replies, is_train=False)
        n, metrics = weighted_metrics([m.content for m in valid])
        return {**metrics, "n_users": float(n)} if n else None

    def evaluate_global(self, grid: Grid, arrays: ArrayRecord, stage: str, personal_upto: int,
                        timeout: float) -> dict[str, float] | None:
        """One federated evaluation outside the rounds (the final valid and test of the
        best round)."""
        msgs = self.eval_messages(grid, arrays, ConfigRecord(), stage, personal_upto)
        return self.aggregate_scores(grid.send_and_receive(msgs, timeout=timeout))
