import math

import pytest
import torch
import torch.nn.functional as F

from perseq.losses import LossConfig, _ChunkedSoftmaxCE, bce, gbce, get_loss, sampled_softmax, softmax_ce


def _data(N=37, D=8, I=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, requires_grad=True)
    emb = torch.randn(I + 1, D, generator=g, requires_grad=True)
    y = torch.randint(1, I + 1, (N,), generator=g)
    return h, emb, y


@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_ce_equals_reference_value_and_gradient(chunk, weighted):
    h, emb, y = _data()
    w = torch.rand(len(y), generator=torch.Generator().manual_seed(3)) if weighted else None
    ref = (F.cross_entropy(h @ emb[1:].T, y - 1, reduction="none") * (1.0 if w is None else w)).sum()
    gh, ge = torch.autograd.grad(ref, [h, emb])
    out = _ChunkedSoftmaxCE.apply(h, emb[1:], y - 1, chunk, w)
    gh2, ge2 = torch.autograd.grad(out * 1.0, [h, emb])
    assert torch.allclose(out, ref, atol=1e-4)
    assert torch.allclose(gh, gh2, atol=1e-5) and torch.allclose(ge, ge2, atol=1e-5)


def test_ce_hand_computed():
    h = torch.tensor([[1.0, 0.0]])
    emb = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # row 0 = padding, not a candidate
    loss = softmax_ce(h, torch.tensor([1]), emb)
    expected = -2.0 + math.log(math.exp(2) + math.exp(0) + math.exp(1))
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


def test_sampled_softmax_with_all_items_as_negatives_approaches_full_ce():
    """Uniform negatives = every item once: the target appears among the negatives and is
    masked, so the loss equals full CE exactly."""
    h, emb, y = _data(N=5, I=6)
    torch.manual_seed(0)
    import perseq.losses as L

    orig = L._sample
    L._sample = lambda n, n_items, q, device, generator=None: torch.arange(1, n_items + 1)
    try:
        s = sampled_softmax(h, y, emb, n_neg=6)
    finally:
        L._sample = orig
    assert torch.allclose(s, softmax_ce(h, y, emb), atol=1e-5)


@pytest.mark.parametrize("chunk", [3, 2048])
def test_per_row_negatives_equal_an_explicit_per_row_softmax_in_value_and_gradient(chunk):
    """Each row its own negatives (generative-recommenders' sampler): loss and gradients,
    chunked and checkpointed, equal a direct log-softmax over [target, that row's negatives]
    with accidental hits masked and the logQ term subtracted."""
    h, emb, y = _data(N=11, I=9)
    q = torch.rand(10)
    q[0] = 0
    q = q / q.sum()
    g = torch.Generator().manual_seed(3)
    s = sampled_softmax(h, y, emb, n_neg=4, q=q, temperature=0.5, negatives="per_row", chunk=chunk, generator=g)
    s_torch = sampled_softmax(h.double(), y, emb.double(), n_neg=4, q=q, temperature=0.5, negatives="per_row", chunk=chunk,
                              generator=torch.Generator().manual_seed(3))  # float64: the torch Function, not numba
    assert torch.allclose(s.double(), s_torch, atol=1e-5)
    neg = torch.multinomial(q, 11 * 4, replacement=True, generator=torch.Generator().manual_seed(3)).view(11, 4)
    assert (neg == y[:, None]).any(), "the draw should contain an accidental hit to exercise the mask"
    logq = q.clamp_min(1e-12).log()
    ref = 0
    for i in range(11):
        cand = torch.cat([y[i : i + 1], neg[i]])
        logits = emb[cand] @ h[i] / 0.5 - logq[cand]
        logits[1:][neg[i] == y[i]] = float("-inf")
        ref = ref - logits.log_softmax(0)[0]
    assert torch.allclose(s, ref, atol=1e-5)
    g1 = torch.autograd.grad(s, [h, emb])
    g2 = torch.autograd.grad(ref, [h, emb])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g2))


def test_numba_per_row_kernel_equals_the_torch_path():
    """The fused CPU kernel (float32 CPU default) gives the loss and gradients of the
    chunked torch Function (run in float64 as the reference) on the same negatives, biases
    and masked accidental hits."""
    from perseq.losses import _PerRowSampledCE
    from perseq.ops.sampled_numba import NumbaPerRowSampledCE

    h, emb, y = _data(N=300, D=13, I=40)
    g = torch.Generator().manual_seed(1)
    neg = torch.randint(1, 41, (300, 16), generator=g)
    assert (neg == y[:, None]).sum() > 10
    pos_bias, neg_bias = torch.randn(300, generator=g), torch.randn(300, 16, generator=g)
    a = NumbaPerRowSampledCE.apply(h, emb, y, neg, pos_bias, neg_bias, 0.3)
    h64, emb64 = h.detach().double().requires_grad_(), emb.detach().double().requires_grad_()
    b = _PerRowSampledCE.apply(h64, emb64, y, neg, pos_bias.double(), neg_bias.double(), 0.3, 7)
    torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=0)
    ga = torch.autograd.grad(a * 2.0, [h, emb])  # an upstream gradient other than 1
    gb = torch.autograd.grad(b * 2.0, [h64, emb64])
    for u, v in zip(ga, gb):  # float32 sums against float64: errors relative to the scale
        torch.testing.assert_close(u.double(), v, rtol=1e-4, atol=1e-5 * v.abs().max().item())


def test_numba_per_row_backward_is_exactly_zero_when_every_negative_is_the_target():
    """All negatives masked: the loss is 0 and so is every gradient; a backward whose
    recomputed logits drift from the forward's log-sum-exp (mismatched fastmath) is not."""
    from perseq.ops.sampled_numba import NumbaPerRowSampledCE

    h, emb, y = _data(N=20, D=64, I=30)
    h, emb = (3 * h).detach().requires_grad_(), (3 * emb).detach().requires_grad_()
    neg = y[:, None].repeat(1, 8)
    loss = NumbaPerRowSampledCE.apply(h, emb, y, neg, torch.zeros(20), torch.zeros(20, 8), 0.05)
    assert loss.item() == 0
    gh, ge = torch.autograd.grad(loss, [h, emb])
    assert gh.abs().max() == 0 and ge.abs().max() == 0


def test_per_row_sampled_softmax_of_no_targets_is_zero():
    q = torch.full((6,), 0.2)
    q[0] = 0
    h = torch.zeros(0, 4, requires_grad=True)
    s = sampled_softmax(h, torch.zeros(0, dtype=torch.long), torch.randn(6, 4), q=q, negatives="per_row")
    assert s.item() == 0 and s.requires_grad


def test_unknown_negatives_mode_is_rejected():
    with pytest.raises(ValueError, match="negatives"):
        get_loss(LossConfig(name="sampled", negatives="batch"))


def test_logq_correction_subtracts_log_probability():
    h = torch.tensor([[1.0, 0.0]])
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    q = torch.tensor([0.0, 0.8, 0.2])
    import perseq.losses as L

    orig = L._sample
    L._sample = lambda n, n_items, q, device, generator=None: torch.tensor([2])
    try:
        s = sampled_softmax(h, torch.tensor([1]), emb, n_neg=1, q=q)
    finally:
        L._sample = orig
    pos, neg = 1.0 - math.log(0.8), 0.0 - math.log(0.2)
    assert math.isclose(s.item(), -pos + math.log(math.exp(pos) + math.exp(neg)), rel_tol=1e-6)


def test_bce_hand_computed():
    h = torch.tensor([[1.0, 0.0]])
    emb = torch.tensor([[0.0, 0.0], [2.0, 0.0], [-1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    neg = torch.randint(1, 3, (1,), generator=torch.Generator().manual_seed(0)).item()
    loss = bce(h, torch.tensor([1]), emb, generator=g)
    s_neg = emb[neg, 0].item()
    expected = -math.log(1 / (1 + math.exp(-2.0))) - math.log(1 - 1 / (1 + math.exp(-s_neg)))
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


def test_gbce_reduces_to_bce_when_t_is_zero_and_alpha_is_one():
    """t=0 gives beta = alpha*(1/alpha) = 1: plain BCE with k negatives."""
    h, emb, y = _data(N=4, I=5)
    g1 = torch.Generator().manual_seed(1)
    loss = gbce(h, y, emb, n_neg=3, t=0.0, generator=g1)
    neg = torch.randint(1, 6, (4, 3), generator=torch.Generator().manual_seed(1))
    pos = (h * emb[y]).sum(-1)
    negs = torch.einsum("nd,nkd->nk", h, emb[neg]).masked_fill(neg == y[:, None], float("-inf"))
    ref = -(F.logsigmoid(pos) + F.logsigmoid(-negs).sum(-1)).sum()
    assert torch.allclose(loss, ref, atol=1e-5)


def test_get_loss_rejects_unknown():
    with pytest.raises(ValueError, match="valid"):
        get_loss(LossConfig(name="hinge"))
