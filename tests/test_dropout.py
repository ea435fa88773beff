"""ops/dropout.py: the counter-based dropout keeps the right fraction, scales, is
reproducible, independent between calls, and its backward applies the same mask."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from perseq.ops.dropout import _BLOCK, SERIAL_BELOW, Dropout, _apply, hash_dropout


def _fmix32(z):  # MurmurHash3's 32-bit finalizer, in numpy
    z = ((z ^ (z >> np.uint64(16))) * np.uint64(0x85EBCA6B)) & np.uint64(0xFFFFFFFF)
    z = ((z ^ (z >> np.uint64(13))) * np.uint64(0xC2B2AE35)) & np.uint64(0xFFFFFFFF)
    return z ^ (z >> np.uint64(16))


# the second seed's low half wraps past 2^32 within the tensor (the kernel hashes in 32-bit
# lanes); the third has every bit set
@pytest.mark.parametrize("seed", [0x0123_4567_89AB_CDEF, 0x0123_4567_FFFF_F000, 2**64 - 1])
@pytest.mark.parametrize("n", [3 * _BLOCK + 1234, SERIAL_BELOW + 3 * _BLOCK + 1234])
def test_mask_is_the_documented_hash_of_seed_and_element_index(seed, n):
    # element i is kept when fmix32(fmix32((i + seed_lo) mod 2^32) ^ seed_hi) >= p·2^32, on
    # every element, for a size the serial path takes and one that spans several parallel
    # work items and a ragged tail (the mask must not depend on which path ran or how the
    # work was split: resumed runs rely on it)
    assert 3 * _BLOCK + 1234 < SERIAL_BELOW
    p = 0.3
    x = torch.rand(n) + 0.5
    i = np.arange(n, dtype=np.uint64)
    z = _fmix32(_fmix32((i + np.uint64(seed & 0xFFFFFFFF)) & np.uint64(0xFFFFFFFF)) ^ np.uint64(seed >> 32))
    keep = torch.from_numpy(z >= np.uint64(int(p * 2**32)))
    assert torch.equal(_apply(x, seed, p), torch.where(keep, x * np.float32(1 / (1 - p)), torch.zeros_like(x)))


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


# ---- ops/gelu_dropout.py: dropout(GELU(h + b)) fused -------------------------------------

from perseq.ops.gelu_dropout import bias_gelu_dropout  # noqa: E402


def _gelu64(s):
    return s * 0.5 * (1 + torch.erf(s / 2**0.5))


@pytest.mark.parametrize("rows", [7, 3 * SERIAL_BELOW // 256])  # the serial path and the parallel one
def test_bias_gelu_dropout_is_hash_dropout_of_exact_gelu_values_and_gradients(rows):
    # the fused kernels keep the elements hash_dropout keeps under the same torch seed (the
    # zero pattern and scale, so a run's masks do not change with the kernel) and compute the
    # exact erf GELU and its derivative to ~1e-7 absolute, over |s| up to 14 (both tails,
    # including the cut-off where exp(-s²/2) is taken as 0)
    torch.manual_seed(0)
    C, p = 256, 0.2
    h = torch.cat([torch.linspace(-14, 14, rows * C // 2), torch.randn(rows * C - rows * C // 2) * 3]).view(rows, C)
    b = torch.randn(C) * 0.5
    g = torch.randn(rows, C)
    torch.manual_seed(5)
    kept = hash_dropout(torch.ones(rows, C), p)  # 1/(1-p) where kept, else 0
    hf, bf = h.clone().requires_grad_(), b.clone().requires_grad_()
    torch.manual_seed(5)
    y = bias_gelu_dropout(hf, bf, p)
    y.backward(g)
    h64, b64 = h.double().requires_grad_(), b.double().requires_grad_()
    y64 = _gelu64(h64 + b64) * kept.double()
    y64.backward(g.double())
    s = (h + b).abs()
    assert (y[kept == 0] == 0).all()  # dropped: exact zeros
    assert (y[(kept != 0) & (s > 1e-3) & (s < 8)] != 0).all()  # kept: GELU's value
    torch.testing.assert_close(y.double(), y64, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(hf.grad.double(), h64.grad, atol=1e-6, rtol=1e-5)
    # the bias gradient sums `rows` entries per column (float32 partials per block)
    torch.testing.assert_close(bf.grad.double(), b64.grad, atol=1e-6 * rows, rtol=1e-5)


def test_bias_gelu_dropout_falls_back_to_the_torch_line_and_checks_its_input():
    h, b = torch.randn(5, 8, 16), torch.randn(16)
    assert torch.equal(bias_gelu_dropout(h, b, 0.3, training=False), F.gelu(h + b))
    assert torch.equal(bias_gelu_dropout(h, b, 0.0), F.gelu(h + b))
    torch.manual_seed(2)
    ref = hash_dropout(F.gelu(h.double() + b.double()), 0.3)
    torch.manual_seed(2)
    assert torch.equal(bias_gelu_dropout(h.double(), b.double(), 0.3), ref)  # float64: torch ops
    with pytest.raises(ValueError, match="bias of shape"):
        bias_gelu_dropout(h, torch.randn(8), 0.3)
    with pytest.raises(ValueError, match="probability"):
        bias_gelu_dropout(h, b, 1.2)
    # NaN propagates (dropped or not), so divergence is not hidden
    y = bias_gelu_dropout(torch.full((4, 16), float("nan")), b, 0.5)
    assert torch.isnan(y).all()
