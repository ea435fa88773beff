"""Model registry: an explicit dict from name to class (DESIGN.md §2)."""
from __future__ import annotations

import dataclasses

from .base import SeqRecModel
from .bert4rec import BERT4Rec
from .gru4rec import GRU4Rec
from .hstu import HSTU, HSTULarge
from .llama import LlamaRec
from .mamba4rec import Mamba4Rec
from .sasrec import SASRec
from .ttt4rec import TTT4Rec

MODELS: dict[str, type[SeqRecModel]] = {
    "sasrec": SASRec,
    "gru4rec": GRU4Rec,
    "bert4rec": BERT4Rec,
    "ttt4rec": TTT4Rec,
    "hstu": HSTU,
    "hstu-large": HSTULarge,
    "llama": LlamaRec,
    "mamba4rec": Mamba4Rec,
}


def model_class(name: str) -> type[SeqRecModel]:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def build_model(name: str, n_items: int, **params) -> SeqRecModel:
    """Build ``name`` with its frozen config; unknown parameters are an error that lists
    the valid ones (a typo in a YAML file must not be silently ignored)."""
    cls = model_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = set(params) - fields
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)} for model {name!r}; valid: {sorted(fields - {'n_items'})}")
    return cls(cls.Config(n_items=n_items, **params))
