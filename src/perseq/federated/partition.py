"""Which users' events live on which client. One user per client (a phone) by default; with
``users_per_client`` > 1, users are shuffled with the seed and cut into groups (a shop, a
household, a region). Deterministic in the seed, so a resumed run has the same clients."""
from __future__ import annotations

import numpy as np

from ..data.batching import TrainWindows


def partition(n_users: int, users_per_client: int = 1, seed: int = 0) -> list[np.ndarray]:
    """Client c's user indices, for every client."""
    if users_per_client < 1:
        raise ValueError(f"users_per_client={users_per_client}: must be at least 1")
    if users_per_client == 1:
        return [np.array([u]) for u in range(n_users)]
    users = np.random.default_rng(seed).permutation(n_users)
    return [np.sort(users[i : i + users_per_client]) for i in range(0, n_users, users_per_client)]


def active_clients(mine: list[np.ndarray]) -> np.ndarray:
    """The clients that hold a training window (the only ones a round samples)."""
    active = np.array([c for c, w in enumerate(mine) if len(w)], dtype=np.int64)
    if not len(active):
        raise ValueError("no client holds a training target")
    return active


def client_windows(windows: TrainWindows, clients: list[np.ndarray]) -> list[np.ndarray]:
    """Each client's training windows (indices into ``windows``): the windows of its users.
    A client whose users have no training target gets none (it is never sampled)."""
    owner = np.full(int(windows.data.n_users), -1)
    for c, users in enumerate(clients):
        owner[users] = c
    by_client = owner[windows.user]  # (n_windows,)
    order = np.argsort(by_client, kind="stable")
    bounds = np.searchsorted(by_client[order], np.arange(len(clients) + 1))
    return [order[bounds[c] : bounds[c + 1]] for c in range(len(clients))]
