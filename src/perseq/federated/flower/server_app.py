"""The Flower ServerApp: read the config, build the round-0 model as the simulator does,
run the rounds with :class:`~.strategy.PerseqFedAvg`, save every round, test the best.

    flwr run examples/flower-app            (components: perseq.federated.flower.server_app:app)

Per round (Flower's ``Strategy.start`` loop): train on the sampled nodes, aggregate with
perseq's aggregator and server optimizer, validate on every node every ``eval_every``
rounds; then the round is committed to the run folder (``run_folder.ServerRun``; the
``evaluate_fn`` hook of ``start``, which Flower calls after each round with the final
global weights, is where that happens). After the last round (or when ``patience`` runs
out) every node scores its own users' validation and test events with the best round's
weights and its personal state as of that round, and results.json gets the averages.

Resuming: with ``resume = true`` in the run config, a killed ServerApp's folder is read
back (weights, server optimizer, best round, history) and ``start`` runs the remaining
rounds; rounds keep their numbers, so sampling and local seeds are those of an
uninterrupted run.

Client-level DP (``federated.dp_clip`` / ``dp_noise``): the strategy is wrapped in
Flower's ``DifferentialPrivacyClientSideFixedClipping`` (the ClientApp's
``fixedclipping_mod`` clips), see strategy.py.

SecAgg+ (``secagg_app`` here and ``client_app.secagg_app``): in flwr 1.4x secure
aggregation exists only in the legacy workflow (``flwr.server.workflow.SecAggPlusWorkflow``
on a ``LegacyContext`` with a legacy strategy, and ``secaggplus_mod`` on a ``client_fn``
ClientApp); the Message-API strategies cannot use it. So SecAgg+ is its own pair of apps,
with :class:`~.legacy.PerseqLegacyFedAvg` applying the same server optimizer to the
securely summed, weighted mean update. Only FedAvg can be computed from a secure sum
(median, trimmed mean and per-client norm bounds need each update), and it is not
combined with DP here.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

from ...data.loading import data_fingerprint
from ..simulate import method_name
from .records import PERSONAL_UPTO, STAGE, FlowerRunConfig, from_arrays, to_arrays
from .run_folder import ServerRun
from .strategy import PerseqFedAvg, wait_for_nodes
from .task import check_flower_settings, load_setup

logger = logging.getLogger("perseq.flower")


def _log(text: str) -> None:
    logger.info(text)
    print(text, flush=True)


def start_run(context: Context, defaults: Mapping[str, object] | None) -> tuple[FlowerRunConfig, object, object, ServerRun]:
    """(settings, perseq config, setup, ServerRun) for a ServerApp call: the run config
    over ``defaults``, the data's catalogue and clients, the run folder (resumed or new)."""
    run = FlowerRunConfig.from_run_config({**(defaults or {}), **context.run_config})
    cfg = run.perseq_config()
    check_flower_settings(cfg.federated)
    setup = load_setup(cfg)
    out = run.out_dir(cfg)
    _log(f"perseq flower server: {cfg.model['name']} on {setup.split.data.name}, {setup.n_clients} clients, "
         f"run folder {out}")
    server_run = ServerRun(cfg, setup, out, resume=run.resume, overwrite=run.overwrite,
                           extra_meta={"data_fingerprint": data_fingerprint(cfg.data)}, log=_log)
    return run, cfg, setup, server_run


def make_server_app(defaults: Mapping[str, object] | None = None,
                    audit: Callable[[Message], None] | None = None) -> ServerApp:
    """A ServerApp whose run config is ``defaults`` overridden by Flower's run config
    (``run_simulation`` passes none, so tests and scripts give theirs here). ``audit`` is
    called with every reply that reaches the server, before aggregation (what a client
    sent, as the server received it)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run, cfg, setup, srv = start_run(context, defaults)
        fc = cfg.federated
        strategy = PerseqFedAvg(fc, srv.server, setup.shared, setup.n_clients, cfg.train.seed,
                                first_round=srv.state.round, stopped=lambda: srv.stopped,
                                keep_upto=srv.keep_upto, audit=audit)
        outer = strategy
        if fc.dp_clip is not None:
            outer = DifferentialPrivacyClientSideFixedClipping(strategy, noise_multiplier=fc.dp_noise,
                                                               clipping_norm=fc.dp_clip,
                                                               num_sampled_clients=strategy.per_round)

        def end_of_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            # Flower calls this before round 1 (server_round 0) and after every round, with
            # the weights after the DP wrapper's noise: what is committed is what was released
            if server_round == 0 or strategy.last_train is None:
                return None
            new = None if strategy.last_train.reported == 0 else from_arrays(arrays, setup.shared)
            srv.end_round(strategy.perseq_round(server_round), new, strategy.last_train, strategy.last_valid)
            return None

        remaining = max(fc.rounds - srv.state.round, 0)
        if remaining and not srv.stopped:
            outer.start(grid=grid, initial_arrays=to_arrays(srv.shared, setup.shared), num_rounds=remaining,
                        timeout=run.round_timeout, evaluate_fn=end_of_round)
        best = to_arrays({n: srv.best_weights[n] for n in setup.shared}, setup.shared)
        upto = srv.state.best_round - 1
        valid = strategy.evaluate_global(grid, best, "valid", upto, run.round_timeout)
        test = strategy.evaluate_global(grid, best, "test", upto, run.round_timeout)
        result = srv.finish(valid, test, method_name(cfg))
        _log(f"best round {result['best_round']}: valid {valid}  test {test}")

    return app


app = make_server_app()


# ------------------------------------------------------------------ SecAgg+ (legacy)
def _count(x: float) -> int | float:
    """A run-config number as SecAggPlusWorkflow reads it: a whole number above 1 is a
    count, anything else a fraction of the sampled clients."""
    return int(x) if x > 1 and float(x).is_integer() else float(x)


def make_secagg_server_app(defaults: Mapping[str, object] | None = None) -> ServerApp:
    """The ServerApp for SecAgg+ (pair it with ``client_app.secagg_app``): the same rounds,
    run folder and final test as ``make_server_app``, through Flower's legacy workflow."""
    from flwr.common import EvaluateIns, MessageType
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    from .legacy import PerseqLegacyFedAvg, check_secagg_settings, scores, to_parameters

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run, cfg, setup, srv = start_run(context, defaults)
        fc = cfg.federated
        check_secagg_settings(fc)
        strategy = PerseqLegacyFedAvg(srv, cfg.train.seed, first_round=srv.state.round)
        remaining = max(fc.rounds - srv.state.round, 0)
        if remaining and not srv.stopped:
            # the weights SecAgg+ quantizes are num-examples / max_weight: the largest a client can report
            targets = [int(setup.windows.length[w].sum()) for w in setup.mine]
            secagg = SecAggPlusWorkflow(num_shares=_count(run.secagg_num_shares),
                                        reconstruction_threshold=_count(run.secagg_reconstruction_threshold),
                                        max_weight=float(fc.local_epochs * max(max(targets), 1)),
                                        clipping_range=run.secagg_clipping_range, timeout=run.round_timeout)
            legacy = LegacyContext(context=context, strategy=strategy,
                                   config=ServerConfig(num_rounds=remaining, round_timeout=run.round_timeout))
            DefaultWorkflow(fit_workflow=secagg)(grid, legacy)

        best = to_parameters(srv.best_weights, setup.shared)
        upto = srv.state.best_round - 1

        def federated_scores(stage: str) -> dict[str, float] | None:
            ins = EvaluateIns(best, {STAGE: stage, PERSONAL_UPTO: upto})
            msgs = [Message(compat.evaluateins_to_recorddict(ins, True), dst_node_id=n,
                            message_type=MessageType.EVALUATE) for n in wait_for_nodes(grid, setup.n_clients)]
            replies = [compat.recorddict_to_evaluateres(m.content) for m in grid.send_and_receive(msgs, timeout=run.round_timeout)
                       if m.has_content()]
            return scores([(r.num_examples, r.metrics) for r in replies])

        valid, test = federated_scores("valid"), federated_scores("test")
        result = srv.finish(valid, test, method_name(cfg) + "+secagg")
        _log(f"best round {result['best_round']}: valid {valid}  test {test}")

    return app


secagg_app = make_secagg_server_app()
