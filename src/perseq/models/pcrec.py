"""PCRec (KDD 2025, "predictive coding" sequential recommendation): HSTU with a
predictive-coding module after each block, so that every forward pass performs one step
of inference on the user's own sequence (DESIGN.md §5; the write-up in
../shared/references/003_*.txt §4.2.4). Built from the paper's equations; the authors'
code is not ported (its θ reads the future, its fast weights drift across users, its error
is a (B, B) broadcast, and it does not run).

The generative model. States s_0 (the input embeddings), s_1, ..., s_L (the outputs of the
L blocks), each (T, d). Each state is predicted from the one above through a learned
position-mixing matrix and a nonlinearity f:

    p(s_{l-1} | s_l) = N(μ_{l-1}, I),   μ_{l-1} = M_l f(s_l),   M_l = tril(θ_l)[:T, :T]
    ε_{l-1} = s_{l-1} − μ_{l-1}                      (per token and per dimension)
    E = Σ_{l=1..L} ‖ε_{l-1}‖²

θ_l is a (max_len, max_len) parameter of which only the lower triangle is used, so the
prediction for position t mixes f(s_l) at positions t' ≤ t: causal for any max_len.

Derivation. ε_{l-1} depends on s_{l-1} (coefficient 1) and on s_l (through μ_{l-1}), so

    ∂E/∂s_{l-1} ∋ 2 ε_{l-1}                              (from the pair l-1, l)
    ∂E/∂s_l     ∋ −2 f'(s_l) ⊙ (M_lᵀ ε_{l-1})            (from the same pair)

and summing over the pairs that contain a state gives the paper's three rules for
Δs = −(γ/2) ∂E/∂s: the bottom state s_0 gets −γ ε_0 only, the top s_L gets
γ f'(s_L) ⊙ M_Lᵀ ε_{L-1} only, a middle state gets both. For the weights,

    ∂E/∂θ_l = −2 ε_{l-1} f(s_l)ᵀ   ⇒   Δθ_l = α ε_{l-1} f(s_l)ᵀ

(a (T, T) matrix, contracted over d). The paper's text writes the error in Δθ_{l+1} as
ε_{l-1}; by its own definitions ∂E/∂θ_{l+1} gives ε_l (our index l-1 above for θ_l).

Two changes make the rules causal. (1) (M_lᵀ ε)[t] = Σ_{t' ≥ t} M_l[t', t] ε[t'] sums the
errors of *later* positions into t, which in training would read t's own target; a causal
model keeps the terms it may read, t' = t: diag(M_l) ⊙ ε. (2) Δθ_l keeps its lower
triangle, so row t uses ε[t] and f(s_l)[t' ≤ t] only.

One correction per block (the blocks are the iterations, as in the paper). Block l sees its
input x = s_{l-1} and computes its output y = s_l = x + F_l(x); then its module

    ε⁰ = x − M f(y)                                  with the trained θ
    Δθ = α · tril(ε⁰ f(y)ᵀ)                          a fast weight, per sequence
    ε  = x − (M + Δθ) f(y)                           the error under θ + Δθ: where Δθ is used
    x_l = y + γ ⊙ (f'(y) ⊙ diag(M + Δθ) ⊙ ε − ε)

The f' term is y's own correction; the −ε term is x's (s_{l-1}'s), which reaches the stream
through the residual path of y = x + F(x) (to first order a change of x is the same change
of y). Summed over the blocks this is exactly the three rules. Δθ is computed functionally
for each sequence, reset for every sequence, and never written into θ: nothing carries
from one user, batch or evaluation to the next (the authors' in-place update did).

γ = σ(LN(x) W_γ + b_γ) per token and dimension (learned; b_γ starts at −3, so γ ≈ 0.05 and
the model starts close to HSTU), or a fixed number (``gamma``). f ∈ softplus (default),
sigmoid, tanh, relu, identity. ``pc_blocks`` = how many blocks (from the bottom) carry a
module; 0 is HSTU exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hstu import HSTU_LARGE, HSTU, HSTUConfig
from .sasrec import SASRec, SASRecConfig

ACTIVATIONS = ("softplus", "sigmoid", "tanh", "relu", "identity")


def f_and_derivative(y: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(y), f'(y)) for the predictive model's nonlinearity."""
    if name == "softplus":
        return F.softplus(y), torch.sigmoid(y)
    if name == "sigmoid":
        s = torch.sigmoid(y)
        return s, s * (1 - s)
    if name == "tanh":
        t = torch.tanh(y)
        return t, 1 - t * t
    if name == "relu":
        return F.relu(y), (y > 0).to(y.dtype)
    if name == "identity":
        return y, torch.ones_like(y)
    raise ValueError(f"unknown PCRec activation {name!r}; valid: {', '.join(ACTIVATIONS)}")


@dataclass(frozen=True, kw_only=True)
class PCSettings:
    """The predictive-coding settings, shared by every backbone that carries the modules
    (keyword-only, so they follow the backbone's own fields)."""

    pc_blocks: int | None = None  # blocks (from the bottom) with a predictive-coding module; None = all, 0 = the plain backbone
    alpha: float = 1e-3  # rate of the per-sequence fast-weight step Δθ = α ε f(s)ᵀ (0 = no fast weights)
    f: str = "softplus"  # the predictive model's nonlinearity: softplus | sigmoid | tanh | relu | identity
    gamma: float | None = None  # None: learned γ = σ(LN(x) W + b) per token and dimension; a number: that fixed γ
    gamma_bias_init: float = -3.0  # b's start: γ ≈ 0.05, so training starts close to the backbone

    def _check_pc(self) -> None:
        if self.f not in ACTIVATIONS:
            raise ValueError(f"unknown PCRec activation {self.f!r}; valid: {', '.join(ACTIVATIONS)}")
        if self.pc_blocks is not None and not 0 <= self.pc_blocks <= self.n_blocks:
            raise ValueError(f"pc_blocks={self.pc_blocks} must be between 0 and n_blocks={self.n_blocks}")


@dataclass(frozen=True)
class PCRecConfig(HSTUConfig, PCSettings):
    def __post_init__(self):
        super().__post_init__()
        self._check_pc()


@dataclass(frozen=True)
class PCRecLargeConfig(PCRecConfig):
    n_blocks: int = HSTU_LARGE["n_blocks"]
    n_heads: int = HSTU_LARGE["n_heads"]


def fast_weight_product(e: torch.Tensor, fa: torch.Tensor, f: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """tril(e faᵀ) f for e, fa, f (B, T, d), without the (B, T, T) matrix: row t is
    e_t Σ_{s≤t} fa_s f_sᵀ, so it is computed by chunks of ``chunk`` positions (linear
    attention's chunked form): within a chunk through its (c, c) triangle, across chunks
    through the running sum of the earlier chunks' faᵀ f (d, d). Same numbers up to float
    rounding; in training it is ~1.5x faster than the (T, T) form, whose elementwise passes
    over B·T² entries (tril, scaling, their backward) dominated the module."""
    B, T, d = e.shape
    n = -(-T // chunk)
    pad = n * chunk - T  # zero rows: they add nothing to any sum, and their outputs are cut
    e, fa, f = (F.pad(t, (0, 0, 0, pad)).view(B, n, chunk, d) for t in (e, fa, f))
    within = torch.tril(e @ fa.transpose(-1, -2)) @ f  # (B, n, c, d)
    sums = fa.transpose(-1, -2) @ f  # (B, n, d, d): each chunk's Σ fa_s f_sᵀ
    before = F.pad(torch.cumsum(sums, 1)[:, :-1], (0, 0, 0, 0, 1, 0))  # the chunks before each one
    return (within + e @ before).view(B, n * chunk, d)[:, :T]


class PCModule(nn.Module):
    """One block's predictive-coding correction (the module docstring's four lines)."""

    def __init__(self, cfg: PCRecConfig):
        super().__init__()
        self.cfg = cfg
        self.theta = nn.Parameter(torch.randn(cfg.max_len, cfg.max_len) * 0.02)  # only tril is used
        if cfg.gamma is None:
            self.gate = nn.Linear(cfg.d, cfg.d)
            nn.init.normal_(self.gate.weight, std=0.02)
            nn.init.constant_(self.gate.bias, cfg.gamma_bias_init)

    def forward(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x: the block's input s_{l-1}, y: its output s_l, both (B, T, d) -> corrected (B, T, d).
        ``rows`` (B,): correct only position rows[b] of each sequence (scoring reads nothing
        else of the last block), the other positions return y unchanged. Row t's correction
        reads f(y) at t' <= t and x, ε at t alone, so it equals row t of the full one."""
        B, T = x.shape[:2]
        M = torch.tril(self.theta[:T, :T])  # (T, T)
        fy, dfy = f_and_derivative(y, self.cfg.f)
        if rows is None:  # every position: Tq = T
            xq, yq, dfyq = x, y, dfy
            eps = x - torch.einsum("ts,bsd->btd", M, fy)  # ε⁰ with the trained θ
            diag = torch.diagonal(M).expand(B, T)  # (B, T)
        else:  # one position per sequence: Tq = 1
            b = torch.arange(B, device=x.device)
            xq, yq, dfyq, fyq = x[b, rows][:, None], y[b, rows][:, None], dfy[b, rows][:, None], fy[b, rows][:, None]
            eps = xq - M[rows][:, None] @ fy  # (B, 1, d): row r of M f(y)
            diag = M[rows, rows][:, None]  # (B, 1)
        if self.cfg.alpha:
            fa = self.cfg.alpha * fy  # α f(y): Δθ = tril(ε⁰ (α f(y))ᵀ), per sequence, never stored
            if rows is None:
                diag = diag + (eps * fa).sum(-1)  # diag(Δθ)_t = α ε⁰_t · f(y)_t
                # ε under θ + Δθ. Two ways to the same numbers: the chunked form is cheaper under
                # autograd (no (B, T, T) tensor and its backward), the (T, T) triangle without it
                # (one bmm pair; ML-1M batch 128, L 50 / 200: 1.4 / 1.2x faster than chunks)
                if torch.is_grad_enabled():
                    eps = eps - fast_weight_product(eps, fa, fy)
                else:
                    eps = eps - torch.tril(eps @ fa.transpose(1, 2)) @ fy
            else:
                later = torch.arange(T, device=x.device)[None, None] > rows[:, None, None]  # (B, 1, T)
                dtheta = (eps @ fa.transpose(1, 2)).masked_fill(later, 0.0)  # (B, 1, T): row r of the tril
                diag = diag + (eps * self.cfg.alpha * fyq).sum(-1)
                eps = eps - dtheta @ fy
        if self.cfg.gamma is None:
            gamma = torch.sigmoid(self.gate(F.layer_norm(xq, (x.shape[-1],), eps=1e-6)))
        else:
            gamma = self.cfg.gamma
        out = yq + gamma * (dfyq * diag[..., None] * eps - eps)
        return out if rows is None else y.index_put((b, rows), out[:, 0])


class _PCStack:
    """One PCModule after each of the first ``pc_blocks`` blocks of a backbone whose
    ``encode`` passes every block's input and output through ``_after_block``. Scores by
    full re-encode (no incremental ``step``: the fast weights of a position depend on the
    whole prefix's errors, which a step would have to cache per block)."""

    incremental = False

    def _add_pc(self, cfg: PCSettings) -> None:
        n = cfg.n_blocks if cfg.pc_blocks is None else cfg.pc_blocks
        self.pc = nn.ModuleList(PCModule(cfg) for _ in range(n))

    _score_rows: torch.Tensor | None = None  # set while predict_hidden runs: the rows it reads

    def _after_block(self, i, x, y):
        if i >= len(self.pc):
            return y
        last = i == len(self.blocks) - 1  # nothing reads the last block's other positions
        return self.pc[i](x, y, self._score_rows if last else None)

    def predict_hidden(self, items, lengths, times=None, target_time=None):
        """The backbone's, with the last block's module correcting only the scored rows
        (its other positions feed nothing): at inference PCRec then pays for one module
        per block below the top, not for every block."""
        self._score_rows = lengths - 1
        try:
            return super().predict_hidden(items, lengths, times, target_time)
        finally:
            self._score_rows = None

    def init_state(self, batch_size: int, device=None):
        raise NotImplementedError(f"{type(self).__name__} scores by full re-encode (its fast weights need the whole prefix)")

    def step(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} scores by full re-encode (its fast weights need the whole prefix)")


class PCRec(_PCStack, HSTU):
    """HSTU + the predictive-coding modules (``_PCStack``)."""

    Config = PCRecConfig

    def __init__(self, cfg: PCRecConfig):
        super().__init__(cfg)
        self._add_pc(cfg)


class PCRecLarge(PCRec):
    """PCRec at HSTU-large's size (8 blocks, 2 heads)."""

    Config = PCRecLargeConfig


# -- the module on a second backbone (the paper leaves this as future work) ----------------
@dataclass(frozen=True)
class SASRecPCConfig(SASRecConfig, PCSettings):
    def __post_init__(self):
        self._check_pc()


class SASRecPC(_PCStack, SASRec):
    """SASRec + the same modules and rules as PCRec (``_PCStack``): a SASRec block is also
    y = x + F(x) (pre-norm residuals), so its input's correction reaches the stream through
    the residual path."""

    Config = SASRecPCConfig

    def __init__(self, cfg: SASRecPCConfig):
        super().__init__(cfg)
        self._add_pc(cfg)
