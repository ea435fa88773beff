"""PCRec-simple: adapt a trained model to each user at inference, on that user's own history.

For each user, starting from the trained parameters θ (or the subset ``scope`` names, see
``scope.py``): take S optimizer steps with rate β on the user's known history, every known
position predicting the next known item, then score the next item with the adapted θ_u and
drop θ_u. Nothing is stored per user and the trained model is never written to.

    L_u(θ) = 1/|T_u| Σ_{t ∈ T_u} ℓ(h_t(θ), i_{t+1})        T_u: positions with a next known item
    θ_u^0 = θ,   θ_u^{s+1} = θ_u^s − β · step(∇L_u(θ_u^s))   (SGD; or Adam with per-user moments)
    scores_u = h_last(θ_u^S) · E(θ_u^S)ᵀ

ℓ is ``objective``:
* ``ce`` (default): next-item softmax cross-entropy over the whole catalogue, with the
  run's logit temperature: the objective the model was trained for, on this user alone.
* ``kl``: what the authors' code computes (DESIGN.md §5): the KL divergence between the
  softmax of the next item's embedding and the softmax of the output vector, both taken
  over the d embedding dimensions, KL(softmax(e_{i_{t+1}}) ‖ softmax(h_t)).

The mean over positions (not the sum) keeps β comparable across history lengths. The model
adapts in eval mode (no dropout), so adaptation is deterministic and a user's scores do not
depend on who else is in the batch.

Batched and functional: ``functional_call`` runs the model's own training forward
(``train.forward_targets``, shared with ``train_step``) on per-user parameters θ_u, under
``torch.func.vmap`` over users, so a batch of users adapts at once. Since user u's loss
reads θ_u alone, one ordinary backward of Σ_u L_u gives every ∇L_u(θ_u); the loss runs
outside vmap on the stacked (U, T, D) states, as the training loss's chunked softmax. vmap
traces only plain torch ops, so the per-user forward runs inside
``perseq.ops.reference_ops()`` (every fused kernel's torch line). Models vmap cannot batch
(``nn.GRU`` has no batching rule) run the per-user forward one user at a time; the result
is the same, only slower.

Defects of the public code that this does not copy (DESIGN.md §5): its step used lr 1e-20
(numerically nothing), its "restore" aliased the live tensors (restored nothing), Adam's
moments were carried from user to user, and the last user of every batch was skipped.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

from ..data.batching import Batch
from ..losses import softmax_ce
from ..models.base import ScoringWrapper
from ..ops import reference_ops
from ..train import forward_targets
from .scope import lora_factors, parse_scope, selected

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")
_WARNED: set[str] = set()  # model classes already reported as falling back to one user at a time
OBJECTIVES = ("ce", "kl")


@dataclass(frozen=True)
class AdaptConfig:
    steps: int = 1  # S: optimizer steps on the user's own history (0 = no adaptation)
    lr: float = 1e-3  # β: the steps' learning rate (0 = no adaptation)
    optimizer: str = "sgd"  # sgd | adam (fresh moments for every user)
    scope: str = "all"  # which parameters adapt: all | last_block | norms | bias | lora:<r>
    objective: str = "ce"  # ce: next-item CE over the catalogue | kl: the authors' KL over embedding dimensions
    temperature: float = 1.0  # CE logits are divided by this (the run's loss.temperature)
    users_per_batch: int = 64  # users adapted at once; each holds a copy of the adapted parameters

    def __post_init__(self):
        if self.steps < 0 or self.lr < 0:
            raise ValueError(f"adaptation needs steps >= 0 and lr >= 0, got steps={self.steps}, lr={self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown adaptation optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown adaptation objective {self.objective!r}; valid: {', '.join(OBJECTIVES)}")
        if self.users_per_batch < 1:
            raise ValueError("users_per_batch must be at least 1")
        parse_scope(self.scope)

    @property
    def active(self) -> bool:
        return self.steps > 0 and self.lr > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def next_item_targets(items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T) targets of a right-padded history: position t predicts item t+1 when both are
    known (t + 1 < length), 0 elsewhere."""
    nxt = torch.cat([items[:, 1:], items.new_zeros(items.shape[0], 1)], 1)
    pos = torch.arange(items.shape[1], device=items.device)
    return torch.where(pos[None] < (lengths - 1)[:, None], nxt, torch.zeros_like(nxt))


def _shift_times(times: torch.Tensor | None, lengths: torch.Tensor) -> torch.Tensor | None:
    """Each position's query time in training (its target's timestamp), as TrainWindows
    makes it; positions without a target get their own time (they carry no loss)."""
    if times is None:
        return None
    nxt = torch.cat([times[:, 1:], times[:, -1:]], 1)
    pos = torch.arange(times.shape[1], device=times.device)
    return torch.where(pos[None] < (lengths - 1)[:, None], nxt, times)


def adaptation_loss(h: torch.Tensor, targets: torch.Tensor, emb: torch.Tensor, cfg: AdaptConfig) -> torch.Tensor:
    """Each user's mean ℓ over the positions with a target: h (U, T, D), targets (U, T) with
    0 = none, emb the item table (I + 1, D), shared, or (U, I + 1, D), one per user -> (U,).
    Written with masks, not boolean indexing (a user's number of targets is data)."""
    mask = (targets > 0).to(h.dtype)
    tgt = emb[targets] if emb.dim() == 2 else emb[torch.arange(len(emb), device=emb.device)[:, None], targets]  # (U, T, D)
    if cfg.objective == "ce":
        # -log softmax(z)[target] = logsumexp(z) - z_target, with the temperature on h, not on
        # the (U, T, I) logits, and the target's logit as a row-wise dot (no dense gather backward)
        q = h / cfg.temperature
        nll = torch.logsumexp(q @ emb[..., 1:, :].transpose(-1, -2), -1) - (q * tgt).sum(-1)  # (U, T)
    else:
        nll = F.kl_div(F.log_softmax(h, -1), F.log_softmax(tgt, -1), log_target=True, reduction="none").sum(-1)
    return (nll * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def total_adaptation_loss(h: torch.Tensor, targets: torch.Tensor, emb: torch.Tensor, cfg: AdaptConfig) -> torch.Tensor:
    """Σ_u of ``adaptation_loss``: what one backward differentiates for all users at once.
    The CE objective runs as the training loss's chunked kernel (``losses.softmax_ce``, each
    row weighed by one over its user's count), once for a shared table, user by user for
    per-user tables: the (U, T, I) logits of a batch are hundreds of MB, and writing them,
    not the matmul, would dominate the step."""
    if cfg.objective != "ce":
        return adaptation_loss(h, targets, emb, cfg).sum()
    sel = targets > 0  # (U, T)
    w = (1.0 / sel.sum(-1).clamp(min=1).to(h.dtype))[:, None].expand_as(sel)  # (U, T)
    if emb.dim() == 2:
        return softmax_ce(h[sel], targets[sel], emb, temperature=cfg.temperature, weight=w[sel])
    # unbind, not h[u] / emb[u]: its backward stacks the users' gradients once, where each
    # index's backward would write a zero-filled copy of the whole (U, I + 1, D) stack
    return sum(softmax_ce(hu[su], yu[su], eu, temperature=cfg.temperature, weight=wu[su])
               for hu, yu, eu, wu, su in zip(h.unbind(0), targets.unbind(0), emb.unbind(0), w.unbind(0), sel.unbind(0)))


class _UserModel(nn.Module):
    """One user's hidden states (a leading batch of 1) and the item table, as one module so
    that ``functional_call`` swaps the parameters for both alike."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, mode: str, items=None, lengths=None, targets=None, times=None, query_times=None, target_time=None):
        if mode == "train":  # the training forward: every position's hidden state and target
            h, y = forward_targets(self.model, Batch(items, targets, times, lengths, query_times))
            return h[0]  # (T, D)
        if mode == "score":  # the state that scores the next item
            return self.model.predict_hidden(items, lengths, times, target_time)[0]  # (D,)
        return self.model.output_embeddings()  # (I + 1, D)


class PCRecSimple:
    """Adapts ``model`` per user and scores: ``scores(items, lengths, times, target_time)``.
    The model's parameters are read, never written (``torch.func`` works on copies).

    A step is one ordinary backward: the users' hidden states come from ``vmap`` of the
    model's forward over per-user parameters θ_u (U, ...), and since user u's loss reads θ_u
    alone, ∂(Σ_u L_u)/∂θ_u = ∇L_u(θ_u). The loss itself runs on the stacked (U, T, D) states
    outside vmap, so the catalogue-sized softmax is one plain batched op."""

    def __init__(self, model: nn.Module, cfg: AdaptConfig):
        self.model, self.cfg = model, cfg
        if getattr(model, "objective", "causal") != "causal":
            raise ValueError(f"PCRec-simple adapts causal models (each position predicts the next item); "
                             f"{type(model).__name__} is trained with the {model.objective!r} objective")
        self.user_model = _UserModel(model)
        kind, rank = parse_scope(cfg.scope)
        self.names = selected(model, cfg.scope)
        self.lora_v = None
        if kind == "lora":
            self.theta0, self.lora_v = lora_factors(model, self.names, rank)
        else:
            params = dict(model.named_parameters())
            self.theta0 = {n: params[n].detach() for n in self.names}
        self._batched = True
        # Does the item table move with θ (scope all)? Then each user scores with their own
        # table (U, I + 1, D); otherwise with the trained one, computed once.
        with torch.enable_grad():
            probe = {n: v.clone().requires_grad_() for n, v in self.theta0.items()}
            self._own_table = self._table(probe).requires_grad

    # -- one user's functions, which vmap batches ---------------------------------------
    def _params(self, theta: dict) -> dict:
        base = {n: p.detach() for n, p in self.model.named_parameters()}
        if self.lora_v is not None:
            base.update({n: base[n] + theta[n] @ self.lora_v[n] for n in theta})
        else:
            base.update(theta)
        buffers = {n: b for n, b in self.model.named_buffers()}
        return {f"model.{n}": v for n, v in {**base, **buffers}.items()}

    def _hidden(self, theta, items, lengths, targets, times, query_times):
        args = ("train", items[None], lengths[None], targets[None], _one(times), _one(query_times))
        return functional_call(self.user_model, self._params(theta), args)  # (T, D)

    def _last(self, theta, items, lengths, times, target_time):
        args = ("score", items[None], lengths[None], None, _one(times), None, _one(target_time))
        return functional_call(self.user_model, self._params(theta), args)  # (D,)

    def _loss(self, theta, items, lengths, targets, times, query_times):
        """One user's L_u(θ), a scalar: what the batched step differentiates, user by user."""
        h = self._hidden(theta, items, lengths, targets, times, query_times)
        return adaptation_loss(h[None], targets[None], self._table(theta), self.cfg)[0]

    def _table(self, theta):
        return functional_call(self.user_model, self._params(theta), ("table",))  # (I + 1, D)

    # -- a batch of users ---------------------------------------------------------------
    def scores(self, items, lengths, times=None, target_time=None) -> torch.Tensor:
        """(B, n_items + 1) next-item scores after each user's adaptation; column 0 is -inf."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                out = torch.cat([self._chunk(items[i:j], lengths[i:j], _rows(times, i, j), _rows(target_time, i, j))
                                 for i, j in _spans(len(items), self.cfg.users_per_batch)])
        finally:
            self.model.train(was_training)
        out[:, 0] = float("-inf")
        return out.detach()

    def _chunk(self, items, lengths, times, target_time):
        targets = next_item_targets(items, lengths)
        query_times = _shift_times(times, lengths) if getattr(self.model, "query_time_input", False) else None
        data = (items, lengths, targets, times, query_times)
        if self._batched:
            try:
                return self._run(data, target_time, batched=True)
            except (RuntimeError, NotImplementedError) as e:  # e.g. nn.GRU: no vmap rule
                if type(self.model).__name__ not in _WARNED:
                    _WARNED.add(type(self.model).__name__)
                    log.warning("PCRec-simple: %s cannot be batched with vmap (%s); adapting one user at a time",
                                type(self.model).__name__, str(e).splitlines()[0][:120])
                self._batched = False
        return self._run(data, target_time, batched=False)

    def _per_user(self, fn, theta, args, batched: bool):
        """fn(θ_u, *args_u) for every user u, stacked: vmap, or a loop where vmap has no rule.
        The model runs its reference ops (torch.func traces plain torch ops only)."""
        with reference_ops():
            if batched:
                return vmap(fn, in_dims=(0, *(None if x is None else 0 for x in args)))(theta, *args)
            n = len(next(iter(theta.values())))
            return torch.stack([fn({k: v[u] for k, v in theta.items()}, *(_row(x, u) for x in args)) for u in range(n)])

    def _tables(self, theta, batched: bool):
        """The item table(s) to score with: each user's (U, I + 1, D), or the trained (I + 1, D)."""
        if self._own_table:
            return self._per_user(self._table, theta, (), batched)
        return self.model.output_embeddings().detach()

    def _run(self, data, target_time, batched: bool):
        items, lengths, targets, times, query_times = data
        B = len(items)
        theta = {n: v.expand(B, *v.shape).clone() for n, v in self.theta0.items()}
        if self.cfg.active:
            step = _Optimizer(self.cfg, theta)
            for _ in range(self.cfg.steps):
                theta = {n: v.detach().requires_grad_() for n, v in theta.items()}
                h = self._per_user(self._hidden, theta, data, batched)  # (B, T, D)
                loss = total_adaptation_loss(h, targets, self._tables(theta, batched), self.cfg)
                grads = torch.autograd.grad(loss, list(theta.values()), allow_unused=True)  # unused: e.g. an off time-bias table
                g = {n: torch.zeros_like(v) if d is None else d for (n, v), d in zip(theta.items(), grads)}
                theta = step({n: v.detach() for n, v in theta.items()}, g)
        with torch.no_grad():
            h = self._per_user(self._last, theta, (items, lengths, times, target_time), batched)  # (B, D)
            table = self._tables(theta, batched)
            return (h[:, None] @ table.transpose(-1, -2))[:, 0]  # (B, I + 1)


class _Optimizer:
    """SGD or Adam over a dict of per-user parameters (leading user dimension), with moments
    that start at zero for every batch of users and never leave it."""

    def __init__(self, cfg: AdaptConfig, theta: dict, betas=(0.9, 0.999), eps: float = 1e-8):
        self.cfg, self.betas, self.eps, self.t = cfg, betas, eps, 0
        if cfg.optimizer == "adam":
            self.m = {n: torch.zeros_like(v) for n, v in theta.items()}
            self.v = {n: torch.zeros_like(v) for n, v in theta.items()}

    def __call__(self, theta: dict, g: dict) -> dict:
        lr = self.cfg.lr
        if self.cfg.optimizer == "sgd":
            return {n: theta[n] - lr * g[n] for n in theta}
        self.t += 1
        b1, b2 = self.betas
        out = {}
        for n in theta:
            self.m[n] = b1 * self.m[n] + (1 - b1) * g[n]
            self.v[n] = b2 * self.v[n] + (1 - b2) * g[n] ** 2
            m_hat, v_hat = self.m[n] / (1 - b1**self.t), self.v[n] / (1 - b2**self.t)
            out[n] = theta[n] - lr * m_hat / (v_hat.sqrt() + self.eps)
        return out


def _one(x):
    return None if x is None else x[None]


def _dim(x):
    return None if x is None else 0


def _row(x, u):
    return None if x is None else x[u]


def _rows(x, i, j):
    return None if x is None else x[i:j]


def _spans(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


class Personalized(ScoringWrapper):
    """A trained model that adapts to each user before scoring (``ScoringWrapper``: evaluate,
    predict and serving take it unchanged). It owns no parameters of its own and never
    changes the wrapped model's."""

    def __init__(self, model: nn.Module, cfg: AdaptConfig):
        super().__init__(model)
        self.adapter = PCRecSimple(model, cfg)
        self.cfg = cfg

    def scores(self, items, lengths, times=None, target_time=None) -> torch.Tensor:
        return self.adapter.scores(items, lengths, times, target_time)
