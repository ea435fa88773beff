"""What crosses Flower's wire, and the run's settings, as typed values.

Weights: a ``dict[str, Tensor]`` of SHARED parameters <-> Flower's ``ArrayRecord``
(:func:`to_arrays`, :func:`from_arrays`). Names and order are kept, every array is float32,
and both directions check the names against the list the receiver expects, so a personal
parameter (``personal.*``), a buffer or an integer array can neither be sent nor slip in.

Settings: Flower hands an app ``context.run_config``, a flat dict (the TOML table
``[tool.flwr.app.config]`` flattened with dots, plus ``flwr run --run-config`` overrides),
and ``context.node_config`` (``flower-supernode --node-config``, or the simulation's
partition ids). :class:`FlowerRunConfig` and :class:`NodeSettings` read them once, reject
unknown keys, and are what the rest of the package passes around; ``perseq_config()``
turns the run config into perseq's own :class:`~perseq.config.RunConfig`.

Run config keys (all optional):
  config                 path of a perseq YAML run config ("" = perseq's defaults)
  set                    whitespace-separated dotted overrides, as ``perseq train --set``:
                         "federated.rounds=3 train.seed=1"
  perseq.<section>.<key> one typed override each (a TOML table [tool.flwr.app.config.perseq.train]
                         with ``lr = 3e-4`` arrives as "perseq.train.lr"); applied before ``set``
  out                    the server's run folder ("" = <tmp>/perseq-flower/<run key>)
  resume, overwrite      as ``perseq federated simulate --resume / --overwrite``
  round-timeout          seconds the server waits for a round's replies (default 3600)
  client-state-dir       a node's state dir when its node config names none (simulations,
                         whose nodes get only partition ids)
  secagg-num-shares, secagg-reconstruction-threshold, secagg-clipping-range
                         SecAgg+ (the legacy-workflow apps only; see server_app.py)
Node config keys: partition-id, num-partitions (required), state-dir (where the node keeps
its personal parameters; default: the run config's client-state-dir, else
<tmp>/perseq-flower-state).

Nothing here trains or talks to the network; it imports Flower only for the record types.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

# ------------------------------------------------------------------------- message keys
ARRAYS_KEY = "arrays"  # the ArrayRecord of every message (Flower FedAvg's default key)
CONFIG_KEY = "config"  # the ConfigRecord of every server message
METRICS_KEY = "metrics"  # the MetricRecord of every client reply
NUM_EXAMPLES = "num-examples"  # FedAvg's weight: training targets (train) or scored users (evaluate)
TRAIN_METRICS = (NUM_EXAMPLES, "train_loss")  # a train reply's MetricRecord: exactly these keys
# server -> client ConfigRecord entries (besides Flower's own "server-round")
ROUND = "perseq-round"  # the 0-based round of the whole run (resumes continue it): local_update's seed
KEEP_UPTO = "perseq-keep-upto"  # train: keep the personal state as of this round (the best so far; -1 none)
STAGE = "perseq-stage"  # evaluate: "valid" or "test"
PERSONAL_UPTO = "perseq-personal-upto"  # evaluate: score with the personal state as of this round


def eval_metric_keys(ks: Sequence[int]) -> tuple[str, ...]:
    """An evaluate reply's MetricRecord keys: num-examples, then hr@K and ndcg@K for each
    K of ``eval.ks`` (scored users and the mean metrics over them)."""
    return (NUM_EXAMPLES, *(f"{m}@{k}" for k in ks for m in ("hr", "ndcg")))


# ---------------------------------------------------------------------------- weights
def to_arrays(tensors: Mapping[str, torch.Tensor], names: Sequence[str]) -> ArrayRecord:
    """The tensors ``names`` (in that order, and no others) as an ArrayRecord of float32
    arrays. ValueError when one is missing or not floating point."""
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"cannot send weights: missing {missing}")
    record = ArrayRecord()
    for n in names:
        t = tensors[n]
        if not t.is_floating_point():
            raise ValueError(f"cannot send {n!r}: dtype {t.dtype}; only floating-point weights are sent")
        record[n] = Array(t.detach().to("cpu", torch.float32).contiguous().numpy())
    return record


def from_arrays(record: ArrayRecord, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The ArrayRecord's arrays as float32 tensors; ValueError unless it holds exactly
    ``names``, in that order, all float32."""
    got = list(record.keys())
    if got != list(names):
        extra, missing = sorted(set(got) - set(names)), sorted(set(names) - set(got))
        raise ValueError(f"unexpected weights: missing {missing}, extra {extra}"
                         + ("" if extra or missing else " (same names, another order)"))
    out = {}
    for n in names:
        a = record[n].numpy()
        if a.dtype != np.float32:
            raise ValueError(f"received {n!r} as {a.dtype}; weights travel as float32")
        out[n] = torch.from_numpy(a.copy())  # numpy's buffer is read-only; torch wants its own
    return out


# --------------------------------------------------------------------------- settings
_DEFAULT_TIMEOUT = 3600.0


@dataclass(frozen=True)
class FlowerRunConfig:
    config: str | None = None  # perseq YAML run config (None = perseq's defaults)
    overrides: tuple[str, ...] = ()  # dotted "key=value" overrides, applied in order after the YAML
    out: str | None = None  # the server's run folder (None = under the system temp dir)
    resume: bool = False  # continue the run in ``out`` from its last finished round
    overwrite: bool = False  # replace a run already in ``out``
    round_timeout: float = _DEFAULT_TIMEOUT  # seconds to wait for a round's replies
    client_state_dir: str | None = None  # a node's state dir when its node config has no state-dir
    secagg_num_shares: float = 1.0  # SecAgg+: shares per client's key (a float: a fraction of the sampled clients)
    secagg_reconstruction_threshold: float = 0.5  # SecAgg+: shares needed to rebuild a key (float: fraction)
    secagg_clipping_range: float = 8.0  # SecAgg+: updates are clipped to [-r, r] before quantization

    def __post_init__(self):
        if self.round_timeout <= 0:
            raise ValueError(f"round-timeout={self.round_timeout!r}: must be positive")
        if self.secagg_clipping_range <= 0:
            raise ValueError(f"secagg-clipping-range={self.secagg_clipping_range!r}: must be positive")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> FlowerRunConfig:
        """Read Flower's flat run config (see the module docs); unknown keys are errors."""
        typed, kw = [], {}
        for key, value in run_config.items():
            if key.startswith("perseq."):
                typed.append(f"{key[len('perseq.'):]}={json.dumps(value, separators=(',', ':'))}")  # JSON is YAML: typed
            elif key == "config":
                kw["config"] = str(value) or None
            elif key == "set":
                kw["set"] = tuple(str(value).split())
            elif key in ("out", "client-state-dir"):
                kw[key.replace("-", "_")] = str(value) or None
            elif key in ("resume", "overwrite"):
                kw[key] = _as_bool(key, value)
            elif key in _FLOAT_KEYS:
                kw[_FLOAT_KEYS[key]] = float(value)
            else:
                valid = ["config", "set", "perseq.<section>.<key>", "out", "resume", "overwrite", "client-state-dir",
                         *_FLOAT_KEYS]
                raise ValueError(f"unknown run config key {key!r}; valid: {', '.join(valid)}")
        kw["overrides"] = tuple(typed) + kw.pop("set", ())
        return cls(**kw)

    def to_run_config(self) -> dict[str, object]:
        """The flat dict ``from_run_config`` reads back to an equal value (``set`` carries
        every override, typed ones included)."""
        out: dict[str, object] = {"config": self.config or "", "set": " ".join(self.overrides), "out": self.out or "",
                                  "resume": self.resume, "overwrite": self.overwrite,
                                  "client-state-dir": self.client_state_dir or ""}
        out |= {k: float(getattr(self, f)) for k, f in _FLOAT_KEYS.items()}
        return out

    def perseq_config(self):
        """perseq's RunConfig: the YAML (or the defaults), then the overrides in order."""
        from ...config import load_config
        from ...data.loading import resolve_data_config

        cfg = load_config(self.config, list(self.overrides))
        # data paths absolute, as `perseq train` saves them (evaluate works from any directory)
        return dataclasses.replace(cfg, data=resolve_data_config(cfg.data))

    def out_dir(self, cfg) -> Path:
        """The run folder: ``out``, or <tmp>/perseq-flower/<run key> when unset."""
        return Path(self.out) if self.out else Path(tempfile.gettempdir()) / "perseq-flower" / run_key(cfg)


_FLOAT_KEYS = {"round-timeout": "round_timeout", "secagg-num-shares": "secagg_num_shares",
               "secagg-reconstruction-threshold": "secagg_reconstruction_threshold",
               "secagg-clipping-range": "secagg_clipping_range"}


def _as_bool(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no", ""):
        return False
    raise ValueError(f"run config {key}={value!r}: expected true or false")


def run_key(cfg) -> str:
    """A short name for one experiment: where a node keeps its personal parameters, so two
    runs on one node never mix them and a resumed run finds its own. A hash of the config
    without the settings a resume may change (``train.RESUMABLE_CHANGES``: more rounds,
    another thread count, ...)."""
    from ...train import RESUMABLE_CHANGES

    d = cfg.to_dict()
    for sec, key in RESUMABLE_CHANGES:
        d.get(sec, {}).pop(key, None)
    name = cfg.name or f"{cfg.model['name']}-s{cfg.train.seed}"
    return f"{name}-{hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class NodeSettings:
    partition_id: int  # which perseq client this node is (0-based)
    num_partitions: int  # how many nodes the federation has: must equal the perseq client count
    state_dir: Path  # the node's own disk: personal parameters live under it

    def __post_init__(self):
        if not 0 <= self.partition_id < self.num_partitions:
            raise ValueError(f"node config partition-id={self.partition_id} is not in [0, num-partitions="
                             f"{self.num_partitions})")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object], default_state_dir: str | None = None) -> NodeSettings:
        missing = [k for k in ("partition-id", "num-partitions") if k not in node_config]
        if missing:
            raise ValueError(f"node config lacks {missing}: start the SuperNode with "
                             "--node-config 'partition-id=<i> num-partitions=<n>'")
        unknown = set(node_config) - {"partition-id", "num-partitions", "state-dir"}
        if unknown:
            raise ValueError(f"unknown node config key(s) {sorted(unknown)}; valid: partition-id, num-partitions, state-dir")
        state = node_config.get("state-dir") or default_state_dir or Path(tempfile.gettempdir()) / "perseq-flower-state"
        return cls(int(node_config["partition-id"]), int(node_config["num-partitions"]), Path(str(state)))

