"""perseq's federated training as real Flower apps (flwr 1.4x Message API), running the
same client step (``perseq.federated.client.local_update``) and the same aggregation
(``perseq.federated.strategies``, ``perseq.federated.privacy``) as the in-process simulator.

  client_app.app     the ClientApp (one node = one perseq client; DP clipping on request)
  server_app.app     the ServerApp (PerseqFedAvg; optional Flower DP wrapper; run folder)
  client_app.secagg_app, server_app.secagg_app
                     the same training under SecAgg+ (Flower's legacy workflow)
  records            weights <-> ArrayRecord, run_config -> FlowerRunConfig, node_config
  task               the torch side (no Flower): data, model, a client's round, its store
  strategy           PerseqFedAvg, a Message-API FedAvg aggregating with perseq
  legacy             PerseqLegacyFedAvg, its legacy-API twin for SecAgg+
  run_folder         the server's resumable run folder (no Flower)

Needs the ``federated`` extra (``pip install 'perseq[federated]'``, which brings
``flwr[simulation]``); nothing outside this package imports Flower. Example app (``flwr
run``): examples/flower-app.
"""
