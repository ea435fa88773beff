"""Scoring every user with their own personal parameters (``personal.*``, which never leave
a client): the simulator's evaluation, and ``perseq evaluate`` on a federated run folder.

In a deployment each device scores its own user with the parameters on its disk; here the
simulated devices' storage (``personal.safetensors``) is read back and each row of a batch
gets its user's own, through the model's ``personal_rows``. A client that never trained
keeps the model's initial personal parameters.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ..models.base import ScoringWrapper
from .client import personal_names


class PersonalScores(ScoringWrapper):
    """``model`` scoring row b with the personal parameters of ``users[b]``'s client."""

    wants_users = True  # evaluate passes each row's user (rank_targets)

    def __init__(self, model: nn.Module, personal: dict[int, dict[str, torch.Tensor]], client_of_user: np.ndarray):
        super().__init__(model)
        self.personal, self.client_of_user = personal, client_of_user
        self.names = personal_names(model)
        if not self.names:
            raise ValueError(f"{type(model).__name__} has no personal parameters")

    def scores(self, items, lengths, times=None, target_time=None, users=None) -> torch.Tensor:
        if users is None:
            raise ValueError("personal scores need each row's user")
        # the model's own values once per batch (walking its parameters per user cost a third of
        # an ML-1M evaluation), then each row's user's own where their client stored them
        own = personal_values(self.model, {})
        mine = [self.personal.get(int(self.client_of_user[u]), {}) for u in np.asarray(users)]
        stacked = {n: torch.stack([m.get(n, own[n]).detach() for m in mine]) for n in self.names}  # (B, ...) each
        with self.model.personal_rows(stacked):
            return self.model.scores(items, lengths, times, target_time)


def client_of_user(clients: list[np.ndarray], n_users: int) -> np.ndarray:
    owner = np.zeros(n_users, dtype=np.int64)
    for c, users in enumerate(clients):
        owner[users] = c
    return owner


def _stored(run_dir, meta: dict, n_users: int):
    """(client -> personal parameters of their best round, user index -> client) of a
    federated run folder, or None when it kept no personal parameters."""
    from pathlib import Path

    from safetensors.torch import load_file

    from ..checkpoint import read_run_file
    from .partition import partition
    from .simulate import PERSONAL_FILE, _unflatten_personal

    path = Path(run_dir) / PERSONAL_FILE
    if not path.exists():
        return None
    stored = _unflatten_personal(read_run_file(Path(run_dir), PERSONAL_FILE, lambda p: load_file(str(p))))
    fed, seed = meta["run"]["federated"], meta["run"]["train"]["seed"]
    return stored.get("best", {}), client_of_user(partition(n_users, fed["users_per_client"], seed), n_users)


def with_personal(model: nn.Module, run_dir, meta: dict, n_users: int) -> nn.Module:
    """The model of a federated run folder as its users are scored: with each one's own
    personal parameters when the run kept any (personal.safetensors, their best round's),
    else the model itself."""
    found = _stored(run_dir, meta, n_users) if personal_names(model) else None
    return model if found is None else PersonalScores(model, *found)


def personal_values(model: nn.Module, mine: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every personal parameter of ``model``: the user's own where ``mine`` has it, else the
    model's (for PFSR, the identity response), detached."""
    own = dict(model.named_parameters())
    return {n: mine.get(n, own[n]).detach() for n in personal_names(model)}


def personal_by_user(run_dir, meta: dict, user_ids) -> dict[str, dict[str, torch.Tensor]]:
    """Raw user id -> that user's personal parameters, for the users whose client trained
    any (the server's table when the operator serves centrally); {} for other runs."""
    found = _stored(run_dir, meta, len(user_ids))
    if found is None:
        return {}
    personal, owner = found
    return {str(raw): personal[int(owner[u])] for u, raw in enumerate(user_ids) if int(owner[u]) in personal}
