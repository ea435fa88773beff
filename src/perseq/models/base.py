"""The one model contract (DESIGN.md §2).

``encode(items: LongTensor[B, L], times: LongTensor[B, L] | None) -> hidden[B, L, D]``;
items are right-padded with 0. Scores are ``hidden @ output_embeddings().T`` with the
(tied) item table, whose row 0 is padding. A model that scores a sequence differently
(BERT4Rec appends a mask token) overrides ``predict_hidden``.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class SeqRecModel(nn.Module):
    #: "causal": position t predicts item t+1; "cloze": masked positions predict themselves
    objective: str = "causal"

    def __init__(self, n_items: int, max_len: int):
        super().__init__()
        self.n_items, self.max_len = n_items, max_len

    def encode(self, items: torch.Tensor, times: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    #: True when ``encode`` also takes ``query_times`` (B, T): the time each position's
    #: prediction is for (HSTU's time bias measured from the next event); training then
    #: passes the targets' timestamps
    query_time_input: bool = False

    def forward(self, items: torch.Tensor, times: torch.Tensor | None = None, query_times: torch.Tensor | None = None) -> torch.Tensor:
        if query_times is not None:
            return self.encode(items, times, query_times)
        return self.encode(items, times)

    def output_embeddings(self) -> torch.Tensor:
        """(n_items + 1, D) table scored against; row 0 is padding and never recommended."""
        return self.item_emb.weight[: self.n_items + 1]

    @property
    def max_input_len(self) -> int:
        """How many past events the model reads when scoring the next one."""
        return self.max_len

    def predict_hidden(self, items, lengths, times=None, target_time=None) -> torch.Tensor:
        """Hidden state that scores the item after the last real input position: (B, D)."""
        h = self.encode(items, times)  # (B, T, D)
        return h[torch.arange(h.shape[0], device=h.device), lengths - 1]

    # -- incremental serving (models that allow it override both) ----------------------
    #: True when init_state/step are implemented
    incremental: bool = False
    #: True when step's state keeps every past event (a KV cache): it ends at max_len, so a
    #: server keeps a sliding window; False for recurrent states of fixed size
    state_grows: bool = False

    def init_state(self, batch_size: int, device=None):
        """Empty per-user state for ``step`` (recurrent state or KV cache)."""
        raise NotImplementedError(f"{type(self).__name__} has no incremental step")

    def step(self, state, item: torch.Tensor, time: torch.Tensor | None = None):
        """Consume one new event per row: item (B,), time (B,) or None -> (new state,
        hidden (B, D)). Running it over a sequence gives exactly ``encode``'s outputs."""
        raise NotImplementedError(f"{type(self).__name__} has no incremental step")

    def scores(self, items, lengths, times=None, target_time=None) -> torch.Tensor:
        """(B, n_items + 1) next-item scores; column 0 (padding) is -inf."""
        s = self.predict_hidden(items, lengths, times, target_time) @ self.output_embeddings().T
        s[:, 0] = float("-inf")
        return s


class ScoringWrapper(nn.Module):
    """A trained model that scores with something added (per-user adaptation, each user's
    own parameters): the ``scores`` contract of ``SeqRecModel`` and its sizes, so evaluate,
    predict and serving take it as a model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def max_input_len(self) -> int:
        return self.model.max_input_len

    @property
    def n_items(self) -> int:
        return self.model.n_items
