"""ops/dropout.py: the counter-based dropout keeps the right fraction, scales, is
reproducible, independent between calls, and its backward applies the same mask."""
import pytest
import torch
import torch.nn.functional as F

from perseq.ops.dropout import Dropout, hash_dropout


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.9])
def test_keeps_one_minus_p_and_scales_the_kept_values(p):
    torch.manual_seed(0)
    x = torch.rand(1_000_000) + 0.5  # no zeros, so a zero output means dropped
    y = hash_dropout(x, p)
    kept = y != 0
    n = x.numel()
    # binomial: the kept fraction is within 5 standard deviations of 1 - p
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))


def test_reproducible_under_the_torch_seed_and_fresh_on_every_call():
    x = torch.ones(4096, 64)
    torch.manual_seed(3)
    a, b = hash_dropout(x, 0.5), hash_dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(hash_dropout(x, 0.5), a)
    ma, mb = (a != 0).float(), (b != 0).float()
    # two calls: independent masks (correlation ~ 0; |r| < 0.01 is 5 sd at this size)
    r = torch.corrcoef(torch.stack([ma.flatten(), mb.flatten()]))[0, 1].item()
    assert abs(r) < 0.01
    # neighbouring elements are independent too (no stripes from the counter)
    m = ma.flatten()
    assert abs(torch.corrcoef(torch.stack([m[:-1], m[1:]]))[0, 1].item()) < 0.01


def test_backward_applies_the_forward_mask_and_scale():
    torch.manual_seed(1)
    x = (torch.rand(37, 53) + 0.5).requires_grad_()
    y = hash_dropout(x.t(), 0.3)  # non-contiguous input
    g = torch.randn_like(y)
    y.backward(g)
    mask = (y != 0).float().t()
    torch.testing.assert_close(x.grad, g.t() * mask / 0.7)


def test_module_semantics_match_nn_dropout():
    d = Dropout(0.4)
    x = torch.rand(100, 10) + 0.5
    d.eval()
    assert d(x) is x
    d.train()
    assert (d(x) == 0).any()
    assert hash_dropout(x, 0.0) is x
    assert torch.equal(hash_dropout(x, 1.0), torch.zeros_like(x))
    with pytest.raises(ValueError, match="probability"):
        hash_dropout(x, 1.5)
    # other dtypes use F.dropout: same statistics
    torch.manual_seed(0)
    y = hash_dropout(torch.ones(100_000, dtype=torch.float64), 0.25)
    assert abs((y != 0).double().mean().item() - 0.75) < 0.01 and y.dtype == torch.float64
    assert d.state_dict() == {} and repr(d) == repr(torch.nn.Dropout(0.4))
    # a dropped NaN stays NaN (x * 0), as with nn.Dropout, so divergence is not hidden
    torch.manual_seed(0)
    assert torch.isnan(hash_dropout(torch.full((1000,), float("nan")), 0.5)).all()
    with pytest.raises(ValueError, match="probability"):
        hash_dropout(x, -0.1, training=False)
