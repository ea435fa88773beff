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
from .losses import LossConfig


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "synthetic"  # registry name ("ml-1m", "amazon-beauty", ...), "synthetic", or "file"
    path: str | None = None  # with dataset="file": the file to read
    format: str | None = None  # reader name; None = guess from the file
    times_path: str | None = None  # user-per-line timestamps aligned with ``path``
    columns: dict | None = None  # column mapping for generic tables: {user:, item:, time:}
    min_user: int = 0  # k-core thresholds (0 = keep everything)
    min_item: int = 0
    dedup: bool = False
    download: bool = False  # fetch a registry dataset that is neither shared nor cached
    split: str = "leave_one_out"  # or "temporal"
    max_len: int = 200
    windows: str = "all"  # "all": every training position is a target; "last": most recent max_len only
    synthetic: dict = field(default_factory=dict)  # parameters of the synthetic generator


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float | None = 1.0
    patience: int = 10  # evaluations without improvement before stopping
    eval_every: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | mps
    threads: int | None = None  # torch CPU threads (None = torch default)
    # after early stopping, train a fresh model (same seed) on training + validation events
    # for the best epoch count and test that one (leave-one-out only; see fit)
    refit: bool = False
    # with refit: skip the early-stopping phase and refit for this many epochs straight away
    # (generative-recommenders' protocol: 101 epochs on every event but the test one)
    refit_epochs: int | None = None


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: dict = field(default_factory=lambda: {"name": "sasrec"})
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    name: str | None = None  # run name (output folder)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)


_SECTIONS = {"data": DataConfig, "train": TrainConfig, "loss": LossConfig, "eval": EvalConfig}


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
        kw[k] = v
    return cls(**kw)


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
