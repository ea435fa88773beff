"""Model registry: an explicit dict from name to class (DESIGN.md §2)."""
from __future__ import annotations

import dataclasses

from .base import SeqRecModel
from .bert4rec import BERT4Rec
from .gru4rec import GRU4Rec
from .hstu import HSTU, HSTULarge
from .llama import LlamaRec
from .mamba4rec import Mamba4Rec
from .pcrec import PCRec, PCRecLarge, SASRecPC
from .persrec import HSTUPerSRec, LlamaPerSRec, SASRecPerSRec
from .pfsr import PFSR
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
    "pcrec": PCRec,
    "pcrec-large": PCRecLarge,
    "sasrec-pc": SASRecPC,
    "pfsr": PFSR,
    "sasrec+persrec": SASRecPerSRec,
    "hstu+persrec": HSTUPerSRec,
    "llama+persrec": LlamaPerSRec,
}


def model_class(name: str) -> type[SeqRecModel]:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def check_params(name: str, params: dict) -> type[SeqRecModel]:
    """The model's class, after checking ``name`` and that every parameter exists: unknown
    ones are an error that lists the valid ones (a typo in a YAML file must not be silently
    ignored). Cheap, so the CLI runs it before loading any data."""
    cls = model_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = set(params) - fields
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)} for model {name!r}; valid: {sorted(fields - {'n_items'})}")
    return cls


def build_model(name: str, n_items: int, **params) -> SeqRecModel:
    """Build ``name`` with its frozen config (parameters checked by ``check_params``)."""
    cls = check_params(name, params)
    return cls(cls.Config(n_items=n_items, **params))


#: One line per model for ``perseq models`` (the module docs hold the details).
SUMMARY: dict[str, str] = {
    "sasrec": "SASRec: causal self-attention (Kang & McAuley, ICDM 2018)",
    "gru4rec": "GRU4Rec: a GRU over the sequence (Hidasi et al., ICLR 2016)",
    "bert4rec": "BERT4Rec: bidirectional Transformer with the Cloze task (Sun et al., CIKM 2019)",
    "ttt4rec": "TTT4Rec: blocks whose state is a small model trained as it reads (Yang et al., 2024)",
    "hstu": "HSTU: pointwise-attention units with time/position bias (Zhai et al., ICML 2024)",
    "hstu-large": "HSTU at the paper's large size (8 blocks, d 256)",
    "llama": "LLaMA-style decoder: RMSNorm, rotary positions, SwiGLU (Touvron et al., 2023)",
    "mamba4rec": "Mamba4Rec: selective state-space blocks (Liu et al., 2024)",
    "pcrec": "PCRec: HSTU + a predictive-coding correction per block, one inference step per forward (KDD 2025)",
    "pcrec-large": "PCRec at HSTU-large's size (8 blocks, 2 heads)",
    "sasrec-pc": "SASRec + PCRec's predictive-coding module per block (the paper's future work)",
    "sasrec+persrec": "SASRec in PerSRec form: old history compressed into K cached tokens, the recent R encoded per request",
    "hstu+persrec": "HSTU in PerSRec form (K compression tokens per history segment, no time bias)",
    "llama+persrec": "LLaMA-style decoder in PerSRec form (rotary positions restart per segment)",
    "pfsr": "PFSR (our reading of arXiv 2603.22349): Mamba4Rec + a global associative memory + per-user FiLM (personal.*)",
}


def describe_models() -> list[tuple[str, str]]:
    """(name, one line) per registry model: what it is and what it supports (causal or
    Cloze objective; incremental ``step`` serving)."""
    rows = []
    for name, cls in MODELS.items():
        traits = [cls.objective, "incremental step" if getattr(cls, "incremental", False) else "full re-encode only"]
        rows.append((name, f"{SUMMARY.get(name, cls.__name__)} [{', '.join(traits)}]"))
    return rows
