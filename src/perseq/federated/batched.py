"""The batched engine: a round's local training for many clients at once, in one process,
with the same numbers as running ``client.local_update`` for each of them in turn.

Every client holds its own copy of the parameters, stacked: θ (C, ...) per parameter. A
local step runs the model's training forward (``train.forward_targets``, the one shared by
``train_step``) on each client's own batch with its own θ_c under ``torch.func.vmap``, the
loss outside vmap, and one ordinary backward: since client c's loss reads θ_c alone,
∂(Σ_c L_c)/∂θ_c = ∇L_c(θ_c). Then each client's gradient is clipped by its own norm (as
``clip_grad_norm_``) and its own AdamW (or SGD) step is taken, all as batched tensor ops.

Clients step in lockstep (step s of every client that has one), grouped by how many
windows their batch holds, so a group is one (C_g, b, T) tensor without empty rows. With
dropout the masks are drawn per client (vmap's ``randomness="different"``), so the numbers
match the loop engine in distribution, and exactly (to float rounding) without dropout:
``tests/test_federated.py`` checks it.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch.func import functional_call, vmap

from ..data.batching import Batch, TrainWindows
from ..losses import grouped_softmax_ce
from ..ops import reference_ops
from ..train import forward_targets
from .client import PERSONAL_PREFIX, ClientUpdate


class _Forward(torch.nn.Module):
    """One client's training forward and item table, as one module for functional_call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs=None, targets=None, lengths=None, times=None, target_times=None):
        if inputs is None:
            return self.model.output_embeddings()  # (I + 1, D)
        h, _ = forward_targets(self.model, Batch(inputs, targets, times, lengths, target_times))
        return h  # (b, T, D)


def _schedule(windows: TrainWindows, mine: list, fcfg, tcfg, round_: int) -> list[list]:
    """Each client's local batches in order (the loop engine's order, epoch after epoch)."""
    out = []
    for w in mine:
        steps = []
        for e in range(fcfg.local_epochs):
            seed = tcfg.seed * 1_000_003 + round_ * fcfg.local_epochs + e
            steps += windows.batch_order(fcfg.local_batch_size, seed, subset=w)
        out.append(steps)
    return out


def batched_updates(model, start: dict, windows: TrainWindows, mine: list, fcfg, tcfg, loss_fn, loss_cfg, round_: int,
                    personal: list) -> list[tuple[ClientUpdate, dict]]:
    """``local_update`` for every client of ``mine`` (their windows) at once; ``personal``:
    each client's stored personal parameters or None; ``loss_cfg`` the run's loss section
    (the full softmax runs grouped, other losses client by client through ``loss_fn``).
    -> [(update, kept personal)]."""
    C = len(mine)
    names = [n for n, _ in model.named_parameters()]
    theta = {n: start[n].expand(C, *start[n].shape).clone() for n in names}  # (C, ...) each
    for c, ps in enumerate(personal):
        for n, t in (ps or {}).items():
            theta[n][c] = t
    adam = fcfg.local_optimizer == "adam"
    m = {n: torch.zeros_like(t) for n, t in theta.items()} if adam else None
    v = {n: torch.zeros_like(t) for n, t in theta.items()} if adam else None
    plan = _schedule(windows, mine, fcfg, tcfg, round_)
    n_steps = [len(p) for p in plan]
    tot_loss, tot_n = [0.0] * C, [0] * C
    fwd = _Forward(model)
    buffers = {f"model.{n}": b for n, b in model.named_buffers()}
    model.train()
    shared = [n for n in names if not n.startswith(PERSONAL_PREFIX)]
    anchor = {n: start[n] for n in shared}

    for s in range(max(n_steps, default=0)):
        groups = defaultdict(list)  # batch size -> clients stepping now with a batch of that size
        for c in range(C):
            if s < n_steps[c]:
                groups[len(plan[c][s])].append(c)
        for b, cs in groups.items():
            idx = torch.tensor(cs)
            whole = len(cs) == C  # every client steps with a batch of this size: no gather, no scatter
            pick = (lambda t: t) if whole else (lambda t: t.index_select(0, idx))  # noqa: E731
            th = {n: pick(theta[n]).detach().requires_grad_() for n in names}  # (C_g, ...)
            batch = windows.make_batch(_concat([plan[c][s] for c in cs]))
            Cg = len(cs)
            shape = lambda x: None if x is None else x.view(Cg, b, *x.shape[1:])  # noqa: E731
            args = [shape(batch.inputs), shape(batch.targets), shape(batch.lengths), shape(batch.times), shape(batch.target_times)]
            dims = tuple(None if a is None else 0 for a in args)
            with reference_ops():  # vmap traces plain torch ops only
                h = vmap(lambda p, *a: functional_call(fwd, ({f"model.{k}": x for k, x in p.items()} | buffers), a),
                         in_dims=(0, *dims), randomness="different")(th, *args)  # (C_g, b, T, D)
                tables = vmap(lambda p: functional_call(fwd, ({f"model.{k}": x for k, x in p.items()} | buffers), ()))(th)
            y = args[1]  # (C_g, b, T)
            sel = y > 0
            counts = sel.flatten(1).sum(1)  # (C_g,) targets per client
            if loss_cfg.name == "ce":  # one node for the group: rows client after client, each its own table
                sums = grouped_softmax_ce(h[sel], y[sel], tables, counts, temperature=loss_cfg.temperature)  # (C_g,)
            else:  # other losses client by client (unbind: one stacked backward, not a select per client)
                sums = torch.stack([loss_fn(hg[sg], yg[sg], eg) for hg, yg, sg, eg in
                                    zip(h.unbind(0), y.unbind(0), sel.unbind(0), tables.unbind(0))])
            for g, c in enumerate(cs):
                tot_loss[c] += float(sums[g].detach())
                tot_n[c] += int(counts[g])
            total = (sums / counts.clamp(min=1)).sum() + _regularizer(th, anchor, shared, fcfg)
            grads = torch.autograd.grad(total, [th[n] for n in names], allow_unused=True)
            g = {n: torch.zeros_like(th[n]) if d is None else d for n, d in zip(names, grads)}
            if tcfg.grad_clip:
                _clip(g, tcfg.grad_clip)
            with torch.no_grad():
                new = {n: th[n].detach() for n in names}
                if adam:
                    mg, vg = {n: pick(m[n]) for n in names}, {n: pick(v[n]) for n in names}
                    _adamw(new, g, mg, vg, s + 1, fcfg.local_lr, tuple(tcfg.betas), tcfg.weight_decay)
                    if not whole:
                        for n in names:
                            m[n].index_copy_(0, idx, mg[n])
                            v[n].index_copy_(0, idx, vg[n])
                else:
                    for n in names:
                        new[n] = new[n] - fcfg.local_lr * g[n]
                for n in names:
                    if whole:
                        theta[n] = new[n]
                    else:
                        theta[n].index_copy_(0, idx, new[n])

    out = []
    for c in range(C):
        delta = {n: theta[n][c] - start[n] for n in shared}
        kept = {n: theta[n][c].clone() for n in names if n.startswith(PERSONAL_PREFIX)}
        out.append((ClientUpdate(delta, tot_n[c], tot_loss[c] / max(tot_n[c], 1)), kept))
    return out


def _concat(batches: list):
    import numpy as np

    return np.concatenate(batches)


def _regularizer(th: dict, anchor: dict, shared: list, fcfg) -> torch.Tensor | float:
    """Σ_c of ``client.local_update``'s FedProx and DML terms, each client's on its own θ_c."""
    if not (fcfg.proximal_mu or fcfg.dml):
        return 0.0
    sq = sum((th[n] - anchor[n]).pow(2).flatten(1).sum(1) for n in shared)  # (C_g,)
    term = fcfg.proximal_mu / 2 * sq
    if fcfg.dml:
        d = sq.detach().sqrt()
        term = term + fcfg.dml / 2 * d / (d + fcfg.dml_scale) * sq
    return term.sum()


def _clip(g: dict, max_norm: float) -> None:
    """Each client's gradient scaled as ``torch.nn.utils.clip_grad_norm_`` scales one model's."""
    norms = torch.sqrt(sum(t.pow(2).flatten(1).sum(1) for t in g.values()))  # (C_g,)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for n, t in g.items():
        t.mul_(coef.view(-1, *[1] * (t.dim() - 1)))


def _adamw(p: dict, g: dict, m: dict, v: dict, step: int, lr: float, betas, wd: float) -> None:
    """torch.optim.AdamW's update (its single-tensor formula) for every client of the group,
    all at their ``step``-th step: p replaced, the moments m, v updated in place."""
    b1, b2 = betas
    bc1, bc2 = 1 - b1**step, 1 - b2**step
    for n in p:
        if wd:
            p[n] = p[n] * (1 - lr * wd)
        m[n].lerp_(g[n], 1 - b1)
        v[n].mul_(b2).addcmul_(g[n], g[n], value=1 - b2)
        denom = (v[n].sqrt() / math.sqrt(bc2)).add_(1e-8)
        p[n] = p[n].addcdiv(m[n], denom, value=-lr / bc1)
