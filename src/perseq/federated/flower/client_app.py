"""The Flower ClientApp: one node is one perseq client (``partition-id`` i of
``num-partitions`` = client i of ``perseq.federated.partition``), and it runs the
simulator's client step, ``perseq.federated.client.local_update``.

    flwr run examples/flower-app            (components: perseq.federated.flower.client_app:app)

train:    unpack the global shared weights, train the node's own windows from them with
          its personal parameters as of the previous round, keep the new personal ones on
          the node's disk (``state-dir``), reply with ONLY
            ArrayRecord "arrays"     the new shared weights (global + update), float32,
                                     exactly the shared parameter names, in order
            MetricRecord "metrics"   exactly num-examples (training targets: FedAvg's
                                     weight) and train_loss
          Personal parameters (``personal.*``), item ids, sequences and integer arrays are
          never in a reply. With client-level DP the reply passes Flower's
          ``fixedclipping_mod`` (the update clipped to the server's norm) on its way out.
evaluate: score the node's own users' validation or test events (the server says which)
          with the weights received and the node's personal parameters; reply with a
          MetricRecord of num-examples (users scored) and hr@K, ndcg@K for each K in
          ``eval.ks`` (``records.eval_metric_keys``), and nothing else.

``secagg_app`` is the same client step for the SecAgg+ legacy workflow (see server_app.py):
a ``client_fn`` ClientApp behind ``secaggplus_mod``; it sends its update (not its weights),
which SecAgg+ masks, so the server only learns the weighted sum; num-examples and
train_loss still travel in the clear there.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from .records import (ARRAYS_KEY, CONFIG_KEY, KEEP_UPTO, METRICS_KEY, NUM_EXAMPLES, PERSONAL_UPTO, ROUND, STAGE,
                      FlowerRunConfig, NodeSettings, from_arrays, run_key, to_arrays)
from .task import (FederatedSetup, PersonalStore, evaluate_client, load_setup, personal_store, train_client,
                   use_threads_once)


def bind(context: Context, defaults: Mapping[str, object] | None) -> tuple[FederatedSetup, int, PersonalStore]:
    """(setup, this node's client, its personal store) from the node's context."""
    run = FlowerRunConfig.from_run_config({**(defaults or {}), **context.run_config})
    node = NodeSettings.from_node_config(context.node_config, run.client_state_dir)
    cfg = run.perseq_config()
    setup = load_setup(cfg)
    use_threads_once(cfg.train.threads)
    client = setup.client_of(node.partition_id, node.num_partitions)
    return setup, client, personal_store(node.state_dir, run_key(cfg), client)


def _dp_clipping(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``fixedclipping_mod`` when the server asks for client-side clipping (its
    DP wrapper puts the norm in the config), else nothing: one ClientApp serves both."""
    config = next(iter(msg.content.config_records.values()), ConfigRecord())
    if KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def make_client_app(defaults: Mapping[str, object] | None = None) -> ClientApp:
    """A ClientApp whose run config is ``defaults`` overridden by Flower's (``run_simulation``
    passes none, so tests and scripts give theirs here)."""
    app = ClientApp()

    @app.train(mods=[_dp_clipping])
    def train(msg: Message, context: Context) -> Message:
        setup, client, store = bind(context, defaults)
        config = msg.content[CONFIG_KEY]
        shared = from_arrays(msg.content[ARRAYS_KEY], setup.shared)
        res = train_client(setup, client, shared, int(config[ROUND]), store, int(config.get(KEEP_UPTO, -1)))
        return Message(RecordDict({
            ARRAYS_KEY: to_arrays(res.weights, setup.shared),
            METRICS_KEY: MetricRecord({NUM_EXAMPLES: res.n_targets, "train_loss": float(res.loss)}),
        }), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        setup, client, store = bind(context, defaults)
        config = msg.content[CONFIG_KEY]
        shared = from_arrays(msg.content[ARRAYS_KEY], setup.shared)
        n, metrics = evaluate_client(setup, client, shared, str(config.get(STAGE, "valid")),
                                     store.latest(upto=int(config.get(PERSONAL_UPTO, 1 << 30))))
        return Message(RecordDict({METRICS_KEY: MetricRecord({NUM_EXAMPLES: n, **metrics})}), reply_to=msg)

    return app


app = make_client_app()


# ------------------------------------------------------------------ SecAgg+ (legacy)
def make_secagg_client_app(defaults: Mapping[str, object] | None = None) -> ClientApp:
    """The client for the SecAgg+ legacy workflow (``server_app.make_secagg_server_app``):
    a NumPyClient behind ``secaggplus_mod``. It sends its update (new minus global
    weights), in the shared parameters' order: small values, which SecAgg+'s quantization
    (to [-secagg-clipping-range, +range]) keeps precise."""
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod

    class PerseqNumPyClient(NumPyClient):
        def __init__(self, context: Context):
            self.setup, self.client, self.store = bind(context, defaults)

        def _shared(self, parameters) -> dict[str, torch.Tensor]:
            if len(parameters) != len(self.setup.shared):
                raise ValueError(f"received {len(parameters)} arrays, expected {len(self.setup.shared)}")
            return {n: torch.from_numpy(np.asarray(a, dtype=np.float32).copy()) for n, a in zip(self.setup.shared, parameters)}

        def fit(self, parameters, config):
            shared = self._shared(parameters)
            res = train_client(self.setup, self.client, shared, int(config[ROUND]), self.store,
                               int(config.get(KEEP_UPTO, -1)))
            update = [(res.weights[n] - shared[n]).numpy() for n in self.setup.shared]
            return update, res.n_targets, {"train_loss": float(res.loss)}

        def evaluate(self, parameters, config):
            n, metrics = evaluate_client(self.setup, self.client, self._shared(parameters),
                                         str(config.get(STAGE, "valid")),
                                         self.store.latest(upto=int(config.get(PERSONAL_UPTO, 1 << 30))))
            return 0.0, n, metrics  # the loss slot is unused (perseq ranks, it has no eval loss)

    return ClientApp(client_fn=lambda context: PerseqNumPyClient(context).to_client(), mods=[secaggplus_mod])


secagg_app = make_secagg_client_app()
