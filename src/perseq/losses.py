"""Next-item losses. Pure functions of (hidden states at target positions, target ids, the
item table); each returns the SUM over positions so that data-parallel ranks can divide by
the global target count and match single-process training exactly.

h: (N, D) hidden states, y: (N,) target ids in 1..n_items, emb: (n_items + 1, D) with row 0
the padding row (never a candidate).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .ops import reference_only

try:  # fused CPU kernels for per-row negatives (numba; the torch path covers its absence)
    from .ops import sampled_numba as _sampled_numba
except ImportError:
    _sampled_numba = None


class _ChunkedSoftmaxCE(torch.autograd.Function):
    """Full-softmax cross-entropy computed in row chunks, logits recomputed in backward.

    Why: the (N, n_items) logit matrix of a 128 x 200 batch is ~400 MB on ML-1M; writing it,
    log-softmaxing it and reading it back is memory-bound and dominated the epoch time on a
    2-core CPU (and first-touch page faults on every fresh allocation). Chunks of ~1k rows
    stay in cache and reuse one buffer; the same idea as "cut cross-entropy" on GPUs.
    ``w`` (N,) or None: each row's weight in the sum (per-user adaptation weighs a user's
    rows by one over their count).
    """

    @staticmethod
    def forward(ctx, h, E, y, chunk: int, w=None):
        lse, tgt = _ce_rows(h, E, y, chunk)
        ctx.save_for_backward(h, E, y, lse, w)
        ctx.chunk = chunk
        return (lse - tgt).sum() if w is None else ((lse - tgt) * w).sum()

    @staticmethod
    def backward(ctx, g):
        h, E, y, lse, w = ctx.saved_tensors
        gh = torch.empty_like(h)
        gE = torch.zeros_like(E) if ctx.needs_input_grad[1] else None  # a frozen table (adaptation): no gE
        _ce_rows_backward(h, E, y, lse, g if w is None else g * w, ctx.chunk, gh, gE)
        return gh, gE, None, None, None


class _GroupedSoftmaxCE(torch.autograd.Function):
    """``_ChunkedSoftmaxCE`` for rows scored against their own group's table: rows
    bounds[g]:bounds[g+1] of h against E[g], with E (G, I, D) a stack of tables (a round of
    federated clients, each with its own item table). One autograd node for all groups:
    split per group, each group's gE would go back through its own select, each writing a
    zero-filled copy of the whole (G, I, D) stack."""

    @staticmethod
    def forward(ctx, h, E, y, bounds: list, chunk: int, w):
        out = h.new_zeros(len(bounds) - 1)  # (G,): each group's weighted sum
        lses = []
        for g in range(len(bounds) - 1):
            s, e = bounds[g], bounds[g + 1]
            if e > s:
                lse, tgt = _ce_rows(h[s:e], E[g], y[s:e], chunk)
                out[g] = ((lse - tgt) * w[s:e]).sum()
                lses.append(lse)
        ctx.save_for_backward(h, E, y, w, *lses)
        ctx.bounds, ctx.chunk = bounds, chunk
        return out

    @staticmethod
    def backward(ctx, g):
        h, E, y, w, *lses = ctx.saved_tensors
        gh = torch.zeros_like(h)
        gE = torch.zeros_like(E)
        it = iter(lses)
        for k in range(len(ctx.bounds) - 1):
            s, e = ctx.bounds[k], ctx.bounds[k + 1]
            if e > s:
                _ce_rows_backward(h[s:e], E[k], y[s:e], next(it), g[k] * w[s:e], ctx.chunk, gh[s:e], gE[k])
        return gh, gE, None, None, None, None


def _ce_rows(h, E, y, chunk):
    """(logsumexp, target logit) per row of h against E, by row chunks."""
    N = h.shape[0]
    lse, tgt = h.new_empty(N), h.new_empty(N)
    buf = h.new_empty(min(chunk, N), E.shape[0])
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        b = torch.mm(h[s:e], E.T, out=buf[: e - s])  # (n, I)
        lse[s:e] = torch.logsumexp(b, 1)
        tgt[s:e] = b.gather(1, y[s:e, None]).squeeze(1)
    return lse, tgt


def _ce_rows_backward(h, E, y, lse, scale, chunk, gh, gE):
    """Writes d/dh into gh and adds d/dE into gE (None: not wanted) of Σ scale·(lse − tgt)."""
    N = h.shape[0]
    buf = h.new_empty(min(chunk, N), E.shape[0])
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        p = torch.mm(h[s:e], E.T, out=buf[: e - s])
        p.sub_(lse[s:e, None]).exp_()  # softmax
        p[torch.arange(e - s, device=p.device), y[s:e]] -= 1.0  # d(lse - tgt)/dlogits
        p.mul_(scale if scale.dim() == 0 else scale[s:e, None])
        torch.mm(p, E, out=gh[s:e])
        if gE is not None:
            gE.addmm_(p.T, h[s:e])


def grouped_softmax_ce(h, y, emb, counts, *, temperature: float = 1.0, weight=None, chunk: int = 1024) -> torch.Tensor:
    """(G,): ``softmax_ce`` of each group's rows against its own table: h (N, D) with the
    rows of group 0 first, then group 1, ...; counts (G,) rows per group; emb
    (G, n_items + 1, D); ``weight`` (N,): each row's weight (default 1)."""
    E = emb[:, 1:]
    if temperature != 1.0:
        h = h / temperature
    w = torch.ones(len(h), dtype=h.dtype, device=h.device) if weight is None else weight
    bounds = [0, *torch.as_tensor(counts).cumsum(0).tolist()]
    if h.device.type == "cpu" and h.dtype == torch.float32 and torch.is_grad_enabled() and not reference_only():
        return _GroupedSoftmaxCE.apply(h, E, y - 1, bounds, chunk, w)
    return torch.stack([(F.cross_entropy(h[s:e] @ E[g].T, y[s:e] - 1, reduction="none") * w[s:e]).sum()
                        for g, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))])


def softmax_ce(h, y, emb, *, temperature: float = 1.0, chunk: int = 1024, weight=None, **_) -> torch.Tensor:
    """Full softmax over all items (padding row excluded); ``weight`` (N,): each row's
    weight in the sum (default 1)."""
    E = emb[1:]
    if temperature != 1.0:
        h = h / temperature
    if h.device.type == "cpu" and h.dtype == torch.float32 and torch.is_grad_enabled() and not reference_only():
        return _ChunkedSoftmaxCE.apply(h, E, y - 1, chunk, weight)
    nll = F.cross_entropy(h @ E.T, y - 1, reduction="none")
    return nll.sum() if weight is None else (nll * weight).sum()


def _sample(n: int, n_items: int, q: torch.Tensor | None, device, generator=None) -> torch.Tensor:
    if q is None:
        return torch.randint(1, n_items + 1, (n,), device=device, generator=generator)
    return torch.multinomial(q, n, replacement=True, generator=generator)


class _PerRowSampledCE(torch.autograd.Function):
    """Sampled softmax with each row's own negatives: sum over rows of -log softmax of the
    target among [target, its M negatives], logits (h · e) / temperature + bias.

    h (N, D), emb (I + 1, D), y (N,), neg (N, M); pos_bias (N,) and neg_bias (N, M) are
    added to the logits (the logQ correction, zeros for uniform sampling); negatives equal
    to the target are masked. Rows go in chunks whose gathered negatives (c, M, D) stay in
    cache and are recomputed in the backward, never stored: for a 128 x 200 batch the full
    (N, M, D) gather is hundreds of MB."""

    @staticmethod
    def _logits(h, emb, y, neg, pos_bias, neg_bias, temperature):
        G = emb.index_select(0, neg.reshape(-1)).view(*neg.shape, -1)  # (c, M, D)
        ln = torch.bmm(G, h[:, :, None]).squeeze(-1) / temperature + neg_bias  # (c, M)
        ln = ln.masked_fill(neg == y[:, None], float("-inf"))
        E_y = emb.index_select(0, y)  # (c, D)
        lp = (h * E_y).sum(-1) / temperature + pos_bias  # (c,)
        return torch.cat([lp[:, None], ln], 1), G, E_y  # (c, 1 + M)

    @staticmethod
    def forward(ctx, h, emb, y, neg, pos_bias, neg_bias, temperature, chunk):
        total = h.new_zeros(())
        for s in range(0, h.shape[0], chunk):
            sl = slice(s, s + chunk)
            logits, _, _ = _PerRowSampledCE._logits(h[sl], emb, y[sl], neg[sl], pos_bias[sl], neg_bias[sl], temperature)
            total += (torch.logsumexp(logits, 1) - logits[:, 0]).sum()
        ctx.save_for_backward(h, emb, y, neg, pos_bias, neg_bias)
        ctx.temperature, ctx.chunk = temperature, chunk
        return total

    @staticmethod
    def backward(ctx, g):
        h, emb, y, neg, pos_bias, neg_bias = ctx.saved_tensors
        T = ctx.temperature
        gh, gemb = torch.empty_like(h), torch.zeros_like(emb)
        for s in range(0, h.shape[0], ctx.chunk):
            sl = slice(s, s + ctx.chunk)
            hc, yc, nc = h[sl], y[sl], neg[sl]
            logits, G, E_y = _PerRowSampledCE._logits(hc, emb, yc, nc, pos_bias[sl], neg_bias[sl], T)
            p = torch.softmax(logits, 1)  # (c, 1 + M); masked negatives get 0
            p[:, 0] -= 1.0  # d(lse - target logit)/dlogits
            p.mul_(g / T)  # through the 1/temperature
            gh[sl] = p[:, :1] * E_y + torch.bmm(p[:, None, 1:], G).squeeze(1)
            gemb.index_add_(0, yc, p[:, :1] * hc)
            gemb.index_add_(0, nc.reshape(-1), (p[:, 1:, None] * hc[:, None, :]).reshape(-1, hc.shape[1]))
        return gh, gemb, None, None, None, None, None, None


def sampled_softmax(h, y, emb, *, n_neg: int = 128, q: torch.Tensor | None = None, temperature: float = 1.0,
                    negatives: str = "shared", chunk: int = 1024, generator=None, **_):
    """Softmax over the target and ``n_neg`` sampled negatives, with the logQ correction
    (Yi et al., RecSys 2019): subtract log q(j) from every logit so the sampled softmax is
    an unbiased-in-the-limit estimate of the full one under a non-uniform sampler. ``q``:
    (n_items + 1,) sampling probabilities (q[0] = 0), None = uniform (then the correction is
    a constant and cancels). Negatives equal to the target are masked.

    ``negatives="shared"``: one set of ``n_neg`` for the whole batch (one matmul; a step
    pushes down only n_neg items). ``"per_row"``: every target position draws its own, as
    generative-recommenders' sampled softmax (HSTU's ML-1M recipe), so a step reaches
    N·n_neg negatives (in row chunks, ``_PerRowSampledCE``; float32 CPU tensors take the
    fused kernels of ``ops/sampled_numba.py``)."""
    n_items = emb.shape[0] - 1
    logq = torch.log(q.clamp_min(1e-12)) if q is not None else None
    if negatives == "per_row":
        if h.shape[0] == 0:
            return h.sum()  # no targets (multinomial cannot draw 0 samples)
        neg = _sample(h.shape[0] * n_neg, n_items, q, h.device, generator).view(h.shape[0], n_neg)  # (N, M)
        pos_bias = -logq[y] if logq is not None else h.new_zeros(h.shape[0])
        neg_bias = -logq[neg] if logq is not None else h.new_zeros(neg.shape)
        if _sampled_numba is not None and _sampled_numba.applicable(h, emb):
            return _sampled_numba.NumbaPerRowSampledCE.apply(h, emb, y, neg, pos_bias, neg_bias, temperature)
        return _PerRowSampledCE.apply(h, emb, y, neg, pos_bias, neg_bias, temperature, chunk)
    if negatives != "shared":
        raise ValueError(f"negatives must be 'shared' or 'per_row', got {negatives!r}")
    neg = _sample(n_neg, n_items, q, h.device, generator)  # (M,)
    pos_logit = (h * emb[y]).sum(-1) / temperature  # (N,)
    neg_logit = h @ emb[neg].T / temperature  # (N, M)
    if logq is not None:
        pos_logit = pos_logit - logq[y]
        neg_logit = neg_logit - logq[neg][None, :]
    neg_logit = neg_logit.masked_fill(neg[None, :] == y[:, None], float("-inf"))
    logits = torch.cat([pos_logit[:, None], neg_logit], 1)  # (N, 1 + M)
    return -(logits.log_softmax(-1)[:, 0]).sum()


def bce(h, y, emb, *, generator=None, **_):
    """Binary cross-entropy with one uniform negative per position (original SASRec)."""
    neg = torch.randint(1, emb.shape[0], y.shape, device=h.device, generator=generator)
    pos = (h * emb[y]).sum(-1)
    negs = (h * emb[neg]).sum(-1)
    return -(F.logsigmoid(pos) + F.logsigmoid(-negs)).sum()


def gbce(h, y, emb, *, n_neg: int = 128, t: float = 0.75, generator=None, **_):
    """gBCE (Petrov & Macdonald, RecSys 2023): BCE with k negatives where the positive
    probability is raised to beta = alpha * (t * (1 - 1/alpha) + 1/alpha), alpha = k/(I-1)
    the sampling rate, which counters the overconfidence that negative sampling causes."""
    n_items = emb.shape[0] - 1
    alpha = n_neg / (n_items - 1)
    beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)
    neg = torch.randint(1, n_items + 1, (y.shape[0], n_neg), device=h.device, generator=generator)  # (N, k)
    pos = (h * emb[y]).sum(-1)  # (N,)
    negs = torch.einsum("nd,nkd->nk", h, emb[neg])  # (N, k)
    negs = negs.masked_fill(neg == y[:, None], float("-inf"))
    return -(beta * F.logsigmoid(pos) + F.logsigmoid(-negs).sum(-1)).sum()


LOSSES = {"ce": softmax_ce, "sampled": sampled_softmax, "bce": bce, "gbce": gbce}


@dataclass(frozen=True)
class LossConfig:
    name: str = "ce"  # ce (full softmax) | sampled (sampled softmax) | bce | gbce
    n_neg: int = 128  # sampled / gbce
    temperature: float = 1.0  # logits are divided by this
    sampler: str = "uniform"  # sampled softmax: "uniform" or "popularity" (uses logQ)
    negatives: str = "shared"  # sampled softmax: "shared" by the batch or "per_row" (each target its own)
    pop_alpha: float = 0.75  # popularity ** alpha for the popularity sampler
    gbce_t: float = 0.75  # gBCE's calibration parameter t


def get_loss(cfg: LossConfig, item_counts=None):
    """Returns f(h, y, emb) -> summed loss for a LossConfig."""
    if cfg.name not in LOSSES:
        raise ValueError(f"unknown loss {cfg.name!r}; valid: {sorted(LOSSES)}")
    fn = LOSSES[cfg.name]
    q = None
    if cfg.name == "sampled" and cfg.sampler == "popularity":
        if item_counts is None:
            raise ValueError("the popularity sampler needs training item counts")
        w = torch.as_tensor(item_counts, dtype=torch.float64).clamp_min(0) ** cfg.pop_alpha
        w[0] = 0
        q = (w / w.sum()).float()
    elif cfg.sampler not in ("uniform", "popularity"):
        raise ValueError(f"unknown sampler {cfg.sampler!r}; valid: ['popularity', 'uniform']")
    if cfg.negatives not in ("shared", "per_row"):
        raise ValueError(f"unknown negatives {cfg.negatives!r}; valid: ['per_row', 'shared']")

    def loss(h, y, emb):
        return fn(h, y, emb, n_neg=cfg.n_neg, q=None if q is None else q.to(h.device), temperature=cfg.temperature,
                  negatives=cfg.negatives, t=cfg.gbce_t)

    return loss
