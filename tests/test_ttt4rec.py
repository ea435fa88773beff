import torch

from perseq.models import build_model


def _m(**kw):
    torch.manual_seed(0)
    return build_model("ttt4rec", n_items=30, max_len=32, d=16, n_heads=2, dropout=0.0, **kw).eval()


def test_dual_form_equals_explicit_gradient_steps():
    """The mini-batch dual form == per-event autograd gradients of ½‖kW − v‖² taken at the
    mini-batch's starting W, applied with the per-event learning rate."""
    m = _m(mini_batch=3)
    layer = m.blocks[0].ttt
    x = torch.randn(2, 7, 16, dtype=torch.float32)
    q, k, v, eta = layer._project(x)
    W = layer.W0.detach().expand(2, -1, -1, -1).clone()
    zs = []
    for s in range(0, 7, 3):
        W_start, acc = W.clone().requires_grad_(True), torch.zeros_like(W)
        for t in range(s, min(s + 3, 7)):
            loss = 0.5 * ((k[:, :, t : t + 1] @ W_start - v[:, :, t : t + 1]) ** 2).sum(dim=(-1, -2))  # (B, H)
            (g,) = torch.autograd.grad(loss.sum(), W_start, retain_graph=True)
            acc = acc + eta[:, :, t, None, None] * g
            zs.append(q[:, :, t : t + 1] @ (W_start - acc))
        W = (W_start - acc).detach()
    explicit = layer._read(torch.cat(zs, 2), x.shape)
    assert torch.allclose(layer(x), explicit, atol=1e-5)


def test_step_equals_encode_across_mini_batch_boundaries():
    m = _m(mini_batch=4)
    x = torch.randint(1, 31, (3, 11))
    full = m.encode(x)
    state = m.init_state(3)
    for t in range(11):
        state, h = m.step(state, x[:, t])
        assert torch.allclose(h, full[:, t], atol=1e-5), t


def test_hidden_state_learns_inside_the_forward():
    """With learning rate 0 the TTT layer is a fixed linear read of W₀ (z = q W₀); with a
    learning rate the state moves with every event and the outputs differ."""
    x = torch.randn(1, 8, 16)
    frozen = _m(base_lr=0.0).blocks[0].ttt
    q, _, _, _ = frozen._project(x)
    assert torch.allclose(frozen(x), frozen._read(q @ frozen.W0, x.shape), atol=1e-6)
    learning = _m(base_lr=1.0).blocks[0].ttt
    assert not torch.allclose(frozen(x), learning(x), atol=1e-4)
