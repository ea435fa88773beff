"""The ``federated`` section of a run config: who trains, how much, and how updates combine.

One round: the server samples ``clients_per_round`` clients; each starts from the global
weights, runs ``local_epochs`` passes over its own training windows with its own optimizer
(``train_step``, the library's one training step), and sends back its update (new weights
minus the global ones) and its target count; the server combines the updates
(``aggregator``, optionally norm-bounded, optionally with client-level DP) and applies them
with its own optimizer (``server_*``; lr 1 and momentum 0 is FedAvg).

The training budget of a federated row is its number of passes over each user's data:
rounds × local_epochs × clients_per_round / n_clients (``passes`` in the result's protocol).
"""
from __future__ import annotations

from dataclasses import dataclass

from .compress import UPDATE_BITS

AGGREGATORS = ("fedavg", "median", "trimmed_mean")
LOCAL_OPTIMIZERS = ("adam", "sgd")
SERVER_OPTIMIZERS = ("sgd", "adam")
ENGINES = ("batched", "loop")


@dataclass(frozen=True)
class FederatedConfig:
    rounds: int = 100  # communication rounds (early stopping on validation may end sooner)
    clients_per_round: int = 256  # clients sampled each round (0 = every client)
    users_per_client: int = 1  # 1: a client is one user's device; more: a group of users per client
    local_epochs: int = 1  # passes over the client's own training windows per round
    local_batch_size: int = 32  # training windows per local step
    local_optimizer: str = "adam"  # adam (AdamW with train.betas, train.weight_decay) | sgd; fresh every round
    local_lr: float = 1e-3  # the client optimizer's learning rate
    proximal_mu: float = 0.0  # FedProx: + mu/2 ||w - w_global||^2 in the local loss (0 = FedAvg)
    dml: float = 0.0  # PFSR's Dynamic Magnitude Loss (ours): + dml/2 · d/(d + dml_scale) · d², d = ||w - w_global|| (0 = off)
    dml_scale: float = 1.0  # the drift at which the DML's weight is half of dml
    personal_epochs: int = 0  # passes training only the client's personal parameters (shared weights frozen) before the local_epochs (ours, FedRep-style; loop engine and Flower)
    aggregator: str = "fedavg"  # fedavg (weighted by targets) | median | trimmed_mean (coordinate-wise, robust)
    trim: float = 0.1  # trimmed_mean: the fraction cut at each end
    update_bits: int = 32  # the upload: 32 (dense float32 update) | 8 (stochastically rounded 8-bit codes per row, ~1/4 the bytes; simulator only)
    max_update_norm: float | None = None  # bound each client's whole update to this L2 norm before aggregating
    server_optimizer: str = "sgd"  # sgd (lr 1, momentum 0: FedAvg; momentum > 0: FedAvgM) | adam (FedAdam)
    server_lr: float | None = None  # None: 1 for sgd (FedAvg), 1e-2 for adam (FedAdam's usual rate)
    server_momentum: float = 0.0  # sgd: server momentum (FedAvgM when > 0)
    dropout: float = 0.0  # probability that a sampled client drops out mid-round (its update never arrives)
    stragglers: float = 0.0  # probability that a sampled client misses the round's deadline (ignored by the server)
    poisoned: int = 0  # an attack, for robustness experiments: this many reporting clients per round send their update ...
    poison_scale: float = 100.0  # ... multiplied by this
    dp_clip: float | None = None  # client-level DP: clip each update to this L2 norm ...
    dp_noise: float = 0.0  # ... and add Gaussian noise of this multiplier × dp_clip to the sum
    dp_delta: float = 1e-6  # the δ of the (ε, δ) reported
    eval_every: int = 1  # evaluate the aggregated validation metric every this many rounds
    patience: int = 10  # evaluations without improvement before stopping (model selection on validation)
    engine: str = "loop"  # loop: one client after another through train_step (the reference; uses the fused CPU kernels) | batched: the round's clients at once (vmap over per-client weights; plain torch ops only)
    clients_per_batch: int = 256  # batched engine: clients trained together (memory: a copy of the weights and the optimizer state each)

    def __post_init__(self):
        for key in ("rounds", "users_per_client", "local_epochs", "local_batch_size", "eval_every", "patience",
                    "clients_per_batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"federated.{key}={getattr(self, key)!r}: must be at least 1")
        if self.clients_per_round < 0:
            raise ValueError(f"federated.clients_per_round={self.clients_per_round!r}: must be 0 (every client) or more")
        for key, valid in (("aggregator", AGGREGATORS), ("local_optimizer", LOCAL_OPTIMIZERS),
                           ("server_optimizer", SERVER_OPTIMIZERS), ("engine", ENGINES)):
            if getattr(self, key) not in valid:
                raise ValueError(f"federated.{key}={getattr(self, key)!r}; valid: {', '.join(valid)}")
        for key in ("dropout", "stragglers"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"federated.{key}={getattr(self, key)!r}: a probability in [0, 1)")
        if self.dml < 0 or self.dml_scale <= 0 or self.proximal_mu < 0:
            raise ValueError("federated.dml and proximal_mu must be >= 0 and federated.dml_scale > 0")
        if self.poisoned < 0:
            raise ValueError(f"federated.poisoned={self.poisoned!r}: must be 0 or more")
        if not 0 <= self.trim < 0.5:
            raise ValueError(f"federated.trim={self.trim!r}: must be in [0, 0.5)")
        if self.local_lr <= 0 or (self.server_lr is not None and self.server_lr <= 0):
            raise ValueError("federated.local_lr and federated.server_lr must be positive")
        if self.dp_noise < 0 or (self.dp_noise > 0 and self.dp_clip is None):
            raise ValueError("federated.dp_noise needs federated.dp_clip (the noise is a multiple of the clipping norm)")
        if self.update_bits not in UPDATE_BITS:
            raise ValueError(f"federated.update_bits={self.update_bits!r}; valid: {', '.join(map(str, UPDATE_BITS))}")
        if self.personal_epochs < 0:
            raise ValueError(f"federated.personal_epochs={self.personal_epochs!r}: must be 0 or more")
        if self.personal_epochs and self.engine == "batched":
            raise ValueError("federated.personal_epochs needs engine: loop (the batched engine trains every parameter together)")
