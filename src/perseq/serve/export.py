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

import numpy as np
import torch
import torch.nn as nn

from ..checkpoint import load_model
from .engine import _flatten, _unflatten

EXPORTABLE = ("gru4rec", "mamba4rec")


class StepGraph(nn.Module):
    """(item, *state) -> (scores, *new state) around a model's ``step``; with
    ``hidden=True``, (hidden (1, d), *new state) instead (the server's fast step)."""

    def __init__(self, model, spec, hidden: bool = False):
        super().__init__()
        self.model, self.spec, self.hidden = model, spec, hidden

    def forward(self, item, *flat):
        state = _unflatten(self.spec, {f"s{i}": t for i, t in enumerate(flat)})
        state, h = self.model.step(state, item)
        if self.hidden:
            out = {}
            _flatten(state, "", out)
            return (h, *out.values())
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


class OnnxStep:
    """A recurrent model's ``step`` run by onnxruntime (one thread): the server's fast path
    for GRU4Rec and Mamba4Rec, about 7x less time per event than the torch ``step`` at batch
    1, where torch's per-op dispatch dominates. Same state layout as the torch step, so
    workers on either path share one store; ``tests/test_export.py`` checks it against the
    reference step."""

    def __init__(self, model):
        import io
        import warnings

        import onnxruntime as ort

        self.spec, state = initial_state(model)
        self.names = [f"state_{i}" for i in range(len(state))]
        buf = io.BytesIO()
        # .eval(): the exporter puts the wrapper back in its own mode afterwards, and a fresh
        # module's is training, which would switch the served model's dropout on.
        # The tracer's notes (Python booleans taken from tensors, the legacy exporter) are
        # about shapes this graph never changes: one event, batch 1; parity is tested
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(StepGraph(model, self.spec, hidden=True).eval(), (torch.tensor([1]), *state), buf,
                              input_names=["item", *self.names], output_names=["hidden", *[f"new_{n}" for n in self.names]],
                              dynamo=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])

    def __call__(self, state, item: int):
        """(state, item index) -> (new state, hidden (1, d)), as ``model.step``."""
        flat = {}
        _flatten(state, "", flat)
        feeds = {"item": np.array([item], dtype=np.int64)}
        feeds.update((n, t.numpy()) for n, t in zip(self.names, flat.values()))
        h, *new = self.session.run(None, feeds)
        return _unflatten(self.spec, {f"s{i}": torch.from_numpy(t) for i, t in enumerate(new)}), torch.from_numpy(h)


def export_onnx(run: str, out: str | Path) -> dict:
    model, meta, item_ids = load_model(run)
    name = meta["run"]["model"]["name"]
    if name not in EXPORTABLE:
        raise ValueError(f"on-device export takes {', '.join(EXPORTABLE)}; {run} is a {name}")
    model.eval()
    spec, state = initial_state(model)
    graph = StepGraph(model, spec).eval()  # export restores the wrapper's mode, and the model's with it
    out = Path(out)
    names = [f"state_{i}" for i in range(len(state))]
    with torch.no_grad():
        torch.onnx.export(graph, (torch.tensor([1]), *state), str(out), input_names=["item", *names],
                          output_names=["scores", *[f"new_{n}" for n in names]], dynamo=False)
    info = {"model": name, "run": str(run), "inputs": ["item", *names], "outputs": ["scores", *[f"new_{n}" for n in names]],
            "state_shapes": [list(t.shape) for t in state], "item_ids": [str(x) for x in item_ids]}
    out.with_suffix(".json").write_text(json.dumps(info))
    return info
