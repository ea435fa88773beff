"""Which of a trained model's parameters a user's adaptation may change (``AdaptConfig.scope``).

    all         every parameter (the item table included: a user's steps may move items)
    last_block  the last element of the model's stack of blocks (its first ModuleList)
    norms       the weights and biases of its normalization layers (LayerNorm, RMSNorm, ...)
    bias        every parameter whose name ends in "bias"
    lora:r      a rank-r delta U·V on every 2-D weight of a Linear layer: W + U V with U
                (out, r) starting at zero and V (r, in) fixed random, so the adapted model
                starts as the trained one and moves in an r-dimensional subspace per matrix

A scope that selects nothing for a model (HSTU has no affine norms) is an error, not a
silent no-op.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

SCOPES = ("all", "last_block", "norms", "bias", "lora:<r>")


def _last_block_prefix(model: nn.Module) -> str | None:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and any(True for _ in mod[-1].parameters()):
            return f"{name}.{len(mod) - 1}."
    return None


def parse_scope(scope: str) -> tuple[str, int]:
    """'lora:4' -> ('lora', 4); other scopes -> (scope, 0)."""
    m = re.fullmatch(r"lora:(\d+)", scope)
    if m:
        if int(m.group(1)) < 1:
            raise ValueError(f"scope {scope!r}: the rank must be at least 1")
        return "lora", int(m.group(1))
    if scope not in SCOPES:
        raise ValueError(f"unknown adaptation scope {scope!r}; valid: {', '.join(SCOPES)}")
    return scope, 0


def selected(model: nn.Module, scope: str) -> list[str]:
    """Names of the parameters ``scope`` adapts (for lora: the weights that get a delta)."""
    kind, _ = parse_scope(scope)
    params = dict(model.named_parameters())
    if kind == "all":
        names = list(params)
    elif kind == "last_block":
        prefix = _last_block_prefix(model)
        names = [n for n in params if prefix and n.startswith(prefix)]
    elif kind == "norms":
        norm_mods = [n for n, m in model.named_modules() if "norm" in type(m).__name__.lower()]
        names = [n for n in params if any(n.startswith(m + ".") for m in norm_mods)]
    elif kind == "bias":
        names = [n for n in params if n.endswith("bias")]
    else:  # lora: the weights of Linear layers
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        names = [f"{n}.weight" for n in linears]
    if not names:
        raise ValueError(f"adaptation scope {scope!r} selects no parameter of {type(model).__name__}")
    return names


def lora_factors(model: nn.Module, names: list[str], rank: int, seed: int = 0) -> tuple[dict, dict]:
    """(U, V) per weight: U (out, r) zeros, the per-user trainable part; V (r, in) drawn
    once with a fixed seed, scaled 1/sqrt(in) so U V has the scale of a weight update."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    U, V = {}, {}
    for n in names:
        W = params[n]
        out, inp = W.shape
        U[n] = torch.zeros(out, rank, dtype=W.dtype, device=W.device)
        V[n] = (torch.randn(rank, inp, generator=g) / inp**0.5).to(W.dtype).to(W.device)
    return U, V
