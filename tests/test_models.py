import pytest
import torch

from perseq.models import MODELS, build_model

CAUSAL = [n for n, c in MODELS.items() if c.objective == "causal"]


def _model(name, **kw):
    torch.manual_seed(0)
    m = build_model(name, n_items=50, max_len=16, d=16, dropout=0.0, **kw)
    return m.eval()


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_models_do_not_see_the_future(name):
    m = _model(name)
    x = torch.randint(1, 51, (3, 12))
    h = m.encode(x)
    for t in range(11):
        y = x.clone()
        y[:, t + 1 :] = torch.randint(1, 51, y[:, t + 1 :].shape)
        h2 = m.encode(y)
        assert torch.allclose(h[:, : t + 1], h2[:, : t + 1], atol=1e-5), f"position <= {t} changed"
        assert not torch.allclose(h[:, t + 1 :], h2[:, t + 1 :], atol=1e-5)


@pytest.mark.parametrize("name", CAUSAL)
def test_right_padding_does_not_change_real_positions(name):
    m = _model(name)
    x = torch.randint(1, 51, (2, 7))
    padded = torch.cat([x, torch.zeros(2, 5, dtype=torch.long)], 1)
    assert torch.allclose(m.encode(x), m.encode(padded)[:, :7], atol=1e-5)


def test_bert4rec_is_bidirectional_and_ignores_padding():
    m = _model("bert4rec")
    x = torch.randint(1, 51, (2, 8))
    y = x.clone()
    y[:, -1] = (x[:, -1] % 50) + 1
    assert not torch.allclose(m.encode(x)[:, 0], m.encode(y)[:, 0])
    padded = torch.cat([x, torch.zeros(2, 4, dtype=torch.long)], 1)
    assert torch.allclose(m.encode(x), m.encode(padded)[:, :8], atol=1e-5)


def test_bert4rec_scores_from_appended_mask():
    m = _model("bert4rec")
    x = torch.tensor([[3, 4, 5, 0], [7, 8, 0, 0]])
    lengths = torch.tensor([3, 2])
    h = m.predict_hidden(x, lengths)
    direct = m.encode(torch.tensor([[3, 4, 5, m.mask_id]]))[0, 3]
    assert torch.allclose(h[0], direct, atol=1e-5)


def test_cloze_mask_masks_only_real_tokens_and_at_least_one():
    m = _model("bert4rec", mask_prob=0.0)
    x = torch.tensor([[3, 4, 5, 0], [7, 8, 0, 0]])
    inp, tgt = m.cloze_mask(x)
    assert tgt.tolist() == [[0, 0, 5, 0], [0, 8, 0, 0]]
    assert inp.tolist() == [[3, 4, m.mask_id, 0], [7, m.mask_id, 0, 0]]


@pytest.mark.parametrize("p", [0.2, 0.6])
def test_cloze_mask_masks_the_configured_share_of_real_tokens(p):
    # the mask proportion is per dataset in the BERT4Rec paper (0.2 ML-1M, 0.6 Beauty):
    # check the rate actually applied, and that padding and unmasked slots carry no target
    m = _model("bert4rec", mask_prob=p)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 51, (400, 50), generator=g)
    x[:, 40:] = 0  # padding
    inp, tgt = m.cloze_mask(x, generator=g)
    masked = inp == m.mask_id
    assert not masked[:, 40:].any() and (tgt[:, 40:] == 0).all()
    assert torch.equal(tgt[masked], x[masked]) and (tgt[~masked] == 0).all()
    share = masked[:, :40].float().mean().item()  # 16,000 draws: sd = sqrt(p(1-p)/16000) < 0.004
    assert abs(share - p) < 0.015, share


def test_cloze_mask_last_only_rows():
    # last_only_prob: that share of rows masks exactly its last real item and nothing else
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 51, (400, 30), generator=g)
    lengths = torch.randint(2, 31, (400,), generator=g)
    x[torch.arange(30)[None, :] >= lengths[:, None]] = 0
    last_only = torch.zeros_like(x, dtype=torch.bool)
    last_only[torch.arange(400), lengths - 1] = True
    m = _model("bert4rec", mask_prob=0.5, last_only_prob=1.0)
    inp, tgt = m.cloze_mask(x, generator=g)
    assert torch.equal(inp == m.mask_id, last_only) and torch.equal(tgt[last_only], x[last_only])
    m = _model("bert4rec", mask_prob=0.5, last_only_prob=0.25)
    inp, _ = m.cloze_mask(x, generator=g)
    only = ((inp == m.mask_id) == last_only).all(1)  # rows whose mask is exactly the last item
    # 400 rows: the share is 0.25 plus the few rows whose random mask happened to be last-only
    assert 0.18 < only.float().mean().item() < 0.36
    assert not (inp[x == 0] == m.mask_id).any()


@pytest.mark.parametrize("name", list(MODELS))
def test_scores_never_recommend_padding(name):
    m = _model(name)
    s = m.scores(torch.randint(1, 51, (2, 5)), torch.tensor([5, 3]))
    assert s.shape == (2, 51) and torch.isinf(s[:, 0]).all()


def test_unknown_model_and_parameter_errors_list_valid_names():
    with pytest.raises(ValueError, match="sasrec"):
        build_model("nope", n_items=5)
    with pytest.raises(ValueError, match="n_blocks"):
        build_model("sasrec", n_items=5, n_block=2)


def test_sasrec_rejects_too_long_input():
    m = _model("sasrec")
    with pytest.raises(ValueError, match="max_len"):
        m.encode(torch.ones(1, 17, dtype=torch.long))


@pytest.mark.parametrize("name", [n for n, c in MODELS.items() if c.incremental])
def test_step_over_a_sequence_equals_encode(name):
    m = _model(name)
    x = torch.randint(1, 51, (3, 10))
    full = m.encode(x)
    state = m.init_state(3)
    for t in range(10):
        state, h = m.step(state, x[:, t])
        assert torch.allclose(h, full[:, t], atol=1e-5), t


def test_sasrec_cosine_scoring_option():
    m = _model("sasrec", normalize_output=True)
    x = torch.randint(1, 51, (2, 6))
    h = m.encode(x)
    assert torch.allclose(h.norm(dim=-1), torch.ones(2, 6), atol=1e-5)
    assert torch.allclose(m.output_embeddings()[1:].norm(dim=-1), torch.ones(50), atol=1e-5)
    state = m.init_state(2)
    for t in range(6):
        state, ht = m.step(state, x[:, t])
        assert torch.allclose(ht, h[:, t], atol=1e-5)


@pytest.mark.parametrize("name", ["sasrec", "hstu", "llama"])
def test_prefill_equals_stepping(name):
    m = _model(name).eval()
    x = torch.randint(1, 51, (2, 9))
    state, h = m.prefill(x[:, :6])
    s2 = m.init_state(2)
    for t in range(6):
        s2, h2 = m.step(s2, x[:, t])
    assert torch.allclose(h, h2, atol=1e-5)
    if name == "sasrec":
        assert state["pos"] == s2["pos"] == 6
    else:
        assert state["k"].shape == s2["k"].shape and torch.allclose(state["k"], s2["k"], atol=1e-5)
    for t in range(6, 9):  # and stepping on from either state gives the same outputs
        state, a = m.step(state, x[:, t])
        s2, b = m.step(s2, x[:, t])
        assert torch.allclose(a, b, atol=1e-5)
