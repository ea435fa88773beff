"""Embedded synthetic data (no download) with a known next-item distribution.

Generative process (DESIGN.md §3), per user u and step t:

  p(next = j | prev = i, u, gap) = λ_s(gap) · T[i, j]                    short-term transitions
                                 + λ_l(gap) · Σ_c π_u[c] · w[j | c]      long-term cluster mixture
                                 + λ_q      · 1[j ∈ Q_u] / |Q_u|         per-user quirk items

* items fall into clusters; w[j | c] is Zipf popularity inside cluster c;
* π_u ~ Dirichlet(α) is a sparse long-term interest mixture;
* T[i, ·] puts its mass on a few successors of i, mostly in i's cluster;
* Q_u is a small set of items only this user keeps coming back to (personal signal that a
  global model can learn only from u's own history: what test-time adaptation is for);
* a short gap before an event makes the short-term component more likely (signal for
  time-aware models), a long gap the long-term one.

Long-history mode (``favorites`` > 0, with long ``mean_len``/``min_len``/``max_len``; the
PerSRec data, configs/synthetic/long-*.yaml): with probability ``lam_favorite`` an event is a
*return* to one of the user's ``favorites`` items F_u, a uniform random subset of a block of
``personal_items`` ids that nothing else emits, chosen uniformly among the favourites the
user has not consumed in the last ``cooldown`` events (all of F_u if none is due). The other
events follow the process above. The due favourites are, by construction, those the recent
events do not show, so only a longer memory tells which items they are: a model that reads
the last R = cooldown events knows a favourite only if it saw it there. Two ceilings
(``bayes_ceiling(recent=R)``): full information, and the last R events only, where each
unseen personal item is a favourite with probability (f − |S|) / (N_p − |S|) for the |S|
favourites the window shows (exact: the window depends on which unseen items are favourites
only through their number); that ceiling still knows the rest of the process exactly, so it
is an upper bound for a recent-only model.

Because p is known, the Bayes-optimal ranker (sort by p) gives the ceiling: expected
HR@K = Σ of the K largest probabilities, NDCG@K = Σ_r p_(r) / log2(r + 2); with
exclude_seen the ranking is over unseen items and seen targets count as misses.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .sequences import SequenceData


@dataclass(frozen=True)
class SyntheticConfig:
    n_users: int = 2000
    n_items: int = 500
    n_clusters: int = 20
    mean_len: float = 40.0
    min_len: int = 5
    max_len: int = 300
    alpha: float = 0.3  # Dirichlet concentration of long-term interests (small = focused)
    n_successors: int = 4
    quirk_size: int = 6
    lam_quirk: float = 0.15
    lam_short_fast: float = 0.65  # share of the remaining mass on transitions after a short gap
    lam_short_slow: float = 0.25  # ... after a long gap
    zipf: float = 1.0
    seed: int = 0
    # long-history mode: favourite items per user (0: off), ids in a block of personal_items
    # after the n_items ordinary ones
    favorites: int = 0
    personal_items: int = 1000
    lam_favorite: float = 0.3  # share of events that return to a due favourite
    cooldown: int = 128  # a favourite is due again this many events after it was consumed

    @property
    def n_total(self) -> int:
        """Items in the catalogue: ordinary plus the personal block (long-history mode)."""
        return self.n_items + (self.personal_items if self.favorites else 0)


class SyntheticGenerator:
    def __init__(self, cfg: SyntheticConfig = SyntheticConfig()):
        self.cfg = c = cfg
        rng = np.random.default_rng(c.seed)
        I, C = c.n_items, c.n_clusters
        self.cluster = rng.integers(0, C, I)  # (I,) cluster of item j (0-based item index)
        zipf = 1.0 / np.arange(1, I + 1) ** c.zipf
        w = np.zeros((C, I))
        for k in range(C):
            members = np.flatnonzero(self.cluster == k)
            w[k, members] = rng.permutation(zipf[: len(members)])
        sums = w.sum(1, keepdims=True)
        if (sums == 0).any():
            raise ValueError(f"synthetic: {int((sums == 0).sum())} of n_clusters={C} clusters got no item "
                             f"(n_items={I}); use fewer clusters")
        self.w = w / sums  # (C, I)
        # successors: mostly same cluster, one from anywhere
        T = np.zeros((I, I))
        for i in range(I):
            same = np.flatnonzero(self.cluster == self.cluster[i])
            succ = list(rng.choice(same, size=min(c.n_successors - 1, len(same)), replace=False)) + [rng.integers(I)]
            np.add.at(T[i], succ, rng.dirichlet(np.ones(len(succ))))  # succ may repeat
        self.T = T  # (I, I), rows sum to 1
        self.pi = rng.dirichlet(np.full(C, c.alpha), size=c.n_users)  # (U, C)
        self.quirks = np.stack([rng.choice(I, c.quirk_size, replace=False) for _ in range(c.n_users)])  # (U, q)
        if c.favorites:
            if not 0 < c.favorites <= c.personal_items or not 0 < c.lam_favorite < 1 or c.cooldown < 1:
                raise ValueError("synthetic long-history mode needs 0 < favorites <= personal_items, "
                                 "0 < lam_favorite < 1 and cooldown >= 1")
            # (U, f) 0-based item indices of each user's favourites, in the personal block
            self.favs = I + np.stack([rng.choice(c.personal_items, c.favorites, replace=False) for _ in range(c.n_users)])
        self._rng = rng

    def _lam_short(self, gap_is_short: np.ndarray) -> np.ndarray:
        c = self.cfg
        return (1 - c.lam_quirk) * np.where(gap_is_short, c.lam_short_fast, c.lam_short_slow)

    def next_distribution(self, users: np.ndarray, prev: np.ndarray, gap_is_short: np.ndarray,
                          mixture: np.ndarray | None = None) -> np.ndarray:
        """(B, I) true next-item probabilities (0-based item index). ``mixture``: the users'
        long-term item distributions ``pi[users] @ w`` (B, I) if the caller has them."""
        c = self.cfg
        ls = self._lam_short(gap_is_short)[:, None]
        ll = (1 - c.lam_quirk) - ls
        if mixture is None:
            mixture = self.pi[users] @ self.w
        p = ls * self.T[prev] + ll * mixture
        q = np.zeros_like(p)
        np.put_along_axis(q, self.quirks[users], c.lam_quirk / c.quirk_size, axis=1)
        return p + q

    def generate(self) -> tuple[SequenceData, np.ndarray]:
        """-> (data, gap_is_short per event). Items are 1-based in SequenceData."""
        c, rng = self.cfg, self._rng
        U = c.n_users
        lens = np.clip(rng.lognormal(np.log(c.mean_len) - 0.5, 1.0, U).astype(int), c.min_len, c.max_len)
        maxT = lens.max()
        seqs = np.zeros((U, maxT), dtype=np.int64)
        short = rng.random((U, maxT)) < 0.5
        gaps = np.where(short, rng.integers(60, 3600, (U, maxT)), rng.integers(86400, 30 * 86400, (U, maxT)))
        # first item: from the long-term mixture
        users = np.arange(U)
        first_c = _sample_rows(self.pi, rng)
        seqs[:, 0] = _sample_rows(self.w[first_c], rng)
        # constant over time: computed once (it was 2/3 of the generation time, per step)
        mixture = self.pi @ self.w  # (U, I)
        if c.favorites:  # long-history mode: returns to due favourites
            fav_mode = rng.random((U, maxT)) < c.lam_favorite
            last_used = np.full((U, c.favorites), -(10**9))  # when each favourite was last consumed
            prev_common = seqs[:, 0].copy()
        for t in range(1, maxT):
            if not c.favorites:
                p = self.next_distribution(users, seqs[:, t - 1], short[:, t], mixture)
                seqs[:, t] = _sample_rows(p, rng)
                continue
            p = self.next_distribution(users, prev_common, short[:, t], mixture)
            seqs[:, t] = _sample_rows(p, rng)
            due = t - last_used > c.cooldown  # (U, f)
            due[~due.any(1)] = True  # none due: any favourite
            pick = np.argmax(rng.random(due.shape) * due, axis=1)  # uniform among the due ones
            fm = fav_mode[:, t]
            seqs[fm, t] = self.favs[fm, pick[fm]]
            last_used[fm, pick[fm]] = t
            prev_common = np.where(fm, prev_common, seqs[:, t])
        mask = np.arange(maxT)[None, :] < lens[:, None]
        offsets = np.zeros(U + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        times = 1_600_000_000 + np.cumsum(gaps, axis=1)
        items = (seqs[mask] + 1).astype(np.int32)
        data = SequenceData(
            offsets=offsets,
            items=items,
            times=times[mask].astype(np.int64),
            user_ids=np.array([f"u{u}" for u in range(U)], dtype=object),
            item_ids=np.array(["[PAD]"] + [f"i{j}" for j in range(c.n_total)], dtype=object),
            name="synthetic",
        )
        self._short = short[mask]
        return data, self._short

    def predictive(self, data: SequenceData, users: np.ndarray, pos: np.ndarray, recent: int | None = None) -> np.ndarray:
        """(B, n_total) probabilities of the events at ``pos`` of ``users`` given everything
        before them (recent None), or, in long-history mode, given only the last ``recent``
        events (``recent`` >= cooldown; the module docstring's second ceiling)."""
        c = self.cfg
        idx = data.offsets[users] + pos
        if not c.favorites:
            prev = data.items[idx - 1].astype(np.int64) - 1
            return self.next_distribution(users, prev, self._short[idx])
        if recent is not None and recent < c.cooldown:
            raise ValueError(f"the recent-only ceiling needs recent >= cooldown ({c.cooldown}), got {recent}")
        I, f = c.n_items, c.favorites
        p = np.zeros((len(users), c.n_total))
        for r, (u, q) in enumerate(zip(users, pos)):
            past = data.items[data.offsets[u] : data.offsets[u] + q].astype(np.int64) - 1
            common = past[past < I]
            # the process's prev for transitions is the last ordinary item
            p[r, :I] = (1 - c.lam_favorite) * self.next_distribution(u[None], common[-1:], self._short[idx[r : r + 1]])[0]
            cool = set(past[-c.cooldown :][past[-c.cooldown :] >= I].tolist())  # favourites not due
            if recent is None:
                known, unknown = set(self.favs[u].tolist()), 0
            else:
                known = set(past[-recent:][past[-recent:] >= I].tolist())
                unknown = f - len(known)
            due = known - cool
            n_due = len(due) + unknown
            if n_due == 0:  # none due: uniform over F_u (then all of F_u is known)
                p[r, sorted(known)] = c.lam_favorite / f
                continue
            p[r, sorted(due)] = c.lam_favorite / n_due
            if unknown:  # each unseen personal item is a due favourite w.p. unknown / (N_p - |known|)
                unseen = np.setdiff1d(np.arange(I, c.n_total), sorted(known))
                p[r, unseen] = c.lam_favorite / n_due * unknown / len(unseen)
        return p

    def bayes_ceiling(self, data: SequenceData, positions: np.ndarray, ks=(10, 50), exclude_seen: bool = False,
                      recent: int | None = None) -> dict:
        """Expected metrics of the Bayes-optimal ranker for the events at ``positions``
        (index into each user's sequence, -1 = not evaluated); with ``recent``, the ranker
        that sees only the last ``recent`` events (long-history mode)."""
        users = np.flatnonzero(positions >= 0)
        pos = positions[users]
        p = self.predictive(data, users, pos, recent)  # (B, I)
        if exclude_seen:
            for r, (u, q) in enumerate(zip(users, pos)):
                p[r, data.items[data.offsets[u] : data.offsets[u] + q] - 1] = 0.0
        ps = -np.sort(-p, axis=1)  # descending
        out = {}
        for k in ks:
            out[f"hr@{k}"] = float(ps[:, :k].sum(1).mean())
            top = ps[:, :k]  # a catalogue smaller than k: all of it
            out[f"ndcg@{k}"] = float((top / np.log2(np.arange(2, top.shape[1] + 2))).sum(1).mean())
        out["mrr"] = float((ps / np.arange(1, ps.shape[1] + 1)).sum(1).mean())
        return out

    def describe(self) -> dict:
        return asdict(self.cfg)


def bayes_ceilings(gen: SyntheticGenerator, data: SequenceData, split, exclude_seen: bool) -> dict:
    """The test-stage ceilings a run on this data reports: full information, and in
    long-history mode the last ``cooldown`` events only."""
    out = {"full information": gen.bayes_ceiling(data, split.test_pos, exclude_seen=exclude_seen)}
    if gen.cfg.favorites:
        R = gen.cfg.cooldown
        out[f"last {R} events only"] = gen.bayes_ceiling(data, split.test_pos, exclude_seen=exclude_seen, recent=R)
    return out


def _sample_rows(p: np.ndarray, rng) -> np.ndarray:
    """One categorical sample per row of a (B, K) probability matrix."""
    cdf = np.cumsum(p, axis=1)
    u = rng.random(len(p))[:, None] * cdf[:, -1:]
    return np.minimum((cdf < u).sum(1), p.shape[1] - 1)


def make_synthetic(**params) -> tuple[SequenceData, SyntheticGenerator]:
    gen = SyntheticGenerator(SyntheticConfig(**params))
    data, _ = gen.generate()
    return data, gen
