"""Run configuration: frozen dataclasses, loaded from YAML with dotted ``--set`` overrides.

Unknown keys are errors that list the valid ones, so a typo never silently falls back to a
default. The model section is ``{name: <registry name>, <param>: <value>, ...}`` and is
validated against that model's own config dataclass when the model is built.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .evaluate import EvalConfig
from .federated.config import FederatedConfig
from .losses import LossConfig


@dataclass(frozen=True)
class DataConfig:
    # what to read, first match wins: a registry name ("ml-1m", "amazon-beauty", ...) or
    # "synthetic", then a folder written by `perseq data prepare`, then a data file (its
    # format guessed, `format` overrides). "file" + `path` is the older spelling of the last.
    # perseq.data.loading.resolve_data_config turns every path absolute before a run is saved
    dataset: str = "synthetic"
    path: str | None = None  # with dataset="file": the file to read
    format: str | None = None  # reader name; None = guess from the file
    times_path: str | None = None  # user-per-line timestamps aligned with ``path``
    columns: dict | None = None  # column mapping for generic tables: {user:, item:, time:, rating:}
    on_error: str = "raise"  # malformed lines: "raise" (error naming file and line) or "skip" (counted)
    min_rating: float | None = None  # keep events rated >= this (formats with a rating column only)
    min_user: int = 0  # k-core: keep users with at least this many events (0 = keep everything)
    min_item: int = 0  # k-core: keep items with at least this many events (0 = keep everything)
    dedup: bool = False  # keep only the earliest event of each (user, item) pair (repeats are counted either way)
    download: bool = False  # fetch a registry dataset that is neither shared nor cached
    split: str = "leave_one_out"  # or "temporal"
    max_len: int = 200  # the most recent events a model reads (its window)
    windows: str = "all"  # "all": every training position is a target; "last": most recent max_len only
    synthetic: dict = field(default_factory=dict)  # parameters of the synthetic generator


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 200  # at most this many epochs (early stopping usually ends sooner)
    batch_size: int = 128  # training windows per step
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas
    grad_clip: float | None = 1.0  # clip the gradient norm to this (null = no clipping)
    patience: int = 10  # evaluations without improvement before stopping
    eval_every: int = 1  # evaluate validation every this many epochs
    seed: int = 0  # model init, batch order and dropout; --seeds runs several
    device: str = "auto"  # auto | cpu | cuda | mps
    threads: int | None = None  # CPU threads (None = automatic: the cores not busy now; see perseq.runtime)
    # within a long epoch, also save a resumable checkpoint this often (0 = epoch ends only),
    # so a kill loses minutes, not an epoch
    checkpoint_minutes: float = 5.0
    # after early stopping, train a fresh model (same seed) on training + validation events
    # for the best epoch count and test that one (leave-one-out only; see fit)
    refit: bool = False
    # with refit: skip the early-stopping phase and refit for this many epochs straight away
    # (generative-recommenders' protocol: 101 epochs on every event but the test one)
    refit_epochs: int | None = None

    def __post_init__(self):
        for key in ("epochs", "batch_size", "patience", "eval_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)!r}: must be at least 1")
        if self.lr <= 0:
            raise ValueError(f"train.lr={self.lr!r}: must be positive")
        if self.checkpoint_minutes < 0:
            raise ValueError(f"train.checkpoint_minutes={self.checkpoint_minutes!r}: must be 0 (epoch ends only) or more")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: dict = field(default_factory=lambda: {"name": "sasrec"})
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)  # read by `perseq federated` only
    name: str | None = None  # run name: the run folder is <out>/<name>-s<seed>

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)


_SECTIONS = {"data": DataConfig, "train": TrainConfig, "loss": LossConfig, "eval": EvalConfig, "federated": FederatedConfig}


def _build(cls, values: dict, where: str):
    valid = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(valid)
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in '{where}'; valid: {sorted(valid)}")
    kw = {}
    for k, v in values.items():
        default = getattr(cls(), k) if k in valid else None
        if isinstance(default, tuple) and isinstance(v, list):
            v = tuple(v)  # YAML lists -> the tuple fields (ks, betas) the dataclass declares
        _check_type(f"{where}.{k}", v, valid[k].type)
        kw[k] = v
    return cls(**kw)


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),), "dict": (dict,)}


def _check_type(key: str, value, annotation: str) -> None:
    """A value of the wrong type (``--set train.lr=abc``) is an error naming the key, before
    any data loads, instead of a TypeError deep inside training."""
    allowed: tuple = ()
    for part in str(annotation).split("|"):
        part = part.strip()
        allowed += (tuple, list) if part.startswith("tuple") else _TYPES.get(part.split("[")[0], (object,))
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not ok:
        raise ValueError(f"{key}={value!r}: expected {annotation}")


def from_dict(d: dict) -> RunConfig:
    d = dict(d or {})
    unknown = set(d) - set(_SECTIONS) - {"model", "name"}
    if unknown:
        raise ValueError(f"unknown section(s) {sorted(unknown)}; valid: {sorted(set(_SECTIONS) | {'model', 'name'})}")
    kw: dict[str, Any] = {s: _build(cls, d.get(s) or {}, s) for s, cls in _SECTIONS.items()}
    model = {"name": "sasrec", **(d.get("model") or {})}
    return RunConfig(model=model, name=d.get("name"), **kw)


def set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise ValueError(f"--set {key}: '{p}' is not a section")
    cur[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=3e-4' -> ('train.lr', 0.0003); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ValueError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    if isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" as a string; numbers are what is meant
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"config file not found: {p}")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{p}: the top level must be a mapping of sections")
    for o in overrides:
        set_dotted(raw, *parse_override(o))
    return from_dict(raw)


# ------------------------------------------------------------------ `perseq config show`
def field_help(cls) -> dict[str, str]:
    """Each field's help: its trailing ``# comment``, or the comment block just above it.
    The dataclasses' own comments are the one place settings are explained, so the CLI
    reads them instead of keeping a second copy that could drift."""
    import inspect
    import re

    helps: dict[str, str] = {}
    for base in reversed(cls.__mro__):  # a subclass's comments win; fields it inherits keep its bases'
        if dataclasses.is_dataclass(base) and base is not cls:
            helps.update({k: v for k, v in field_help(base).items() if v})
    block: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            block.append(text.lstrip("# ").strip())
            continue
        m = re.match(r"(\w+)\s*:[^#]*?(?:#\s*(.*))?$", text)
        if m and not text.startswith(("def ", "@", '"""')):
            helps[m.group(1)] = m.group(2) or " ".join(block) or helps.get(m.group(1), "")
        block = []
    return helps


# the settings most backbones share, which their Config classes leave uncommented
_COMMON_MODEL_HELP = {
    "max_len": "longest input the model reads (default: data.max_len)",
    "d": "hidden size (and item embedding size)",
    "n_blocks": "number of stacked blocks (layers)",
    "n_heads": "attention heads per block",
    "dropout": "dropout rate on hidden states",
    "n_layers": "number of stacked layers",
}


def describe(cfg: RunConfig) -> list[tuple[str, Any, Any, str]]:
    """(dotted key, value in ``cfg``, default, help) for every setting, the model section
    from the model's own Config (``model.name`` chooses which)."""
    from .models.registry import model_class

    rows = [("name", cfg.name, None, field_help(RunConfig)["name"])]
    for sec, cls in _SECTIONS.items():
        helps, now = field_help(cls), getattr(cfg, sec)
        for f in dataclasses.fields(cls):
            rows.append((f"{sec}.{f.name}", getattr(now, f.name), getattr(cls(), f.name), helps.get(f.name, "")))
    mcls = model_class(cfg.model["name"]).Config
    helps = {**_COMMON_MODEL_HELP, **{k: v for k, v in field_help(mcls).items() if v}}
    rows.append(("model.name", cfg.model["name"], "sasrec", "the model (perseq models lists them)"))
    for f in dataclasses.fields(mcls):
        if f.name == "n_items":
            continue  # set from the data
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if f.name == "max_len":
            default = "data.max_len"
        rows.append((f"model.{f.name}", cfg.model.get(f.name, default), default, helps.get(f.name, "")))
    return rows
