"""A trained run folder loaded for serving (DESIGN.md §6): raw item ids in and out, each
user's state advanced one event at a time, and stateless scoring of a given history.

How a user's state moves with each event, by model:

* ``recurrent`` (GRU4Rec, Mamba4Rec, TTT4Rec): the model's own ``step``; a fixed-size state,
  O(1) per event, and the recommendations read the whole history.
* ``window`` (SASRec, HSTU, LLaMA-style): ``step`` against a KV cache of the last events. The
  cache ends at ``max_input_len`` (W) events, so when it is full the oldest W/4 are dropped
  and the cache rebuilt from the remaining ones, one pass (amortized over W/4 events). The
  recommendations read between 3W/4 + 1 and W events: the events in the state's window.
* ``persrec`` (PerSRec forms): ``stream_step``; the old history lives in K cached tokens,
  folded in ``fold`` events at a time, so the cost per event is flat forever.
* ``replay`` (every other model: BERT4Rec, PCRec, ...): no incremental step; the last W
  events are kept and re-encoded per recommendation.

``stateless_hidden`` scores a history given in full the way the state would after those
events (the whole history for recurrent and PerSRec models, the last W for the others;
windowed models use the same last-W window as ``perseq predict``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save as st_save
from safetensors.torch import load as st_load

from ..checkpoint import load_model

KINDS = ("recurrent", "window", "persrec", "replay")
STATE_FORMAT = 3  # 2: PFSR states carry personal.*, windowed models' their window ids only; 3: seen-item bitmaps


class Engine:
    """``step``: how recurrent models advance, "torch" (the reference ``model.step``),
    "onnx" (``export.OnnxStep``: onnxruntime, for GRU4Rec, Mamba4Rec and PFSR) or "auto"
    (onnx where the model and onnxruntime allow, else torch, also when building it fails)."""

    def __init__(self, run_dir: str | Path, popularity: np.ndarray | None = None, step: str = "auto"):
        self.run_dir = Path(run_dir)
        self.model, self.meta, self.item_ids = load_model(run_dir)
        self.model.eval()
        self.name = self.meta["run"]["model"]["name"]
        self.n_items = self.model.n_items
        self.index = {str(raw): i for i, raw in enumerate(self.item_ids) if i > 0}
        # the model version keys every stored state: another checkpoint cannot read it
        # (and the state format, STATE_FORMAT: states of an older layout are rebuilt from events)
        digest = hashlib.sha256((self.run_dir / "model.safetensors").read_bytes())
        digest.update(f"state-format {STATE_FORMAT}".encode())
        self.version = digest.hexdigest()[:16]
        self.W = self.model.max_input_len
        self.slack = max(1, self.W // 4)
        m = self.model
        if hasattr(m, "stream_step"):
            self.kind = "persrec"
        elif getattr(m, "incremental", False):
            self.kind = "window" if getattr(m, "state_grows", False) else "recurrent"
        else:
            self.kind = "replay"
        if step not in ("auto", "torch", "onnx"):
            raise ValueError(f"step must be auto, torch or onnx, got {step!r}")
        self._step = self._fast_step(step) if self.kind == "recurrent" else self._torch_step
        self.step_backend = "torch" if self._step == self._torch_step else "onnx"
        # windowed models with a one-pass prefill store their window's ids, not the KV cache
        self._ids_only = self.kind == "window" and hasattr(m, "prefill")
        # PFSR served centrally: each user's personal parameters (personal.*) from the run's
        # simulated devices, kept in that user's state; a user the run did not train starts
        # from the model's own (the identity response)
        from ..federated.client import personal_names

        self.personal_names = personal_names(m)
        self._personal = {}
        if self.personal_names or popularity is None:
            from ..cli import _rebuild_split

            data = _rebuild_split(self.meta)[1].data
            if self.personal_names:
                from ..federated.personal import personal_by_user

                self._personal = personal_by_user(self.run_dir, self.meta, data.user_ids)
            if popularity is None:
                popularity = _popularity(data.items, self.n_items)
        self._popular = popularity
        self.titles = item_titles(self.meta["run"]["data"]["dataset"])
        if getattr(getattr(m, "cfg", None), "time_bias", False) and self.kind != "persrec":
            import sys

            print(f"note: {self.name}'s time bias is not applied when serving (events reach step without their "
                  "times); on data with timestamps its scores differ from perseq evaluate's", file=sys.stderr)

    # -- ids ----------------------------------------------------------------------------
    def ids(self, raw: list[str]) -> tuple[list[int], list[str]]:
        """Raw item ids -> (known indices in order, unknown raw ids)."""
        known, unknown = [], []
        for r in raw:
            i = self.index.get(str(r))
            (known.append(i) if i is not None else unknown.append(str(r)))
        return known, unknown

    # -- per-user state -----------------------------------------------------------------
    def init(self, user: str | None = None) -> dict:
        """A user's empty state (with their personal parameters, for PFSR)."""
        m = self.model
        if self.personal_names:  # PFSR is recurrent
            from ..federated.personal import personal_values

            personal = {n: t.clone() for n, t in personal_values(m, self._personal.get(user, {})).items()}
            return {"s": m.init_state(1), "h": None, "window": torch.zeros(0, dtype=torch.long), "personal": personal}
        if self.kind == "persrec":
            empty = torch.zeros(1, 0, dtype=torch.long)
            return {"s": m.stream_state(m.compress(empty), empty), "h": None}
        if self.kind in ("recurrent", "window"):
            return {"s": m.init_state(1), "h": None, "window": torch.zeros(0, dtype=torch.long)}
        return {"window": torch.zeros(0, dtype=torch.long)}

    @torch.no_grad()
    def advance(self, state: dict, items: list[int]) -> dict:
        """The state after ``items`` (indices), one event at a time."""
        m = self.model
        for i in items:
            it = torch.tensor([i])
            if self.kind == "persrec":
                state["s"], state["h"] = m.stream_step(state["s"], it)
            elif self.kind == "recurrent":
                state["s"], state["h"] = self._step(state["s"], i, state.get("personal"))
            elif self.kind == "window":
                if len(state["window"]) >= self.W:  # slide: rebuild from the newest W - slack
                    state["window"] = state["window"][self.slack :]
                    state["s"], state["h"] = self._prefill(state["window"])
                state["s"], state["h"] = m.step(state["s"], it)
                state["window"] = torch.cat([state["window"], it])
            else:
                state["window"] = torch.cat([state["window"], it])[-self.W :]
        return state

    def _fast_step(self, step: str):
        """A recurrent model's step for ``step`` (the class docstring): onnxruntime's where
        asked for and possible, else torch's."""
        if step == "torch":
            return self._torch_step
        from .export import EXPORTABLE, OnnxStep

        try:
            import onnxruntime  # noqa: F401
            usable = self.name in EXPORTABLE
        except ImportError:
            usable = False
        if not usable:
            if step == "onnx":
                raise ValueError(f"the onnx step needs onnxruntime and one of {', '.join(EXPORTABLE)} ({self.name})")
            return self._torch_step
        try:
            return OnnxStep(self.model)
        except Exception as err:  # noqa: BLE001 - auto: the reference step always works
            if step == "onnx":
                raise
            import sys

            print(f"note: the onnx step of {self.name} failed to build ({err}); using torch's", file=sys.stderr)
            return self._torch_step

    def _torch_step(self, state, i: int, personal: dict | None = None):
        if personal is None:
            return self.model.step(state, torch.tensor([i]))
        with self.model.personal_rows({n: t[None] for n, t in personal.items()}):
            return self.model.step(state, torch.tensor([i]))

    def _prefill(self, events: torch.Tensor):
        if hasattr(self.model, "prefill"):  # one pass (SASRec, HSTU, LLaMA-style)
            return self.model.prefill(events[None])
        s, h = self.model.init_state(1), None
        for i in events.tolist():
            s, h = self.model.step(s, torch.tensor([i]))
        return s, h

    @torch.no_grad()
    def state_hidden(self, state: dict) -> torch.Tensor | None:
        """(D,) hidden state that scores the next item; None before any event."""
        if self.kind == "replay":
            w = state["window"]
            return None if len(w) == 0 else self._encode_last(w)
        return None if state["h"] is None else state["h"][0]

    @torch.no_grad()
    def stateless_hidden(self, items: list[int]) -> torch.Tensor:
        """(D,) for a history given in full (module docstring: which part is read)."""
        m = self.model
        x = torch.tensor(items, dtype=torch.long)
        if self.kind == "persrec":
            f = m.folded(len(items))
            return m.recommend_hidden(m.compress(x[None, :f], segment=m.fold), x[None, f:])[0]
        if self.kind == "recurrent":
            return m.encode(x[None])[0, -1]
        return self._encode_last(x[-self.W :])

    def _encode_last(self, window: torch.Tensor) -> torch.Tensor:
        return self.model.predict_hidden(window[None], torch.tensor([len(window)]))[0]

    # -- the user's seen items (what exclude_seen masks), kept in the state ---------------
    def add_seen(self, state: dict, idx: list[int]) -> dict:
        """Add item indices to ``state["seen"]``: a sorted index list (int64) while that is
        the smaller form, then a bitmap of the catalogue (uint8, n_items/8 bytes), so the
        stored state, and with it the cost of an event, stops growing with the history."""
        seen = state.get("seen", torch.zeros(0, dtype=torch.long))
        if idx:
            new = np.asarray(idx, dtype=np.int64)
            if seen.dtype == torch.uint8:
                bits = np.unpackbits(seen.numpy(), count=self.n_items + 1)
                bits[new] = 1
                seen = torch.from_numpy(np.packbits(bits))
            else:
                seen = torch.unique(torch.cat([seen, torch.from_numpy(new)]))
                if 8 * len(seen) > -(-(self.n_items + 1) // 8):  # the list outgrew the bitmap
                    bits = np.zeros(self.n_items + 1, dtype=np.uint8)
                    bits[seen.numpy()] = 1
                    seen = torch.from_numpy(np.packbits(bits))
        state["seen"] = seen
        return state

    def seen(self, state: dict) -> torch.Tensor:
        """The user's distinct seen item indices (LongTensor), whichever form the state keeps."""
        seen = state.get("seen", torch.zeros(0, dtype=torch.long))
        if seen.dtype == torch.uint8:
            return torch.from_numpy(np.flatnonzero(np.unpackbits(seen.numpy(), count=self.n_items + 1)))
        return seen

    # -- scores -------------------------------------------------------------------------
    def top_k(self, hidden: torch.Tensor, k: int, exclude=(), scores=None) -> list[dict]:
        """The k best items as [{"item_id": raw, "score": float}], ``exclude`` (indices: a
        set or a LongTensor) left out."""
        with torch.no_grad():
            scores = (hidden @ self.model.output_embeddings().T) if scores is None else scores.clone()  # (n_items + 1,)
        scores[0] = float("-inf")
        if len(exclude):  # exclude holds distinct item indices >= 1
            scores[exclude if isinstance(exclude, torch.Tensor) else torch.tensor(sorted(exclude))] = float("-inf")
        k = min(k, self.n_items - len(exclude))
        top = scores.topk(k)
        return [self.describe(i, float(v)) for v, i in zip(top.values.tolist(), top.indices.tolist())]

    def describe(self, i: int, score: float | None) -> dict:
        raw = str(self.item_ids[i])
        return {"item_id": raw, "score": score, **({"title": self.titles[raw]} if raw in self.titles else {})}

    def popular(self, k: int, exclude=()) -> list[dict]:
        exclude = set(exclude.tolist()) if isinstance(exclude, torch.Tensor) else set(exclude)
        out = [int(i) for i in self._popular if int(i) not in exclude][:k]
        return [self.describe(i, None) for i in out]

    # -- state <-> bytes (safetensors, no pickle) ----------------------------------------
    def pack(self, state: dict) -> tuple[str, bytes]:
        """The state as (JSON spec, safetensors bytes). A windowed model with a one-pass
        ``prefill`` (SASRec, HSTU, LLaMA-style) stores its window's item ids only, not the KV cache (W x 1 KB per
        block and layer: 200 KB at W = 200, written per event); ``unpack`` rebuilds the cache
        in one pass, which a worker needs only when the state is not the one it last wrote."""
        tensors = {}
        if self._ids_only:
            state = {k: v for k, v in state.items() if k not in ("s", "h")}
        spec = _flatten(state, "", tensors)
        # safetensors' numpy writer: the same file format as its torch writer, 4x faster on
        # a state's handful of small tensors (states are float32/int64: numpy has both)
        return json.dumps(spec), st_save({k: v.detach().contiguous().numpy() for k, v in tensors.items()})

    def memory_bytes(self, state: dict, blob: bytes) -> int:
        """A state's size in memory (the per-process cache's measure): its packed bytes,
        plus the KV cache that ``pack`` leaves out for windowed models with ``prefill``."""
        if self._ids_only:
            tensors = {}
            _flatten(state.get("s"), "", tensors)
            return len(blob) + sum(t.nbytes for t in tensors.values())
        return len(blob)

    def unpack(self, spec: str, blob: bytes) -> dict:
        state = _unflatten(json.loads(spec), st_load(blob))
        if self._ids_only:  # stored without its KV cache (pack)
            w = state["window"]
            state["s"], state["h"] = (self.model.init_state(1), None) if len(w) == 0 else self._prefill(w)
        return state


def _popularity(items: np.ndarray, n_items: int) -> np.ndarray:
    """Item indices by how often they occur in the run's data (cold-start answers)."""
    counts = np.bincount(items, minlength=n_items + 1)
    counts[0] = -1
    return np.argsort(-counts, kind="stable")[: min(n_items, 1000)]


def item_titles(dataset: str) -> dict[str, str]:
    """Raw item id -> title where the dataset has titles: ML-1M's movies.dat (latin-1) from
    the shared datasets folder; {} otherwise or when the file is not there."""
    if dataset not in ("ml-1m",):
        return {}
    from ..data.registry import find_shared_dir

    root = find_shared_dir()
    path = None if root is None else Path(root) / "ml-1m-raw" / "movies.dat"
    if path is None or not path.exists():
        return {}
    out = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        mid, title, _ = line.split("::")
        out[mid] = title
    return out


def _flatten(obj, path: str, out: dict):
    """A nested dict/list/tuple of tensors, ints and None -> a JSON spec, tensors into out."""
    if isinstance(obj, torch.Tensor):
        out[path] = obj
        return {"t": path}
    if isinstance(obj, dict):
        return {"d": {k: _flatten(v, f"{path}.{k}", out) for k, v in obj.items()}}
    if isinstance(obj, (list, tuple)):
        return {"l" if isinstance(obj, list) else "u": [_flatten(v, f"{path}.{i}", out) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (int, float)):
        return {"v": obj}
    raise TypeError(f"cannot store a {type(obj).__name__} in a serving state")


def _unflatten(spec, tensors: dict):
    if "t" in spec:
        return tensors[spec["t"]]
    if "d" in spec:
        return {k: _unflatten(v, tensors) for k, v in spec["d"].items()}
    if "l" in spec:
        return [_unflatten(v, tensors) for v in spec["l"]]
    if "u" in spec:
        return tuple(_unflatten(v, tensors) for v in spec["u"])
    return spec["v"]
