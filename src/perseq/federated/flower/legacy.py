"""SecAgg+ needs Flower's legacy workflow: a legacy strategy on a ``LegacyContext``, driven
by ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))``. In flwr 1.4x the SecAgg+
workflow calls the legacy ``Strategy`` API (``configure_fit`` / ``aggregate_fit`` with
``FitRes``), which the Message-API strategies do not have.

Under SecAgg+ each client uploads its (weighted, quantized, masked) update and the server
learns only their sum: ``aggregate_fit`` receives the weighted mean update
Σ n_c u_c / Σ n_c already (quantized to [-clipping_range, +clipping_range] with 2**22
levels, and the weights n_c / max_weight to as many), the same value in every result.
:class:`PerseqLegacyFedAvg` applies perseq's server optimizer to it, samples as
:class:`~.strategy.PerseqFedAvg` does, and records rounds in the same run folder. Only
FedAvg aggregation exists here: the median, the trimmed mean and per-client norm bounds
need the individual updates, which SecAgg+ hides (``check_secagg_settings``).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.common import EvaluateIns, FitIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg as LegacyFedAvg

from .records import KEEP_UPTO, NUM_EXAMPLES, PERSONAL_UPTO, ROUND, STAGE
from .strategy import RoundReport

logger = logging.getLogger("perseq.flower")


def check_secagg_settings(fc) -> None:
    """SecAgg+ yields one sum: only FedAvg can be computed from it."""
    bad = [f"federated.{k}={getattr(fc, k)!r}" for k, off in (("aggregator", "fedavg"), ("max_update_norm", None),
                                                             ("dp_clip", None)) if getattr(fc, k) != off]
    if bad:
        raise ValueError(f"SecAgg+ shows the server only the sum of the updates, so it supports FedAvg without "
                         f"per-client norm bounds or DP; unset {', '.join(bad)} (or use the Message-API apps)")


def to_parameters(tensors: dict[str, torch.Tensor], names) -> Parameters:
    return ndarrays_to_parameters([tensors[n].detach().cpu().to(torch.float32).numpy() for n in names])


def from_parameters(parameters: Parameters, names) -> dict[str, torch.Tensor]:
    arrays = parameters_to_ndarrays(parameters)
    if len(arrays) != len(names):
        raise ValueError(f"received {len(arrays)} arrays, expected {len(names)}")
    return {n: torch.from_numpy(np.asarray(a, dtype=np.float32).copy()) for n, a in zip(names, arrays)}


class PerseqLegacyFedAvg(LegacyFedAvg):
    """The legacy-API twin of PerseqFedAvg for SecAgg+ (see the module docs). ``run`` is
    the ServerRun: the server optimizer, the global weights and the run folder."""

    def __init__(self, run, seed: int, *, first_round: int = 0):
        fc, setup = run.cfg.federated, run.setup
        check_secagg_settings(fc)
        n = setup.n_clients
        self.per_round = n if fc.clients_per_round == 0 else min(fc.clients_per_round, n)
        super().__init__(fraction_fit=self.per_round / n, fraction_evaluate=1.0, min_fit_clients=self.per_round,
                         min_evaluate_clients=n, min_available_clients=n)
        self.run, self.fc, self.setup, self.seed, self.first_round = run, fc, setup, seed, first_round
        self._global: dict[str, torch.Tensor] | None = None
        self._new: dict[str, torch.Tensor] | None = None
        self.last_train: RoundReport | None = None

    def __repr__(self) -> str:
        return "PerseqLegacyFedAvg (SecAgg+)"

    def perseq_round(self, server_round: int) -> int:
        return self.first_round + server_round - 1

    def eval_due(self, round_: int) -> bool:
        return (round_ + 1) % self.fc.eval_every == 0 or round_ + 1 == self.fc.rounds

    def initialize_parameters(self, client_manager) -> Parameters:
        return to_parameters(self.run.shared, self.setup.shared)

    def _nodes(self, client_manager, k: int, round_: int) -> list:
        client_manager.wait_for(self.min_available_clients)
        proxies = sorted(client_manager.all().values(), key=lambda p: p.node_id)
        if k >= len(proxies):
            return proxies
        chosen = np.random.default_rng([self.seed, round_]).choice(len(proxies), size=k, replace=False)
        return [proxies[i] for i in sorted(chosen)]

    def configure_fit(self, server_round, parameters, client_manager):
        self.last_train, self._new = None, None
        if self.run.stopped:
            return []
        r = self.perseq_round(server_round)
        self._global = from_parameters(parameters, self.setup.shared)
        ins = FitIns(parameters, {ROUND: r, KEEP_UPTO: self.run.keep_upto(), "server-round": server_round})
        self._sampled = self._nodes(client_manager, self.per_round, r)
        return [(p, ins) for p in self._sampled]

    def aggregate_fit(self, server_round, results, failures):
        if not results:
            self.last_train = RoundReport(len(self._sampled), 0, len(failures), None)
            return None, {}
        # every result carries the same securely aggregated weighted mean update
        agg = from_parameters(results[0][1].parameters, self.setup.shared)
        self._new = self.run.server.step(self._global, agg)
        n = sum(r.num_examples for _, r in results)
        loss = sum(r.num_examples * float(r.metrics["train_loss"]) for _, r in results) / n if n else None
        self.last_train = RoundReport(len(self._sampled), sum(r.num_examples > 0 for _, r in results), len(failures),
                                      loss)
        return to_parameters(self._new, self.setup.shared), {"train_loss": loss or 0.0}

    def evaluate(self, server_round, parameters):
        # the workflow's "centralized evaluation" slot, right after each round's fit: the
        # end of a round that has no federated validation
        if server_round > 0 and self.last_train is not None and not self.eval_due(self.perseq_round(server_round)):
            self.run.end_round(self.perseq_round(server_round), self._new, self.last_train, None)
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        r = self.perseq_round(server_round)
        if self.last_train is None or not self.eval_due(r):
            return []
        ins = EvaluateIns(parameters, {STAGE: "valid", PERSONAL_UPTO: r})
        return [(p, ins) for p in self._nodes(client_manager, self.setup.n_clients, r)]

    def aggregate_evaluate(self, server_round, results, failures):
        valid = scores([(r.num_examples, r.metrics) for _, r in results])
        self.run.end_round(self.perseq_round(server_round), self._new, self.last_train, valid)
        return None, dict(valid or {})


def scores(results: list[tuple[int, dict]]) -> dict[str, float] | None:
    """Each metric's mean over every scored user, from (num-examples, metrics) per client."""
    total = sum(n for n, _ in results)
    if not total:
        return None
    keys = {k for _, m in results for k in m if k != NUM_EXAMPLES}
    return {**{k: sum(n * float(m[k]) for n, m in results) / total for k in keys}, "n_users": float(total)}
