"""A client's round: start from the global weights, train on the client's own windows with
the library's ``train_step``, send back the update. Flower's ClientApp and the in-process
simulator both call ``local_update``; nothing here imports Flower.

What leaves a client (``ClientUpdate``, and nothing else):
  * ``delta``      the shared parameters' update, new weights minus the global ones it
                   started from (no item ids, no sequences, and none of the parameters
                   named ``personal.*``: those stay on the client, ``local_update``
                   returns them for the client's own storage);
  * ``n_targets``  the number of training targets it used: FedAvg's weight. With one user
                   per client this is that user's number of training events minus one, so
                   the server learns each participant's history length;
  * ``loss``       its mean training loss over the round: how predictable the user was.
The item-embedding rows of ``delta`` still say which items the user touched (the rows a
sampled loss never reaches stay exactly zero; under the full softmax the touched rows move
most): client-level DP or secure aggregation is what hides that (``BENCHMARKS.md``, leakage
probe).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.batching import TrainWindows
from ..train import train_step

SENT_METADATA = ("n_targets", "loss")  # what a client reports besides its update
PERSONAL_PREFIX = "personal."  # parameters named so are the user's own: trained locally, never sent


def shared_names(model: torch.nn.Module) -> list[str]:
    """The parameters the server aggregates: every one but the personal ones."""
    return [n for n, _ in model.named_parameters() if not n.startswith(PERSONAL_PREFIX)]


def personal_names(model: torch.nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith(PERSONAL_PREFIX)]


@dataclass(frozen=True)
class ClientUpdate:
    delta: dict[str, torch.Tensor]  # shared parameter name -> new minus global weights
    n_targets: int
    loss: float


def local_optimizer(params, fcfg, tcfg) -> torch.optim.Optimizer:
    """The client's optimizer over ``params``: AdamW with the run's betas and weight decay
    (as centralized training), or plain SGD, at ``federated.local_lr``."""
    if fcfg.local_optimizer == "adam":
        return torch.optim.AdamW(params, lr=fcfg.local_lr, betas=tuple(tcfg.betas), weight_decay=tcfg.weight_decay)
    return torch.optim.SGD(params, lr=fcfg.local_lr)


def local_update(model: torch.nn.Module, start: dict[str, torch.Tensor], windows: TrainWindows, mine, fcfg, tcfg,
                 loss_fn, round_: int, personal: dict[str, torch.Tensor] | None = None,
                 ) -> tuple[ClientUpdate, dict[str, torch.Tensor]]:
    """Train ``model`` (its weights set to ``start``, the global state, and its personal
    parameters to ``personal``, the client's own, when it has any yet) on the windows
    ``mine`` for ``local_epochs`` passes; -> (the update to send, the personal parameters
    to keep on the client). The local optimizer starts fresh every round (no moments kept
    on the client between its rounds). Local epoch e of round r shuffles with the seed of
    centralized epoch r · local_epochs + e, so one client holding every user, one local
    epoch and FedAvg is centralized training, epoch for epoch. ``model`` is left holding
    the trained weights (the Flower client replies with them)."""
    model.load_state_dict(start)
    if personal:
        model.load_state_dict(personal, strict=False)
    if fcfg.personal_epochs and personal_names(model):
        _fit_personal(model, windows, mine, fcfg, tcfg, loss_fn, round_)
    opt = local_optimizer(model.parameters(), fcfg, tcfg)
    regularizer = None
    if fcfg.proximal_mu or fcfg.dml:
        shared = {n: p for n, p in model.named_parameters() if not n.startswith(PERSONAL_PREFIX)}
        anchor = {n: p.detach().clone() for n, p in shared.items()}

        def regularizer():
            sq = sum((p - anchor[n]).pow(2).sum() for n, p in shared.items())  # ||w - w_global||², shared weights
            # FedProx: a fixed pull towards the round's global weights
            term = fcfg.proximal_mu / 2 * sq
            if fcfg.dml:
                # Dynamic Magnitude Loss (our reading of PFSR): the pull grows with the drift's
                # own magnitude d (weight d / (d + scale), held constant within the step), so a
                # client's strong, user-specific signal is pushed out of the shared weights,
                # where averaging would wash it out, into its personal ones, which stay
                d = sq.detach().sqrt()
                term = term + fcfg.dml / 2 * d / (d + fcfg.dml_scale) * sq
            return term

    tot_loss, tot_n = 0.0, 0
    for e in range(fcfg.local_epochs):
        seed = tcfg.seed * 1_000_003 + round_ * fcfg.local_epochs + e
        for idx in windows.batch_order(fcfg.local_batch_size, seed, subset=mine):
            loss, n = train_step(model, windows.make_batch(idx), loss_fn, opt, grad_clip=tcfg.grad_clip,
                                 regularizer=regularizer)
            tot_loss += loss
            tot_n += n
    params = dict(model.named_parameters())
    delta = {n: params[n].detach() - start[n] for n in shared_names(model)}
    kept = {n: params[n].detach().clone() for n in personal_names(model)}
    return ClientUpdate(delta, tot_n, tot_loss / max(tot_n, 1)), kept


def _fit_personal(model, windows: TrainWindows, mine, fcfg, tcfg, loss_fn, round_: int) -> None:
    """``personal_epochs`` passes on the client's windows that move only its personal
    parameters, the shared ones frozen (no gradient is even computed for them): the user's
    own part first adapts to the new global weights, then everything trains together (as
    FedRep's head-then-body local round). Not reported: the update and its metadata come from
    the joint passes only."""
    shared = [p for n, p in model.named_parameters() if not n.startswith(PERSONAL_PREFIX)]
    flags = [p.requires_grad for p in shared]
    for p in model.parameters():  # no gradient left from an earlier client's passes: clipping reads them all
        p.grad = None
    for p in shared:
        p.requires_grad_(False)
    try:
        opt = local_optimizer([p for n, p in model.named_parameters() if n.startswith(PERSONAL_PREFIX)], fcfg, tcfg)
        for e in range(fcfg.personal_epochs):
            seed = tcfg.seed * 1_000_003 + round_ * fcfg.personal_epochs + e + 500_000_003  # apart from the joint passes'
            for idx in windows.batch_order(fcfg.local_batch_size, seed, subset=mine):
                train_step(model, windows.make_batch(idx), loss_fn, opt, grad_clip=tcfg.grad_clip)
    finally:
        for p, flag in zip(shared, flags):
            p.requires_grad_(flag)
