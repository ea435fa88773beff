"""PCRec (models/pcrec.py): causal, per-user isolated, HSTU when switched off, and its
corrections are the gradient rules of the predictive-coding energy."""
import pytest
import torch

from perseq.models import build_model
from perseq.models.pcrec import ACTIVATIONS, PCModule, PCRecConfig, f_and_derivative

N, T = 30, 12


PC_MODELS = ["pcrec", "sasrec-pc"]  # the paper's backbone, and the module on a second one


def _pcrec(name="pcrec", **kw):
    torch.manual_seed(0)
    kw = {"max_len": T, "d": 16, "n_blocks": 2, "gamma_bias_init": 0.0, **kw}
    m = build_model(name, N, **kw)
    with torch.no_grad():  # a θ that mixes visibly (the default init is small)
        for pc in m.pc:
            pc.theta.normal_(0, 0.3)
    return m


def _items(B=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, N + 1, (B, T), generator=g)


@pytest.mark.parametrize("name", PC_MODELS)
@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("f", ["softplus", "identity"])
def test_pcrec_is_causal_in_training_mode_through_theta_and_the_fast_weights(name, alpha, f):
    m = _pcrec(name, alpha=alpha, f=f).train()
    items = _items()
    for t in (0, 5, T - 2):
        other = items.clone()
        other[:, t + 1] = (other[:, t + 1] % N) + 1  # another item at t + 1
        torch.manual_seed(7)
        a = m.encode(items)
        torch.manual_seed(7)  # the same dropout masks
        b = m.encode(other)
        assert torch.equal(a[:, : t + 1], b[:, : t + 1]), t
        assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


@pytest.mark.parametrize("name", PC_MODELS)
def test_the_fast_weights_change_outputs_and_are_never_stored(name):
    m = _pcrec(name, alpha=0.5).eval()
    items = _items()
    theta = [pc.theta.detach().clone() for pc in m.pc]
    with torch.no_grad():
        first, again = m.encode(items), m.encode(items)
        m_off = _pcrec(name, alpha=0.0).eval()
        m_off.load_state_dict(m.state_dict())
        without = m_off.encode(items)
    assert torch.equal(first, again)  # nothing drifts from one pass (or user) to the next
    assert all(torch.equal(a, pc.theta) for a, pc in zip(theta, m.pc))
    assert (first - without).abs().max() > 1e-3  # α ≠ 0 is not dead code


@pytest.mark.parametrize("name", PC_MODELS)
def test_a_users_scores_do_not_depend_on_the_batch(name):
    m = _pcrec(name, alpha=0.5).eval()
    items = _items(B=5)
    lengths = torch.tensor([T, 3, 7, 1, 10])
    for b in range(5):
        items[b, lengths[b]:] = 0
    with torch.no_grad():
        together = m.scores(items, lengths)
        alone = torch.cat([m.scores(items[b : b + 1], lengths[b : b + 1]) for b in range(5)])
        perm = torch.tensor([4, 2, 0, 3, 1])
        shuffled = m.scores(items[perm], lengths[perm])
    fin = torch.isfinite(together)
    assert (together[fin] - alone[fin]).abs().max() <= 1e-6
    assert (together[perm][fin[perm]] - shuffled[fin[perm]]).abs().max() <= 1e-6


@pytest.mark.parametrize("name", PC_MODELS)
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_scoring_corrects_only_the_last_rows_and_equals_the_full_encode(name, alpha):
    m = _pcrec(name, alpha=alpha).eval()
    items = _items(B=5)
    lengths = torch.tensor([T, 3, 7, 1, 10])
    for b in range(5):
        items[b, lengths[b]:] = 0
    with torch.no_grad():
        full = m.encode(items)[torch.arange(5), lengths - 1]  # every position corrected
        fast = m.predict_hidden(items, lengths)  # the last block's module on the scored rows only
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)  # float32 sums in another order
    assert m._score_rows is None  # nothing left behind for the next encode


@pytest.mark.parametrize("T_,chunk", [(12, 4), (13, 4), (7, 32), (50, 1)])
def test_the_chunked_fast_weight_product_is_the_triangle_form(T_, chunk):
    from perseq.models.pcrec import fast_weight_product

    g = torch.Generator().manual_seed(0)
    e, fa, f = (torch.randn(3, T_, 5, generator=g, dtype=torch.float64) for _ in range(3))
    want = torch.tril(e @ fa.transpose(1, 2)) @ f  # Δθ f(y) with the (T, T) matrix
    assert torch.allclose(fast_weight_product(e, fa, f, chunk), want, atol=1e-12)


@pytest.mark.parametrize("name,backbone", [("pcrec", "hstu"), ("sasrec-pc", "sasrec")])
def test_with_its_modules_off_it_is_the_backbone_with_the_same_weights(name, backbone):
    torch.manual_seed(0)
    base = build_model(backbone, N, max_len=T, d=16).eval()
    off = build_model(name, N, max_len=T, d=16, pc_blocks=0).eval()
    off.load_state_dict(base.state_dict())
    items = _items()
    with torch.no_grad():
        assert torch.equal(off.encode(items), base.encode(items))
    assert len(build_model("pcrec", N, max_len=T, d=16, n_blocks=3, pc_blocks=2).pc) == 2


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_f_prime_is_the_derivative_of_f(name):
    y = torch.linspace(-3, 3, 61, dtype=torch.float64, requires_grad=True)
    fy, dfy = f_and_derivative(y, name)
    (auto,) = torch.autograd.grad(fy.sum(), y)
    keep = y.detach().abs() > 1e-9  # relu's kink
    assert torch.allclose(dfy[keep], auto[keep])


@pytest.mark.parametrize("f", ["softplus", "tanh", "identity"])
def test_a_modules_correction_is_the_energy_gradient_step(f):
    """With a diagonal θ the causal restriction of Mᵀε is exact, so the correction must be
    Δ = −(γ/2)(∂E/∂y + ∂E/∂x) for E = ‖x − M f(y)‖², x's step reaching y through the residual."""
    torch.manual_seed(0)
    cfg = PCRecConfig(n_items=N, max_len=T, d=8, alpha=0.0, gamma=0.3, f=f)
    pc = PCModule(cfg).double()
    with torch.no_grad():
        pc.theta.copy_(torch.diag(torch.rand(T, dtype=torch.float64) + 0.5))
    x = torch.randn(2, T, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, T, 8, dtype=torch.float64, requires_grad=True)
    fy, _ = f_and_derivative(y, f)
    E = ((x - torch.einsum("ts,bsd->btd", torch.tril(pc.theta), fy)) ** 2).sum()
    gx, gy = torch.autograd.grad(E, (x, y))
    with torch.no_grad():
        got = pc(x, y) - y
    assert torch.allclose(got, -0.15 * (gx + gy), atol=1e-12)


def test_pcrec_trains_and_its_presets_have_the_hstu_sizes(tmp_path):
    from perseq.config import from_dict
    from perseq.data.sequences import leave_one_out
    from perseq.data.synthetic import make_synthetic
    from perseq.train import fit

    data, _ = make_synthetic(n_users=150, n_items=40, n_clusters=4, mean_len=14, max_len=40, seed=2)
    cfg = from_dict({"model": {"name": "pcrec", "d": 16}, "data": {"max_len": 20},
                     "train": {"epochs": 3, "batch_size": 32, "lr": 3e-3, "threads": 1}, "eval": {"exclude_seen": False}})
    r = fit(cfg, leave_one_out(data), progress=False, log=lambda s: None)
    losses = [h["loss"] for h in r["history"]]
    assert losses[-1] < losses[0] and 0 < r["test"]["ndcg@10"] <= 1
    big = build_model("pcrec-large", N, max_len=T)
    assert (big.cfg.n_blocks, big.cfg.n_heads, len(big.pc)) == (8, 2, 8)
    small = build_model("pcrec", N, max_len=T)
    assert (small.cfg.d, small.cfg.n_blocks, small.cfg.n_heads) == (50, 2, 1)
