"""On-device export: a recurrent model's incremental step as an ONNX graph.

    perseq export runs/ml-1m-mamba4rec-s0 --onnx mamba.onnx

The graph is one event: inputs ``item`` (1,) int64 and the state tensors ``state_0 …``;
outputs ``scores`` (1, n_items + 1; column 0 is padding, -inf) and the new state
``new_state_0 …`` in the same order.
A device keeps the state between events and never sends its history anywhere. The state's
initial (all-zero) value and shapes are in ``<out>.json`` beside the graph, with the item
ids in score order. GRU4Rec and Mamba4Rec are exported; PFSR's personal parameters would
ride in the same way (not done yet).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import load_model
from .engine import _flatten, _unflatten

EXPORTABLE = ("gru4rec", "mamba4rec")


class StepGraph(nn.Module):
    """(item, *state) -> (scores, *new state) around a model's ``step``."""

    def __init__(self, model, spec):
        super().__init__()
        self.model, self.spec = model, spec

    def forward(self, item, *flat):
        state = _unflatten(self.spec, {f"s{i}": t for i, t in enumerate(flat)})
        state, h = self.model.step(state, item)
        scores = h @ self.model.output_embeddings().T  # (1, n_items + 1)
        # column 0 is padding, never an item: -inf, as the server's scores
        scores = torch.cat([torch.full_like(scores[:, :1], float("-inf")), scores[:, 1:]], 1)
        out = {}
        _flatten(state, "", out)
        return (scores, *out.values())


def initial_state(model):
    """(spec, tensors in order) of the model's empty state, with paths renamed s0, s1, ..."""
    tensors = {}
    spec = _flatten(model.init_state(1), "", tensors)
    rename = {path: f"s{i}" for i, path in enumerate(tensors)}
    return _rename(spec, rename), list(tensors.values())


def _rename(spec, rename):
    if "t" in spec:
        return {"t": rename[spec["t"]]}
    for k in ("d", "l", "u"):
        if k in spec:
            inner = spec[k]
            return {k: {n: _rename(v, rename) for n, v in inner.items()} if k == "d" else [_rename(v, rename) for v in inner]}
    return spec


def export_onnx(run: str, out: str | Path) -> dict:
    model, meta, item_ids = load_model(run)
    name = meta["run"]["model"]["name"]
    if name not in EXPORTABLE:
        raise ValueError(f"on-device export takes {', '.join(EXPORTABLE)}; {run} is a {name}")
    model.eval()
    spec, state = initial_state(model)
    graph = StepGraph(model, spec)
    out = Path(out)
    names = [f"state_{i}" for i in range(len(state))]
    with torch.no_grad():
        torch.onnx.export(graph, (torch.tensor([1]), *state), str(out), input_names=["item", *names],
                          output_names=["scores", *[f"new_{n}" for n in names]], dynamo=False)
    info = {"model": name, "run": str(run), "inputs": ["item", *names], "outputs": ["scores", *[f"new_{n}" for n in names]],
            "state_shapes": [list(t.shape) for t in state], "item_ids": [str(x) for x in item_ids]}
    out.with_suffix(".json").write_text(json.dumps(info))
    return info
