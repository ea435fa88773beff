import math

import numpy as np
import pytest
import torch

from perseq.models.hstu import HSTU, HSTU_LARGE, HSTUConfig, HSTULarge, time_buckets
from perseq.models.llama import LlamaRec, LlamaRecConfig, RMSNorm, Rotary, swiglu_hidden

N_ITEMS, L = 40, 12


def _hstu(**kw):
    torch.manual_seed(0)
    kw = {"max_len": 16, "d": 16, "dropout": 0.0, **kw}
    return HSTU(HSTUConfig(n_items=N_ITEMS, **kw)).eval()


def _llama(**kw):
    torch.manual_seed(0)
    kw = {"max_len": 16, "d": 16, "n_heads": 2, "dropout": 0.0, **kw}
    return LlamaRec(LlamaRecConfig(n_items=N_ITEMS, **kw)).eval()


def _times(B, T, seed=1):
    # increasing timestamps with gaps from seconds to weeks, so many buckets are used
    g = torch.Generator().manual_seed(seed)
    gaps = (10 ** (torch.rand(B, T, generator=g) * 6.5)).long()
    return 1_000_000_000 + gaps.cumsum(1)


def _items(B=3, T=L, seed=0):
    return torch.randint(1, N_ITEMS + 1, (B, T), generator=torch.Generator().manual_seed(seed))


MODELS = {
    "hstu": lambda: _hstu(),
    "hstu-2heads": lambda: _hstu(n_heads=2, attn_dim=6, linear_dim=10),
    "hstu-raw": lambda: _hstu(normalize_output=False),
    "llama": lambda: _llama(),
}


# -- both models -------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("with_times", [False, True])
def test_future_items_do_not_change_the_past(name, with_times):
    m = MODELS[name]()
    x, ts = _items(), (_times(3, L) if with_times else None)
    h = m.encode(x, ts)
    for t in (0, 5, L - 2):
        y = x.clone()
        y[:, t + 1 :] = (x[:, t + 1 :] % N_ITEMS) + 1  # every later item differs
        ts2 = None
        if with_times:
            ts2 = ts.clone()
            ts2[:, t + 1 :] += 12345
        h2 = m.encode(y, ts2)
        assert torch.allclose(h[:, : t + 1], h2[:, : t + 1], atol=1e-6)
        assert (h[:, t + 1 :] - h2[:, t + 1 :]).abs().amax() > 1e-4  # and the future does change


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("with_times", [False, True])
def test_step_loop_equals_encode_at_every_position(name, with_times):
    m = MODELS[name]()
    x = _items()
    ts = _times(3, L) if with_times else None
    ref = m.encode(x, ts)
    state = m.init_state(3)
    with torch.no_grad():
        for t in range(L):
            state, h = m.step(state, x[:, t], None if ts is None else ts[:, t])
            assert torch.allclose(h, ref[:, t], atol=1e-5), f"position {t}: {(h - ref[:, t]).abs().max()}"
    assert state["k"].shape[3] == L
    with pytest.raises(ValueError, match="max_len"):
        for _ in range(16 - L + 1):
            state, _ = m.step(state, x[:, 0], None if ts is None else ts[:, -1])


@pytest.mark.parametrize("name", list(MODELS))
def test_right_padding_does_not_change_real_positions_and_pad_rows_are_finite(name):
    m = MODELS[name]()
    x, ts = _items(2, 7), _times(2, 7)
    pad = torch.cat([x, torch.zeros(2, 5, dtype=torch.long)], 1)
    pad_ts = torch.cat([ts, torch.zeros(2, 5, dtype=torch.long)], 1)
    for a, b in [(m.encode(x), m.encode(pad)), (m.encode(x, ts), m.encode(pad, pad_ts))]:
        assert torch.allclose(a, b[:, :7], atol=1e-6)
        assert torch.isfinite(b).all()
    # a row that is all padding is finite too
    assert torch.isfinite(m.encode(torch.zeros(1, 6, dtype=torch.long))).all()


@pytest.mark.parametrize("cls", [HSTU, LlamaRec])
def test_too_long_input_is_rejected(cls):
    m = cls(cls.Config(n_items=N_ITEMS, max_len=8, d=16, n_heads=2))
    with pytest.raises(ValueError, match="max_len"):
        m.encode(torch.ones(1, 9, dtype=torch.long))


# -- HSTU --------------------------------------------------------------------------------
def test_time_buckets_on_hand_computed_gaps():
    # floor(ln(max(1, |gap|)) / 0.301), the reference's natural-log bucketization:
    # ln 10 / .301 = 7.65, ln 1000 / .301 = 22.95, ln 86400 / .301 = 37.8, ln 2 / .301 = 2.30
    # (the brief's "10 -> 3, 1000 -> 9" would be log2; the reference code uses ln / 0.301)
    gaps = torch.tensor([0, 1, 2, 10, 1000, 86400, -10, -1000, 10**15])
    assert time_buckets(gaps).tolist() == [0, 0, 2, 7, 22, 37, 7, 22, 114]
    assert time_buckets(torch.tensor([10**15]), num_buckets=64).item() == 64  # clipped
    assert time_buckets(torch.tensor([10**18])).item() == 128  # ln(1e18) / .301 = 137.7


def test_time_bias_is_off_without_times_or_when_disabled():
    x = _items()
    ts, ts2 = _times(3, L, seed=1), _times(3, L, seed=2)
    m = _hstu()
    # on: the timestamps matter ...
    assert (m.encode(x, ts) - m.encode(x, ts2)).abs().amax() > 1e-4
    # ... and times=None is the position-only model
    m_off = _hstu(time_bias=False)
    m_off.load_state_dict({k: v for k, v in m.state_dict().items() if "ts_w" not in k})
    assert torch.allclose(m.encode(x), m_off.encode(x), atol=1e-7)
    # off: outputs independent of the timestamps
    assert torch.allclose(m_off.encode(x, ts), m_off.encode(x, ts2), atol=1e-7)
    assert torch.allclose(m_off.encode(x, ts), m_off.encode(x), atol=1e-7)
    assert not any("ts_w" in k for k in m_off.state_dict())


def test_time_bias_uses_gap_buckets_of_the_events_own_timestamps():
    # shifting all timestamps or changing gaps within a bucket leaves outputs unchanged
    m = _hstu()
    x, ts = _items(), _times(3, L)
    h = m.encode(x, ts)
    assert torch.allclose(h, m.encode(x, ts + 7_777_777), atol=1e-7)
    same = torch.tensor([[0, 10, 20]]), torch.tensor([[0, 11, 20]])  # gaps 10/20/10 vs 11/20/9: buckets 7/9/7
    assert time_buckets(same[0][:, :, None] - same[0][:, None]).equal(time_buckets(same[1][:, :, None] - same[1][:, None]))
    assert torch.allclose(m.encode(x[:1, :3], same[0]), m.encode(x[:1, :3], same[1]), atol=1e-7)


def test_hstu_outputs_and_item_rows_are_l2_normalized():
    m = _hstu()
    h = m.encode(_items(), _times(3, L))
    assert torch.allclose(h.norm(dim=-1), torch.ones(3, L), atol=1e-5)
    e = m.output_embeddings()
    assert e.shape == (N_ITEMS + 1, 16)
    assert torch.allclose(e[1:].norm(dim=-1), torch.ones(N_ITEMS), atol=1e-5)
    assert e[0].abs().sum() == 0  # the padding row stays the zero row
    s = m.scores(_items(2, 5), torch.tensor([5, 3]))
    assert torch.isinf(s[:, 0]).all() and s[:, 1:].abs().max() <= 1 + 1e-5  # cosines
    raw = _hstu(normalize_output=False)
    assert raw.output_embeddings().equal(raw.item_emb.weight)
    assert not torch.allclose(raw.encode(_items()).norm(dim=-1), torch.ones(3, L), atol=1e-3)


def test_hstu_block_matches_the_formula():
    # one block, one head, by hand: U,V,Q,K = split(SiLU(W LN(X))); A = SiLU(QKᵀ + rab)/n ⊙ causal
    torch.manual_seed(0)
    m = _hstu(n_blocks=1, normalize_output=False)
    blk = m.blocks[0]
    x, ts = _items(1, 5), _times(1, 5)
    X = m.item_emb(x)[0] * 16**0.5 + m.pos_emb.weight[:5]  # (T, D): scaled items + absolute positions
    ln = lambda z: (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-6)  # noqa: E731
    U, V, Q, K = torch.nn.functional.silu(ln(X) @ blk.uvqk.weight.T).split(16, -1)
    T = 5
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    gaps = ts[0][:, None] - ts[0][None, :]
    rab = blk.pos_w[(i - j).clamp(min=0)] + blk.ts_w[(torch.log(gaps.abs().clamp(min=1).float()) / 0.301).long()]
    A = torch.nn.functional.silu(Q @ K.T + rab) / 16 * (i >= j)  # n = max_len = 16
    Y = (U * ln(A @ V)) @ blk.o.weight.T + blk.o.bias + X
    assert torch.allclose(m.encode(x, ts)[0], Y, atol=1e-5)


@pytest.mark.parametrize("P", [9, 12])  # position table as long as the sequence (training pads to max_len) or longer
@pytest.mark.parametrize("timed", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_pointwise_attention_equals_the_torch_line(timed, threads, P):
    """The numba kernels (float32 CPU) give the values and the gradients (scores, position
    and time bias tables) of SiLU(S + pos_w[i - j] (+ ts_w[bucket])) / n ⊙ causal computed by
    torch in float64, with scores large enough that exp overflows (|z| up to 120), for one
    thread and for rows split between two. A position table longer than T (sequences shorter
    than max_len) leaves its tail without gradient."""
    from perseq.ops.hstu_numba import CausalSiluAttention

    g = torch.Generator().manual_seed(0)
    B, H, T, NB, n = 5, 2, 9, 6, 16
    s = (torch.randn(B, H, T, T, generator=g) * 3)
    s[0, 0, 4, :3] = torch.tensor([120.0, -120.0, 90.0])
    s.requires_grad_()
    pos_w = torch.randn(P, generator=g).requires_grad_()
    ts_w = torch.randn(NB + 1, generator=g).requires_grad_() if timed else None
    buckets = torch.randint(0, NB + 1, (B, T, T), generator=g) if timed else None
    up = torch.randn(B, H, T, T, generator=g)  # an upstream gradient
    causal = torch.tril(torch.ones(T, T, dtype=torch.float64))
    inputs = [s, pos_w] + ([ts_w] if timed else [])
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)  # the kernels take torch's thread count
    try:
        a = CausalSiluAttention.apply(s, pos_w, ts_w, None if buckets is None else buckets.to(torch.int32), n)
        grads = torch.autograd.grad(a, inputs, up)
    finally:
        torch.set_num_threads(prev)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    rel = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).clamp(min=0)
    bias = ref_inputs[1][rel]  # (T, T)
    if timed:
        bias = (bias + ref_inputs[2][buckets])[:, None]  # (B, 1, T, T)
    ref = torch.nn.functional.silu(ref_inputs[0] + bias) / n * causal
    ref_grads = torch.autograd.grad(ref, ref_inputs, up.double())
    assert (a.detach()[..., ~causal.bool()] == 0).all() and (grads[0][..., ~causal.bool()] == 0).all()
    torch.testing.assert_close(a.double(), ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert (grads[1][T:] == 0).all() and grads[1][:T].abs().min() > 0
    z = 120 + pos_w[4].item() + (ts_w[buckets[0, 4, 0]].item() if timed else 0.0)
    assert a[0, 0, 4, 0].item() == pytest.approx(z / n, rel=1e-5)  # silu(z) = z
    assert math.isfinite(grads[0][0, 0, 4, 1].item()) and abs(a[0, 0, 4, 1].item()) < 1e-30  # silu(-120) ≈ 0, not NaN


@pytest.mark.parametrize("timed", [False, True])
def test_torch_line_bias_tables_equal_plain_indexing(timed):
    """The torch line builds rab_pos from windows of one padded vector (causal_toeplitz) and
    looks the time buckets up through F.embedding, for their CUDA backward; values and
    gradients equal plain indexing pos_w[(i - j).clamp(0)] + ts_w[buckets], table longer than T."""
    from perseq.models.hstu import causal_silu_attention, causal_toeplitz

    g = torch.Generator().manual_seed(1)
    B, H, T, P, NB, n = 3, 2, 7, 11, 5, 16
    s = torch.randn(B, H, T, T, generator=g, dtype=torch.float64, requires_grad=True)  # float64: no numba kernel
    pos_w = torch.randn(P, generator=g, dtype=torch.float64, requires_grad=True)
    ts_w = torch.randn(NB + 1, generator=g, dtype=torch.float64, requires_grad=True) if timed else None
    buckets = torch.randint(0, NB + 1, (B, T, T), generator=g) if timed else None
    up = torch.randn(B, H, T, T, generator=g, dtype=torch.float64)
    inputs = [s, pos_w] + ([ts_w] if timed else [])
    a = causal_silu_attention(s, pos_w, ts_w, buckets, n)
    grads = torch.autograd.grad(a, inputs, up)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    bias = pos_w[(i - j).clamp(min=0)]
    if timed:
        bias = (bias + ts_w[buckets])[:, None]
    ref = torch.nn.functional.silu(s + bias) / n * (i >= j)
    torch.testing.assert_close(a, ref, rtol=0, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(ref, inputs, up)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    w = torch.arange(1.0, 5.0)
    assert causal_toeplitz(w, 3).tolist() == [[1, 0, 0], [2, 1, 0], [3, 2, 1]]


def test_fused_pointwise_attention_refuses_tables_it_would_index_outside():
    from perseq.ops.hstu_numba import CausalSiluAttention

    s = torch.zeros(1, 1, 6, 6)
    with pytest.raises(ValueError, match="position bias table has 4 entries, sequence length is 6"):
        CausalSiluAttention.apply(s, torch.zeros(4), None, None, 6)
    buckets = torch.zeros(1, 6, 6, dtype=torch.int32)
    with pytest.raises(ValueError, match="without the time bias table"):
        CausalSiluAttention.apply(s, torch.zeros(6), None, buckets, 6)
    buckets[0, 3, 1] = 5
    with pytest.raises(ValueError, match=r"span \[0, 5\], the time bias table has 5 entries"):
        CausalSiluAttention.apply(s, torch.zeros(6), torch.zeros(5), buckets, 6)
    buckets[0, 3, 1] = -1
    with pytest.raises(ValueError, match=r"span \[-1, 0\]"):
        CausalSiluAttention.apply(s, torch.zeros(6), torch.zeros(5), buckets, 6)


@pytest.mark.parametrize("with_times", [False, True])
def test_hstu_encode_and_gradients_equal_with_and_without_the_fused_kernels(monkeypatch, with_times):
    """The whole model, training mode off: encode and every parameter's gradient agree
    between the fused CPU kernels and the reference torch line (the path on GPU)."""
    import perseq.models.hstu as hstu_mod

    assert hstu_mod._hstu_numba is not None  # numba is a dependency: the fast path is on
    m = _hstu(n_heads=2, n_blocks=2)
    x, ts = _items(4, L), (_times(4, L) if with_times else None)

    def run():
        m.zero_grad()
        h = m.encode(x, ts)
        (h * torch.linspace(-1, 1, h.shape[-1])).sum().backward()
        return h.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}

    h_fast, g_fast = run()
    monkeypatch.setattr(hstu_mod, "_hstu_numba", None)
    h_ref, g_ref = run()
    torch.testing.assert_close(h_fast, h_ref, rtol=1e-5, atol=1e-6)
    assert g_fast.keys() == g_ref.keys() and "blocks.0.pos_w" in g_ref
    assert ("blocks.1.ts_w" in g_ref) == with_times
    for k in g_ref:
        torch.testing.assert_close(g_fast[k], g_ref[k], rtol=1e-4, atol=1e-6, msg=k)


def test_hstu_large_preset():
    assert HSTU_LARGE == {"n_blocks": 8, "n_heads": 2}
    cfg = HSTULarge.Config(n_items=10)
    assert (cfg.n_blocks, cfg.n_heads, cfg.d, cfg.max_len) == (8, 2, 50, 200)
    m = HSTULarge(HSTULarge.Config(n_items=10, max_len=8, d=8))
    assert isinstance(m, HSTU) and len(m.blocks) == 8 and m.blocks[0].n_heads == 2
    assert HSTU.Config(n_items=10).n_blocks == 2 and HSTU.Config(n_items=10).n_heads == 1


@pytest.mark.parametrize("pos_init, std", [("trunc_normal", 50**-0.5), ("xavier_normal", (2 / (200 + 50)) ** 0.5)])
def test_position_table_init_scale(pos_init, std):
    # the whole (200, 50) table: 10,000 draws, the sample std's relative standard error is
    # 0.7%, so 3% is ~4 of them (truncation at two std shrinks the std to 0.8796 of nominal)
    torch.manual_seed(0)
    w = HSTU(HSTUConfig(n_items=N_ITEMS, pos_init=pos_init)).pos_emb.weight
    expected = std * (0.8796 if pos_init == "trunc_normal" else 1.0)
    assert abs(w.std().item() / expected - 1) < 0.03
    if pos_init == "trunc_normal":
        assert w.abs().max().item() <= 2 * std
    with pytest.raises(ValueError, match="pos_init"):
        HSTUConfig(n_items=N_ITEMS, pos_init="uniform")


def test_item_table_init_truncated_as_the_reference():
    # 3000 x 50 draws: the sample std's relative standard error is 0.4%, 2% is ~5 of them
    torch.manual_seed(0)
    w = HSTU(HSTUConfig(n_items=3000, item_init="trunc_normal")).item_emb.weight
    assert (w[0] == 0).all()  # padding row stays zero
    assert w[1:].abs().max().item() <= 0.04
    assert abs(w[1:].std().item() / (0.02 * 0.8796) - 1) < 0.02
    plain = HSTU(HSTUConfig(n_items=3000)).item_emb.weight[1:]
    assert plain.abs().max().item() > 0.06 and abs(plain.std().item() / 0.02 - 1) < 0.02
    with pytest.raises(ValueError, match="item_init"):
        HSTUConfig(n_items=N_ITEMS, item_init="xavier")


# -- LLaMA -------------------------------------------------------------------------------
def test_rope_dot_product_depends_only_on_relative_position():
    torch.manual_seed(0)
    rope = Rotary(8, 64, 10000.0)
    q, k = torch.randn(8), torch.randn(8)
    rot = lambda x, p: rope(x[None], torch.tensor([p]))[0]  # noqa: E731
    for i, j, s in [(5, 2, 10), (3, 3, 40), (0, 7, 20), (9, 1, 50)]:
        assert torch.allclose(rot(q, i) @ rot(k, j), rot(q, i + s) @ rot(k, j + s), atol=1e-5)
    assert not torch.allclose(rot(q, 5) @ rot(k, 2), rot(q, 6) @ rot(k, 2), atol=1e-3)
    # a rotation: norms are kept, position 0 is the identity
    assert torch.allclose(rot(q, 17).norm(), q.norm(), atol=1e-5) and torch.allclose(rot(q, 0), q)
    # frequency of pair 0 is 1 rad / position: (q0, q4) rotates by angle p
    e = torch.zeros(8)
    e[0] = 1.0
    assert torch.allclose(rot(e, 2)[[0, 4]], torch.tensor([math.cos(2), math.sin(2)]), atol=1e-6)


def test_rmsnorm_against_hand_computation():
    n = RMSNorm(3, eps=1e-6)
    with torch.no_grad():
        n.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
    x = torch.tensor([[3.0, -4.0, 0.0]])  # mean square = 25/3
    r = math.sqrt(25 / 3 + 1e-6)
    assert torch.allclose(n(x), torch.tensor([[3 / r, -8 / r, 0.0]]), atol=1e-6)


def test_llama_shapes_and_tied_output():
    assert swiglu_hidden(64) == 176 and swiglu_hidden(16) == 48 and swiglu_hidden(50) == 136
    m = _llama()
    assert m.blocks[0].ffn.gate.out_features == 48
    assert m.output_embeddings().data_ptr() == m.item_emb.weight.data_ptr()  # tied
    assert not any("pos" in k for k in m.state_dict())  # no position table
    assert not any(k.startswith("rope") for k in m.state_dict())  # RoPE tables are derived
    h = m.encode(_items(), _times(3, L))
    assert torch.allclose(h, m.encode(_items()))  # times are ignored


# -- HSTU's time bias measured from the next event (time_query="next") --------------------
def _next_times(ts, request):
    """Each position's query time: the next event's timestamp, the request time at the end."""
    return torch.cat([ts[:, 1:], request[:, None]], 1)


def test_next_event_time_query_changes_only_the_queries_timing():
    m = _hstu(time_query="next")
    x, ts = _items(), _times(3, L)
    request = ts[:, -1] + 3600
    qt = _next_times(ts, request)
    h = m.encode(x, ts, qt)
    with pytest.raises(ValueError, match="query_times"):
        m.encode(x, ts)
    # the same weights timed by each event's own time give other outputs
    own = _hstu()
    own.load_state_dict(m.state_dict())
    assert (own.encode(x, ts) - h).abs().amax() > 1e-4
    # a later request time changes the last position only; earlier ones are timed by events
    h2 = m.encode(x, ts, _next_times(ts, request + 30 * 86400))
    torch.testing.assert_close(h2[:, :-1], h[:, :-1])
    assert (h2[:, -1] - h[:, -1]).abs().amax() > 1e-4
    # scoring: predict_hidden builds the query times from times + target_time (the request)
    lengths = torch.full((3,), L)
    torch.testing.assert_close(m.predict_hidden(x, lengths, ts, request), h[:, -1])
    with pytest.raises(ValueError, match="target_time"):
        m.predict_hidden(x, lengths, ts)
    # the "own" model ignores target_time
    torch.testing.assert_close(own.predict_hidden(x, lengths, ts, request), own.predict_hidden(x, lengths, ts, request + 99))
    with pytest.raises(ValueError, match="time_query"):
        HSTUConfig(n_items=5, time_query="later")


def test_next_event_time_query_step_equals_encode_and_future_stays_out():
    m = _hstu(time_query="next")
    x, ts = _items(), _times(3, L)
    qt = _next_times(ts, ts[:, -1] + 60)
    ref = m.encode(x, ts, qt)
    state = m.init_state(3)
    with torch.no_grad():
        for t in range(L):
            state, h = m.step(state, x[:, t], ts[:, t], qt[:, t])
            torch.testing.assert_close(h, ref[:, t], atol=1e-5, rtol=1e-5)
    # causality: items and times after position t+1 never reach positions <= t (position t
    # legitimately reads t_{t+1}, its target's time, and nothing else of the future)
    for t in (0, 5, L - 3):
        y, ts2 = x.clone(), ts.clone()
        y[:, t + 1 :] = (x[:, t + 1 :] % N_ITEMS) + 1
        ts2[:, t + 2 :] += 12345
        h2 = m.encode(y, ts2, _next_times(ts2, ts2[:, -1] + 60))
        torch.testing.assert_close(h2[:, : t + 1], ref[:, : t + 1], atol=1e-6, rtol=1e-6)


def _timed_data(items, times, lens):
    """SequenceData from flat per-user-contiguous items and times with these lengths."""
    from perseq.data.sequences import SequenceData

    return SequenceData(offsets=np.concatenate([[0], np.cumsum(lens)]), items=items, times=times,
                        user_ids=np.array([f"u{i}" for i in range(len(lens))]),
                        item_ids=np.array(["[PAD]"] + [str(i) for i in range(1, N_ITEMS + 1)]), name="t")


def test_training_batches_carry_target_times_and_train_step_passes_them():
    from perseq.config import from_dict
    from perseq.data.batching import TrainWindows
    from perseq.data.sequences import leave_one_out
    from perseq.losses import get_loss
    from perseq.train import train_step

    lens = np.array([6, 9, 4])
    rng = np.random.default_rng(0)
    items = rng.integers(1, N_ITEMS + 1, lens.sum()).astype(np.int32)
    times = np.concatenate([1_000_000 + np.cumsum(rng.integers(1, 10**5, n)) for n in lens]).astype(np.int64)
    data = _timed_data(items, times, lens)
    w = TrainWindows(leave_one_out(data), 16)
    b = w.make_batch(np.arange(len(w)))
    real = b.targets > 0
    # target_times[b, i] is the timestamp of targets[b, i], i.e. of the input one step later
    both = real[:, :-1] & (b.inputs[:, 1:] > 0)
    assert both.sum() > 5
    torch.testing.assert_close(b.target_times[:, :-1][both], b.times[:, 1:][both])
    m = _hstu(time_query="next").train()
    seen = []
    encode = m.encode

    def spy(items, t=None, q=None):
        seen.append(q)
        return encode(items, t, q)

    m.encode = spy
    loss_fn = get_loss(from_dict({"loss": {"name": "ce"}}).loss)
    train_step(m, b, loss_fn, torch.optim.SGD(m.parameters(), lr=0.0))
    assert len(seen) == 1 and seen[0] is b.target_times


def test_predict_scores_time_query_models_at_the_held_out_events_time():
    from perseq.data.sequences import leave_one_out
    from perseq.predict import topk_for_positions

    lens = np.array([5, 7])
    items = np.arange(1, 13, dtype=np.int32)
    times = np.concatenate([1_000_000 + np.cumsum(np.full(n, 5000)) for n in lens]).astype(np.int64)
    data = _timed_data(items, times, lens)
    offsets = data.offsets
    split = leave_one_out(data)
    m = _hstu(time_query="next")
    users = np.arange(2)
    for positions, request in ((split.test_pos, times[offsets[:-1] + split.test_pos]),  # held-out event's time
                               (lens, times[offsets[1:] - 1])):  # beyond the history: right after the last event
        (_, top, val), = topk_for_positions(m, data, users, positions.astype(np.int64), k=3, exclude_seen=False)
        x = torch.zeros(2, int(positions.max()), dtype=torch.long)
        ts = torch.zeros_like(x)
        for b in range(2):
            x[b, : positions[b]] = torch.from_numpy(items[offsets[b] : offsets[b] + positions[b]]).long()
            ts[b, : positions[b]] = torch.from_numpy(times[offsets[b] : offsets[b] + positions[b]])
        with torch.no_grad():
            want = m.scores(x, torch.from_numpy(positions.astype(np.int64)), ts, torch.from_numpy(request)).topk(3, dim=1)
        np.testing.assert_allclose(val, want.values.numpy(), rtol=1e-6)


@pytest.mark.parametrize("timed", [False, True])
@pytest.mark.parametrize("block", [1, 5, 8, 40])  # single rows, a ragged last block, one block covering T
def test_blocked_attention_equals_the_full_line_in_value_and_every_gradient(timed, block):
    """Long sequences run the attention in blocks of query rows and recompute each block's
    weights in the backward; against causal_silu_attention(q kᵀ) @ v with the (B, T, T)
    bucket table made at once: same outputs and gradients for q, k, v and both bias tables."""
    from perseq.models.hstu import blocked_silu_attention, causal_silu_attention, time_buckets

    g = torch.Generator().manual_seed(3)
    B, H, T, dqk, dv, P, NB, n = 2, 2, 23, 4, 3, 30, 12, 30
    q, k = (torch.randn(B, H, T, dqk, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(B, H, T, dv, generator=g, dtype=torch.float64, requires_grad=True)
    pos_w = torch.randn(P, generator=g, dtype=torch.float64, requires_grad=True)
    ts_w = torch.randn(NB + 1, generator=g, dtype=torch.float64, requires_grad=True)
    times = torch.cumsum(torch.randint(0, 5000, (B, T), generator=g), 1)
    qt = times + torch.randint(0, 100, (B, T), generator=g)  # query times differ from key times ("next")
    up = torch.randn(B, H, T, dv, generator=g, dtype=torch.float64)
    inputs = [q, k, v, pos_w] + ([ts_w] if timed else [])
    buckets = time_buckets(qt[:, :, None] - times[:, None, :], NB) if timed else None
    ref = causal_silu_attention(q @ k.transpose(-2, -1), pos_w, ts_w, buckets, n) @ v
    if timed:
        assert buckets.unique().numel() > 5  # the time bias really varies
    out = blocked_silu_attention(q, k, v, pos_w, ts_w, qt if timed else None, times if timed else None, n, NB, block)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for name, got, want in zip(["q", "k", "v", "pos_w", "ts_w"], torch.autograd.grad(out, inputs, up),
                               torch.autograd.grad(ref, inputs, up)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
    with pytest.raises(ValueError, match="position bias table has 30 entries, sequence length is 31"):
        blocked_silu_attention(*(torch.zeros(1, 1, 31, 2) for _ in range(3)), torch.zeros(30), None, None, None, n)
    with pytest.raises(ValueError, match="query times, key times and the table"):
        blocked_silu_attention(q, k, v, pos_w, None, qt, times, n)


@pytest.mark.parametrize("timed", [False, True])
def test_blocked_attention_runs_the_fused_kernels_per_block_on_float32_cpu(timed, monkeypatch):
    """float32 CPU blocks go through ops/hstu_numba's kernels with a row offset (their bias
    gradients accumulate over the blocks); against the float64 torch line of the whole
    matrix: float32-accurate values and gradients."""
    import perseq.ops.hstu_numba as hn
    from perseq.models.hstu import blocked_silu_attention, causal_silu_attention, time_buckets

    g = torch.Generator().manual_seed(4)
    B, H, T, dqk, dv, P, NB, n = 2, 2, 45, 8, 5, 50, 20, 50
    q, k = (torch.randn(B, H, T, dqk, generator=g) for _ in range(2))
    v = torch.randn(B, H, T, dv, generator=g)
    pos_w, ts_w = torch.randn(P, generator=g), torch.randn(NB + 1, generator=g)
    times = torch.cumsum(torch.randint(0, 5000, (B, T), generator=g), 1)
    up = torch.randn(B, H, T, dv, generator=g)
    f64 = [t.double().requires_grad_() for t in (q, k, v, pos_w, ts_w)]
    buckets = time_buckets(times[:, :, None] - times[:, None, :], NB) if timed else None
    ref = causal_silu_attention(f64[0] @ f64[1].transpose(-2, -1), f64[3], f64[4], buckets, n) @ f64[2]
    names = ["q", "k", "v", "pos_w"] + (["ts_w"] if timed else [])
    ref_g = torch.autograd.grad(ref, f64[: len(names)], up.double())
    calls = []
    real = hn.weights_backward
    monkeypatch.setattr(hn, "weights_backward", lambda *a, **kw: calls.append(a[-1]) or real(*a, **kw))
    f32 = [t.clone().requires_grad_() for t in (q, k, v, pos_w, ts_w)]
    out = blocked_silu_attention(*f32[:5], times if timed else None, times if timed else None, n, NB, block=16)
    grads = torch.autograd.grad(out, f32[: len(names)], up)
    assert calls == [0, 16, 32]  # the kernels ran, one call per block, at each block's first row
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    for name, got, want in zip(names, grads, ref_g):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item(), msg=name)


def test_blocked_attention_is_chosen_by_length_or_by_the_size_of_the_whole_score_tensor():
    """CPU: blocked from BLOCKED_FROM positions, or when B·H·T² would pass WHOLE_MAX_SCORES
    (a large batch at a moderate length); the GPU keeps the whole line at any size."""
    import perseq.models.hstu as hstu

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert hstu.WHOLE_MAX_SCORES == 4 * 2 * 2048**2  # HSTU-large, batch 4, 2048: still whole
    assert not hstu._blocked(4, 2, 2048, cpu) and hstu._blocked(4, 2, 2049, cpu)
    assert not hstu._blocked(128, 2, 200, cpu)  # ML-1M training batches: whole
    assert hstu._blocked(128, 2, 512, cpu)  # 67 M scores per block call: blocked
    assert hstu._blocked(1, 1, hstu.BLOCKED_FROM, cpu) and not hstu._blocked(1, 1, hstu.BLOCKED_FROM - 1, cpu)
    assert not hstu._blocked(128, 2, 8192, gpu)


def test_long_sequences_take_the_blocked_attention_with_the_same_output(monkeypatch):
    """At BLOCKED_FROM positions and beyond, HSTU.encode runs the blocked attention with
    per-block time buckets; the model's output equals the full line's (float32, fused kernel)."""
    import perseq.models.hstu as hstu

    torch.manual_seed(0)
    m = HSTU(HSTUConfig(n_items=50, max_len=64, d=16, n_blocks=2, n_heads=2)).eval()
    items = torch.randint(1, 51, (3, 40))
    times = torch.cumsum(torch.randint(1, 10_000, (3, 40)), 1)
    full, full_untimed = m.encode(items, times), m.encode(items)
    calls = []
    real = hstu.blocked_silu_attention
    monkeypatch.setattr(hstu, "blocked_silu_attention", lambda *a, **kw: calls.append(1) or real(*a, block=7))
    monkeypatch.setattr(hstu, "BLOCKED_FROM", 40)
    blocked = m.encode(items, times)
    assert len(calls) == 2  # both blocks
    torch.testing.assert_close(blocked, full, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(full, full_untimed)  # the time bias took part
    torch.testing.assert_close(m.encode(items), full_untimed, rtol=1e-5, atol=1e-6)
    assert len(calls) == 4
