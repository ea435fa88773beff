"""PerSRec: long histories compressed into K learnable tokens whose keys and values are
cached per user (arXiv 2601.03479; DESIGN.md §5 "PerSRec"), as a form of any attention
backbone: ``sasrec+persrec``, ``hstu+persrec``, ``llama+persrec``.

Layout. The events a model reads (``max_len``) split into the most recent R (``recent``)
and the history before them, cut from its oldest event into segments of
P = (max_len − R) / ``segments`` events. One pass runs

    [S0 | T | S1 | T | … | S_{n−1} | T | r_1 … r_R]

where every T is the same K learned tokens (``tokens``), shared by all users and all
segments: personalization lives only in their keys and values after they have read a
user's history.

Mask (query row → key columns), causal everywhere:
    history item of S_i   earlier items of S_i, and the token block after S_{i−1}
    token of block T_i    all of S_i, earlier tokens of T_i, and the block T_{i−1}
    recent item           earlier recent items and the user's last token block only
So a recent item sees no raw history column, and a token block reads the history only
through its own segment and the block before it. Each window ``[T_{i−1} | S_i | T_i]`` is
therefore exactly what a fold computes in serving (``compress``/``append``), and the cache
stays K tokens per layer however many segments are chained (the authors' layout lets every
later block see all earlier blocks; a bounded cache needs the chain instead).

Positions. Learned absolute tables cannot run forever, so positions restart in every
segment: an item's position is its index inside its segment (history segment or the recent
part), at most max(P, R) − 1; the tokens carry no position (their learned vectors are their
identity). Per backbone: SASRec and HSTU add ``pos_emb[local index]`` to items; LLaMA rotates
items' queries and keys by the local index and leaves tokens unrotated; HSTU's relative bias
``pos_w[i − j]`` applies between two items of one segment and is 0 for any pair with a
token. Serving therefore never runs out of positions however long a user's history grows.
HSTU's time bias is not used (``time_bias`` defaults to false here and must stay false).

Loss. ``encode`` returns one hidden state per input item, in input order, so the usual
training step applies: every item position predicts the next real item, including the
last history item, whose target is the first recent item (that history→recent transition
is supervised), and the last item of each segment, whose target is the next segment's
first. Token outputs carry no loss. Two quirks of the authors' code are not copied: their
last history position is trained to predict the first token's embedding, and their
token→first-recent-item transition is never supervised.

Short users. A user with n ≤ max_len events has min(n, R) recent events and n − min(n, R)
history events, filled into segments from the oldest; segments left empty do not exist
for that user (their tokens are masked out), except segment 0, whose token block always
exists: with no history at all the tokens read only themselves, a cache shared by every
such user. No padding is ever attended to.

Serving (``compress``, ``recommend``, ``append``): the cache is ``{"k", "v"}`` of shape
(n_blocks, B, H, K, head size), the token block's per-layer keys and values, and
``"folded"`` (B,), how many events it has read (a user's first fold reads no block before it).
``append`` keeps at most R recent events: past R it folds the oldest (at least ``fold``,
at most P at a time) into the cache by running one window ``[cached tokens | folded events
| T]`` — K tokens per layer forever, and a flat cost per event.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import reference_only
from .base import SeqRecModel
from .hstu import HSTU, HSTUConfig
from .llama import LlamaRec, LlamaRecConfig
from .sasrec import SASRec, SASRecConfig

# element kinds of a layout
HIST, TOKEN, RECENT = 0, 1, 2


@dataclass(frozen=True)
class PerSRecFields:
    # R: the most recent events, encoded at every request against the cached tokens
    # (0: max_len // 4)
    recent: int = 0
    # K: learned compression tokens per segment; their keys/values are the per-user cache
    tokens: int = 4
    # how many history segments of P = (max_len - recent) / segments events the training
    # window chains; serving chains as many as a history needs
    segments: int = 1
    # events folded into the cache at once when the recent part outgrows R (0: R // 2)
    fold: int = 0

    def persrec_sizes(self) -> tuple[int, int, int]:
        """(P, K, R) after defaults, checked."""
        R = self.recent or max(1, self.max_len // 4)
        if not 1 <= R < self.max_len:
            raise ValueError(f"recent={R} must be at least 1 and below max_len={self.max_len} (the events read)")
        if self.segments < 1 or self.tokens < 1:
            raise ValueError(f"segments and tokens must be at least 1, got {self.segments} and {self.tokens}")
        P = (self.max_len - R) // self.segments
        if P < 1:
            raise ValueError(f"max_len={self.max_len} - recent={R} leaves no history for {self.segments} segment(s)")
        return P, self.tokens, R


@dataclass(frozen=True)
class SASRecPerSRecConfig(PerSRecFields, SASRecConfig):
    pass


@dataclass(frozen=True)
class LlamaPerSRecConfig(PerSRecFields, LlamaRecConfig):
    pass


@dataclass(frozen=True)
class HSTUPerSRecConfig(PerSRecFields, HSTUConfig):
    time_bias: bool = False  # PerSRec's HSTU form has no time bias (tokens have no timestamps)


# -- how each backbone runs one layer over a window with a cached prefix ----------------
# meta of a window's elements: kind (T,), seg (T,), pos (T,) local position (0 for tokens)


def _softmax_attention(q, K, V, allowed):
    """softmax(q Kᵀ / sqrt(hs)) V over the allowed keys: q (B, H, T, hs), K/V (B, H, Tk, hs),
    allowed (B, T, Tk) bool with at least one key per row."""
    if not reference_only():
        return F.scaled_dot_product_attention(q, K, V, attn_mask=allowed[:, None])
    w = (q @ K.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~allowed[:, None], float("-inf"))
    return w.softmax(-1) @ V


class _SASRecLayers:
    def __init__(self, m: SASRec):
        self.m, self.blocks = m, m.blocks

    def embed(self, items, pos):  # items (B, T), pos (T,) -> (B, T, D)
        return self.m.item_emb(items) * self.m.cfg.d**0.5 + self.m.pos_emb.weight[pos]

    def token_scale(self):
        return self.m.cfg.d**0.5

    def qkv(self, i, x, meta):
        B, T, D = x.shape
        a = self.blocks[i].attn
        q, k, v = a.qkv(self.blocks[i].ln1(x)).view(B, T, 3, a.n_heads, D // a.n_heads).permute(2, 0, 3, 1, 4)
        return q, k, v, None  # 3 x (B, H, T, hs)

    def attend(self, i, q, K, V, allowed, qmeta, kmeta):
        return _softmax_attention(q, K, V, allowed)

    def finish(self, i, x, av, extra):
        blk = self.blocks[i]
        B, H, T, hs = av.shape
        x = x + blk.drop(blk.attn.proj(av.transpose(1, 2).reshape(B, T, H * hs)))
        return x + blk.drop(blk.ffn(blk.ln2(x)))

    def final(self, x):
        return self.m._out(self.m.ln_f(x))


class _LlamaLayers(_SASRecLayers):
    def embed(self, items, pos):  # RoPE carries positions, in the attention
        return self.m.item_emb(items)

    def token_scale(self):
        return 1.0

    def qkv(self, i, x, meta):
        B, T, D = x.shape
        a = self.blocks[i].attn
        q, k, v = a.qkv(self.blocks[i].norm1(x)).view(B, T, 3, a.n_heads, a.hs).permute(2, 0, 3, 1, 4)
        kind, _, pos = meta
        tok = (kind == TOKEN)[:, None]  # (T, 1): tokens stay unrotated
        q = torch.where(tok, q, self.m.rope(q, pos))
        k = torch.where(tok, k, self.m.rope(k, pos))
        return q, k, v, None

    def finish(self, i, x, av, extra):
        blk = self.blocks[i]
        B, H, T, hs = av.shape
        x = x + blk.drop(blk.attn.o(av.transpose(1, 2).reshape(B, T, H * hs)))
        return x + blk.drop(blk.ffn(blk.norm2(x)))

    def final(self, x):
        return self.m.norm_f(x)


class _HSTULayers(_SASRecLayers):
    def embed(self, items, pos):
        x = self.m.item_emb(items) * self.m.cfg.d**0.5
        return x + self.m.pos_emb(pos) if self.m.pos_emb is not None else x

    def qkv(self, i, x, meta):
        B, T, _ = x.shape
        blk = self.blocks[i]
        u, v, q, k = blk._uvqk(x)
        H = blk.n_heads
        q = q.view(B, T, H, blk.dqk).transpose(1, 2)  # (B, H, T, dqk)
        k = k.view(B, T, H, blk.dqk).transpose(1, 2)
        v = v.view(B, T, H, blk.dv).transpose(1, 2)  # (B, H, T, dv)
        return q, k, v, u

    def attend(self, i, q, K, V, allowed, qmeta, kmeta):
        blk = self.blocks[i]
        (qk, qs, qp), (kk, ks, kp) = qmeta, kmeta
        # rab_pos between two items of one segment (the recent part is one), 0 with a token
        same = (qk[:, None] != TOKEN) & (kk[None, :] != TOKEN) & (qk[:, None] == kk[None, :]) & (qs[:, None] == ks[None, :])
        rel = (qp[:, None] - kp[None, :]).clamp(0, blk.max_len - 1)
        bias = torch.where(same, blk.pos_w[rel], blk.pos_w.new_zeros(()))  # (T, Tk)
        a = F.silu(q @ K.transpose(-2, -1) + bias) / blk.max_len * allowed[:, None]  # (B, H, T, Tk)
        return a @ V

    def finish(self, i, x, av, extra):
        B, H, T, dv = av.shape
        return self.blocks[i]._out(x, extra, av.transpose(1, 2).reshape(B, T, H * dv))

    def final(self, x):
        return self.m._finish(x)


# -- the mask ---------------------------------------------------------------------------


def _allowed(qmeta, kmeta, k_valid, last_seg):
    """(B, Tq, Tk) bool: which keys each query reads (the module docstring's rules), keys
    restricted to ``k_valid`` (B, Tk); a query whose row would be empty (padding) reads
    nothing but may not be NaN, so it gets its own column when keys and queries coincide,
    else the first key. ``last_seg`` (B,): the token block recent items read."""
    (qk, qs, qp), (kk, ks, kp) = qmeta, kmeta
    qk, qs, qp = qk[:, None], qs[:, None], qp[:, None]  # (Tq, 1)
    kk, ks, kp = kk[None], ks[None], kp[None]  # (1, Tk)
    prev_tokens = (kk == TOKEN) & (ks == qs - 1)
    hist = (qk == HIST) & (((kk == HIST) & (ks == qs) & (kp <= qp)) | prev_tokens)
    tok = (qk == TOKEN) & (((kk == HIST) & (ks == qs)) | ((kk == TOKEN) & (ks == qs) & (kp <= qp)) | prev_tokens)
    rec_items = (qk == RECENT) & (kk == RECENT) & (kp <= qp)  # (Tq, Tk)
    rec_tokens = (qk == RECENT) & (kk == TOKEN)  # (Tq, Tk), per user below
    user_tokens = ks[None] == last_seg[:, None, None]  # (B, 1, Tk)
    allowed = ((hist | tok | rec_items)[None] | (rec_tokens[None] & user_tokens)) & k_valid[:, None, :]
    empty = ~allowed.any(-1, keepdim=True)  # (B, Tq, 1)
    fallback = torch.zeros_like(allowed)
    fallback[..., 0] = True
    return allowed | (empty & fallback)


# -- the model --------------------------------------------------------------------------


class PerSRec(SeqRecModel):
    """An attention backbone in PerSRec form (module docstring). Subclasses name the
    backbone; the backbone's own modules and parameters are used unchanged, plus one
    (K, D) parameter ``tokens``."""

    backbone_cls: type[SeqRecModel]
    layers_cls: type

    def __init__(self, cfg):
        super().__init__(cfg.n_items, cfg.max_len)
        self.cfg = cfg
        self.P, self.K, self.R = cfg.persrec_sizes()
        if getattr(cfg, "time_bias", False):
            raise ValueError("PerSRec's HSTU form has no time bias: set model.time_bias: false")
        # the backbone's position tables run over one segment: max(P, R) positions
        bcfg = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(self.backbone_cls.Config)}
        self.backbone = self.backbone_cls(self.backbone_cls.Config(**{**bcfg, "max_len": max(self.P, self.R)}))
        self.tokens = nn.Parameter(torch.randn(self.K, cfg.d) * 0.02)
        self._layers = self.layers_cls(self.backbone)
        self.fold = cfg.fold or max(1, self.R // 2)
        if not 1 <= self.fold <= min(self.P, self.R):
            raise ValueError(f"fold={cfg.fold} must be between 1 and min(P, R) = {min(self.P, self.R)}")

    @property
    def item_emb(self) -> nn.Embedding:
        """The backbone's item table (a property: one module, one name in checkpoints)."""
        return self.backbone.item_emb

    def output_embeddings(self):
        return self.backbone.output_embeddings()

    # -- one window: [cached prefix | new elements], every layer -------------------------
    def _window(self, items, meta, allowed, prefix=None):
        """Run the layers over one window: items (B, T) with -1 at token slots (0 at padding),
        meta (kind, seg, pos) of the T new elements, allowed (B, T, Tp + T), prefix: the cached
        keys/values (n_blocks, B, H, Tp, ·) or None -> (hidden (B, T, D), keys, values of the
        new elements per layer (n_blocks, B, H, T, ·))."""
        kind, _, pos = meta
        is_tok = (kind == TOKEN)[None, :, None]  # (1, T, 1)
        x = self._layers.embed(items.clamp(min=0), pos)  # (B, T, D); token slots overwritten next
        tok = (self.tokens * self._layers.token_scale())[torch.cumsum(kind == TOKEN, 0).sub(1).clamp(min=0) % self.K]
        x = self.backbone.drop(torch.where(is_tok, tok[None].to(x.dtype), x))
        ks, vs = [], []
        kmeta = meta if prefix is None else tuple(torch.cat([p, m]) for p, m in zip(prefix["meta"], meta))
        for i in range(len(self._layers.blocks)):
            q, k, v, extra = self._layers.qkv(i, x, meta)
            ks.append(k)
            vs.append(v)
            K = k if prefix is None else torch.cat([prefix["k"][i], k], 2)
            V = v if prefix is None else torch.cat([prefix["v"][i], v], 2)
            x = self._layers.finish(i, x, self._layers.attend(i, q, K, V, allowed, meta, kmeta), extra)
        return self._layers.final(x), torch.stack(ks), torch.stack(vs)

    @staticmethod
    def _meta(parts, device):
        """(kind, seg, pos) for a concatenation of (kind, seg, length) parts."""
        kind, seg, pos = [], [], []
        for k, s, n in parts:
            kind.append(torch.full((n,), k))
            seg.append(torch.full((n,), s))
            pos.append(torch.arange(n))
        return tuple(torch.cat(t).to(device) for t in (kind, seg, pos))

    # -- the one-pass layout (training, and the reference for the serving path) ----------
    def forward_layout(self, segments: list[torch.Tensor], recent: torch.Tensor, token_kv=None):
        """One pass over ``[S0 | T | S1 | T | … | recent]``: segments, each (B, n_i)
        right-padded history events (a segment with no event for a user does not exist for
        that user, except segment 0), recent (B, r) right-padded. Returns (hidden (B, T, D),
        keys, values per layer (n_blocks, B, H, T, ·), meta, per-user last segment (B,)).
        ``token_kv``: {"k", "v"} (n_blocks, B, H, K, ·) replaces the keys/values that recent
        items read from the tokens (a test hook: with them fixed, history cannot matter)."""
        dev = recent.device
        B, K = recent.shape[0], self.K
        parts, cols = [], []
        for i, s in enumerate(segments):
            parts += [(HIST, i, s.shape[1]), (TOKEN, i, K)]
            cols += [s, torch.full((B, K), -1, dtype=s.dtype, device=dev)]
        n_seg = len(segments)
        parts.append((RECENT, n_seg, recent.shape[1]))
        cols.append(recent)
        items = torch.cat(cols, 1)  # (B, T)
        meta = self._meta(parts, dev)
        kind, seg, _ = meta
        # segment i exists for a user when it holds an event (segment 0 always)
        exists = torch.stack([(s != 0).any(1) if i else torch.ones(B, dtype=torch.bool, device=dev)
                              for i, s in enumerate(segments)], 1)  # (B, n_seg)
        last = exists.long().cumprod(1).sum(1) - 1  # (B,): segments exist from the oldest on
        valid = torch.where((kind == TOKEN)[None], exists[:, seg.clamp(max=n_seg - 1)], items != 0)  # (B, T)
        allowed = _allowed(meta, meta, valid, last)
        if token_kv is None:
            h, k, v = self._window(items, meta, allowed)
            return h, k, v, meta, last
        # recent items against fixed token keys/values: run everything before the recent
        # part, then the recent part with the given cache as its prefix
        n_rec = recent.shape[1]
        h0, k0, v0 = self._window(items[:, :-n_rec], tuple(m[:-n_rec] for m in meta), allowed[:, :-n_rec, :-n_rec])
        h1 = self._recent_window(token_kv, recent)[0]
        return torch.cat([h0, h1], 1), k0, v0, meta, last

    def encode(self, items, times=None):
        """items (B, L) right-padded, L ≤ max_len -> (B, L, D): each input position's hidden
        state under the PerSRec layout (history / recent split per user, module docstring)."""
        B, L = items.shape
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds max_len {self.max_len}")
        segments, recent, slot = self._split(items)
        h, *_ = self.forward_layout(segments, recent)
        return h.gather(1, slot[:, :, None].expand(B, L, h.shape[-1]))  # (B, L, D)

    def _split(self, items):
        """Right-padded items (B, L) -> history segments, recent (B, min(L, R)), and the
        layout slot of every input position (B, L). Shapes depend on L only (not on the
        values), so ``torch.func.vmap`` can run it."""
        B, L = items.shape
        P, K, R = self.P, self.K, self.R
        n = (items != 0).sum(1)  # (B,)
        n_rec = n.clamp(max=R)
        n_hist = n - n_rec  # (B,)
        width_r, width_h = min(L, R), max(0, L - R)
        n_seg = max(1, -(-width_h // P))
        t = torch.arange(L, device=items.device)
        segments, offset = [], 0
        slot = torch.zeros(B, L, dtype=torch.long, device=items.device)
        for i in range(n_seg):
            w = min(P, width_h - i * P) if width_h else 0
            j = torch.arange(w, device=items.device)
            src = (i * P + j)[None, :].expand(B, w)  # (B, w)
            ok = src < n_hist[:, None]
            segments.append(torch.where(ok, items.gather(1, src.clamp(max=L - 1)), 0))
            in_seg = (t[None] >= i * P) & (t[None] < min((i + 1) * P, width_h)) & (t[None] < n_hist[:, None])
            slot = torch.where(in_seg, offset + t[None] - i * P, slot)
            offset += w + K
        j = torch.arange(width_r, device=items.device)
        src = n_hist[:, None] + j[None, :]  # (B, width_r)
        recent = torch.where(j[None] < n_rec[:, None], items.gather(1, src.clamp(max=L - 1)), 0)
        is_rec = t[None] >= n_hist[:, None]
        slot = torch.where(is_rec, offset + (t[None] - n_hist[:, None]).clamp(max=width_r - 1), slot)
        return segments, recent, slot

    # -- serving: compress, recommend, append --------------------------------------------
    def _compress_window(self, cache, events):
        """One fold: ``[cached tokens | events | T]`` -> the new token block's cache; events
        (B, f) right-padded. The cached tokens are read only by users who have folded
        something already: a user's first segment has no block before it, as in training
        (the tokens of an empty history are a user's cache until then, never a prefix).
        Users with no event here keep their cache: the segment does not exist for them."""
        B, f = events.shape
        dev = events.device
        parts = [(HIST, 1, f), (TOKEN, 1, self.K)]
        meta = self._meta(parts, dev)
        items = torch.cat([events, torch.full((B, self.K), -1, dtype=events.dtype, device=dev)], 1)
        valid = torch.cat([events != 0, torch.ones(B, self.K, dtype=torch.bool, device=dev)], 1)
        n_new = (events != 0).sum(1)  # (B,)
        prefix = None
        if cache is not None:
            prefix = {"k": cache["k"], "v": cache["v"], "meta": self._meta([(TOKEN, 0, self.K)], dev)}
            had = (cache["folded"] > 0)[:, None].expand(B, self.K)  # (B, K): a block to read
            valid = torch.cat([had, valid], 1)
        kmeta = meta if prefix is None else tuple(torch.cat([p, m]) for p, m in zip(prefix["meta"], meta))
        allowed = _allowed(meta, kmeta, valid, torch.zeros(B, dtype=torch.long, device=dev))
        _, k, v = self._window(items, meta, allowed, prefix)
        new = {"k": k[..., -self.K:, :], "v": v[..., -self.K:, :]}
        if cache is None:
            return {**new, "folded": n_new}
        keep = n_new == 0  # (B,) no event: the segment does not exist for them
        out = {n: torch.where(keep[None, :, None, None, None], cache[n], new[n]) for n in ("k", "v")}
        return {**out, "folded": cache["folded"] + n_new}

    def compress(self, history: torch.Tensor, segment: int | None = None) -> dict:
        """history (B, L) right-padded, any L -> cache {"k", "v"}: (n_blocks, B, H, K, ·),
        the token block's keys and values after reading the history in segments of
        ``segment`` events (default P) from the oldest (as many segments as it needs).
        ``segment=fold`` gives exactly the cache that streaming the same events through
        ``append`` one at a time folds (the first ``folded(n)`` of n events)."""
        seg = segment or self.P
        cache = self._compress_window(None, history[:, :seg])
        for i in range(1, max(1, -(-history.shape[1] // seg))):
            cache = self._compress_window(cache, history[:, i * seg : (i + 1) * seg])
        return cache

    def folded(self, n: int) -> int:
        """How many of n events streamed one at a time sit in the cache (the rest are the
        recent part): none up to R, then whole folds of ``fold`` events."""
        return 0 if n <= self.R else self.fold * -(-(n - self.R) // self.fold)

    def _recent_window(self, cache, recent):
        """recent (B, r) right-padded against the cached tokens -> (hidden (B, r, D), the
        recent events' keys and values per layer)."""
        B, r = recent.shape
        dev = recent.device
        meta = self._meta([(RECENT, 1, r)], dev)
        prefix = {"k": cache["k"], "v": cache["v"], "meta": self._meta([(TOKEN, 0, self.K)], dev)}
        kmeta = tuple(torch.cat([p, m]) for p, m in zip(prefix["meta"], meta))
        valid = torch.cat([torch.ones(B, self.K, dtype=torch.bool, device=dev), recent != 0], 1)
        allowed = _allowed(meta, kmeta, valid, torch.zeros(B, dtype=torch.long, device=dev))
        return self._window(recent, meta, allowed, prefix)

    def recommend_hidden(self, cache, recent):
        """Hidden state (B, D) after the last recent event of each row (right-padded, ≥ 1 event)."""
        n = (recent != 0).sum(1)
        if (n == 0).any():
            raise ValueError("every user needs at least one recent event to score from")
        h = self._recent_window(cache, recent)[0]
        return h[torch.arange(recent.shape[0], device=recent.device), n - 1]

    def recommend(self, cache, recent):
        """(B, n_items + 1) next-item scores from the cache and the recent events; column 0
        (padding) is -inf."""
        s = self.recommend_hidden(cache, recent) @ self.output_embeddings().T
        s[:, 0] = float("-inf")
        return s

    def append(self, cache, recent, events):
        """Add new events (B, e) right-padded to each user's recent part (B, r) right-padded
        -> (cache, recent). Past R recent events, the oldest are folded into the cache, at
        least ``fold`` and at most P per window, until at most R remain."""
        seq = torch.cat([recent, events], 1)
        seq = _compact(seq)
        while True:
            n = (seq != 0).sum(1)
            over = n > self.R
            if not over.any():
                break
            f = torch.where(over, (n - self.R).clamp(min=self.fold, max=self.P), 0)  # (B,)
            width = int(f.max())
            j = torch.arange(width, device=seq.device)[None]
            folded = torch.where(j < f[:, None], seq[:, :width], 0)
            cache = self._compress_window(cache, folded)
            seq = _compact(torch.where(torch.arange(seq.shape[1], device=seq.device)[None] < f[:, None], 0, seq))
        width = max(1, int((seq != 0).sum(1).max()))
        return cache, seq[:, :width]

    # -- streaming: one event per request, the recent part's keys/values cached too --------
    def stream_state(self, cache, recent):
        """A serving state for users whose recent parts (B, r) all hold r ≥ 0 events (no
        padding): the token cache, the recent items, and their keys/values per layer, so
        each ``stream_step`` encodes one event instead of the whole recent part."""
        if recent.shape[1] and (recent == 0).any():
            raise ValueError("stream_state takes recent parts of equal length, without padding")
        if recent.shape[1] > self.R:
            raise ValueError(f"recent part of {recent.shape[1]} events exceeds R={self.R}: use append first")
        rk, rv = self._recent_kv(cache, recent)
        return {"k": cache["k"], "v": cache["v"], "folded": cache["folded"], "recent": recent, "rk": rk, "rv": rv}

    def _recent_kv(self, cache, recent):
        """The recent events' keys and values per layer (none for an empty recent part)."""
        if recent.shape[1] == 0:
            k, v = cache["k"], cache["v"]
            return k.new_zeros(*k.shape[:3], 0, k.shape[4]), v.new_zeros(*v.shape[:3], 0, v.shape[4])
        return self._recent_window(cache, recent)[1:]

    def stream_step(self, state, item):
        """One new event per row (B,) -> (new state, hidden (B, D)) scoring the next item.
        Past R recent events, the oldest ``fold`` are folded into the token cache and the
        recent keys/values recomputed once (amortized over ``fold`` events). Equals
        ``append`` then ``recommend_hidden`` (tests/test_persrec.py)."""
        recent, cache = state["recent"], {"k": state["k"], "v": state["v"], "folded": state["folded"]}
        rk, rv = state["rk"], state["rv"]
        if recent.shape[1] + 1 > self.R:
            f = min(max(recent.shape[1] + 1 - self.R, self.fold), recent.shape[1])
            cache = self._compress_window(cache, recent[:, :f])
            recent = recent[:, f:]
            rk, rv = self._recent_kv(cache, recent)
        B, r = recent.shape
        dev = item.device
        meta = self._meta([(RECENT, 1, 1)], dev)
        meta = (meta[0], meta[1], meta[2] + r)  # its position in the recent part
        prefix = {"k": torch.cat([cache["k"], rk], 3), "v": torch.cat([cache["v"], rv], 3),
                  "meta": self._meta([(TOKEN, 0, self.K), (RECENT, 1, r)], dev)}
        kmeta = tuple(torch.cat([p, m]) for p, m in zip(prefix["meta"], meta))
        allowed = _allowed(meta, kmeta, torch.ones(B, self.K + r + 1, dtype=torch.bool, device=dev),
                           torch.zeros(B, dtype=torch.long, device=dev))
        h, k, v = self._window(item[:, None], meta, allowed, prefix)
        new = {"k": cache["k"], "v": cache["v"], "folded": cache["folded"], "recent": torch.cat([recent, item[:, None]], 1),
               "rk": torch.cat([rk, k], 3), "rv": torch.cat([rv, v], 3)}
        return new, h[:, 0]

    # -- the model contract: evaluate and predict score through compress then recommend --
    def predict_hidden(self, items, lengths, times=None, target_time=None):
        segments, recent, _ = self._split(items)
        return self.recommend_hidden(self.compress(torch.cat(segments, 1)), recent)

    @property
    def max_input_len(self) -> int:
        return self.max_len


def _compact(seq):
    """Right-align nothing, left-pack every row's real events (non-zero) in order: (B, L)."""
    order = torch.sort((seq == 0).long(), dim=1, stable=True).indices
    return seq.gather(1, order)


def cache_bytes(cache: dict) -> int:
    """Bytes of a cache bundle per the tensors it holds (all users in it)."""
    return sum(t.numel() * t.element_size() for t in cache.values())


def save_cache(cache: dict, path) -> None:
    """Write a cache with safetensors (no pickle)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in cache.items()}, str(path))


def load_cache(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


class SASRecPerSRec(PerSRec):
    Config = SASRecPerSRecConfig
    backbone_cls = SASRec
    layers_cls = _SASRecLayers


class HSTUPerSRec(PerSRec):
    Config = HSTUPerSRecConfig
    backbone_cls = HSTU
    layers_cls = _HSTULayers


class LlamaPerSRec(PerSRec):
    Config = LlamaPerSRecConfig
    backbone_cls = LlamaRec
    layers_cls = _LlamaLayers
