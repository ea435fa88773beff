"""Selective scan (ops/selective_scan.py) and Mamba4Rec: every path against the sequential
reference, in value and gradient; step == encode; causality; the backend switch."""
import pytest
import torch
import torch.nn.functional as F

from perseq.ops import selective_scan as ss
from perseq.ops.selective_scan import (
    causal_conv1d,
    causal_conv1d_step,
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
    selective_scan_step,
)
from perseq.models.mamba4rec import Mamba4Rec, Mamba4RecConfig


@pytest.fixture(autouse=True)
def _one_thread():
    # these tensors are tiny: with several threads on a busy machine each op waits on the
    # thread pool (measured 100x slower: 0.56 s vs 6 ms per training step of the tiny model)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["numba", "native"])
def cpu_kernel(request, monkeypatch):
    """Runs a test of ``selective_scan_numba`` once with the numba kernels and once with the
    AVX-512 C kernels (``ops/native.py``), checking that the latter really ran."""
    from perseq.ops import native, scan_numba

    use = request.param == "native"
    if use and native.library() is None:
        pytest.skip("the AVX-512 C kernels do not load here (no AVX-512 or no C compiler)")
    monkeypatch.setattr(scan_numba, "USE_NATIVE", use)
    calls = []
    for name in ("scan_fwd", "scan_bwd"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    yield request.param
    if use:
        assert calls, "the native kernels were never called"
    else:
        assert not calls


def _scan_inputs(batch=2, L=7, E=3, N=4, dtype=torch.float64, seed=0, dt_scale=1.0, a_scale=4.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, L, E, generator=g, dtype=dtype)
    delta = F.softplus(torch.randn(batch, L, E, generator=g, dtype=dtype)) * dt_scale  # ≥ 0, as in Mamba
    A = -(torch.rand(E, N, generator=g, dtype=dtype) * a_scale + 0.05)  # < 0
    B = torch.randn(batch, L, N, generator=g, dtype=dtype)
    C = torch.randn(batch, L, N, generator=g, dtype=dtype)
    D = torch.randn(E, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, delta, A, B, C, D)]


def _value_and_grads(fn, inputs, seed=1):
    y = fn(*inputs)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    return y, torch.autograd.grad(y, inputs, gy)


# L < chunk, L == chunk, L a multiple of chunk, not a multiple, one long chunk crossing
# several checkpoint segments, chunk not a multiple of the segment, and the auto size
@pytest.mark.parametrize("L,chunk", [(1, 4), (3, 8), (8, 8), (12, 4), (13, 4), (37, 8), (37, 64), (40, 6), (50, None)])
def test_chunked_scan_matches_reference_in_value_and_every_gradient(L, chunk):
    inputs = _scan_inputs(L=L)
    y_ref, g_ref = _value_and_grads(selective_scan_ref, inputs)
    y, g = _value_and_grads(lambda *t: selective_scan_chunked(*t, chunk=chunk), inputs)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(["x", "delta", "A", "B", "C", "D"], g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"d/d{name}")


def test_chunked_backward_is_the_true_derivative():
    # gradcheck against finite differences, independent of the reference's autograd
    inputs = _scan_inputs(batch=1, L=9, E=2, N=3)
    assert torch.autograd.gradcheck(lambda *t: selective_scan_chunked(*t, chunk=4), inputs)


@pytest.mark.parametrize("dt_scale,a_scale", [(30.0, 40.0), (1e-3, 0.1)])
def test_chunked_scan_is_stable_for_extreme_decays(dt_scale, a_scale):
    # log-decays down to about -1e3 per step (a factored exp(-cumsum) form overflows
    # float32 here), and decays of nearly 1 over a long sequence (long memory)
    inputs64 = _scan_inputs(L=300, E=4, N=8, dt_scale=dt_scale, a_scale=a_scale)
    inputs32 = [t.detach().float().requires_grad_() for t in inputs64]
    y_ref, g_ref = _value_and_grads(selective_scan_ref, inputs64)
    y, g = _value_and_grads(lambda *t: selective_scan_chunked(*t, chunk=16), inputs32)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in g)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5 * y_ref.abs().max().item())
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4 * b.abs().max().item())


def test_half_precision_inputs_scan_in_float32():
    inputs = [t.detach() for t in _scan_inputs(L=20, dtype=torch.float32)]
    y = selective_scan_chunked(*(t.bfloat16() for t in inputs), chunk=8)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), selective_scan_ref(*inputs), rtol=0.05, atol=0.05)


def test_step_loop_matches_reference():
    x, delta, A, B, C, D = (t.detach() for t in _scan_inputs(L=11))
    y_ref = selective_scan_ref(x, delta, A, B, C, D)
    h = torch.zeros(2, 3, 4, dtype=torch.float64)
    for t in range(11):
        h, y_t = selective_scan_step(h, x[:, t], delta[:, t], A, B[:, t], C[:, t], D)
        torch.testing.assert_close(y_t, y_ref[:, t], rtol=1e-12, atol=1e-12)


def test_reference_matches_a_hand_computed_case():
    # one channel, one state: h1 = Δ1 x1 B1 = 2; h2 = e^{-1}·2 + 1·1·1; y = C h + D x
    x = torch.tensor([[[1.0], [1.0]]], dtype=torch.float64)
    delta = torch.tensor([[[2.0], [1.0]]], dtype=torch.float64)
    A = torch.tensor([[-1.0]], dtype=torch.float64)
    B = torch.tensor([[[1.0], [1.0]]], dtype=torch.float64)
    C = torch.tensor([[[1.0], [3.0]]], dtype=torch.float64)
    D = torch.tensor([0.5], dtype=torch.float64)
    h2 = 2 * torch.exp(torch.tensor(-1.0, dtype=torch.float64)) + 1
    expected = torch.stack([torch.tensor(2 + 0.5, dtype=torch.float64), 3 * h2 + 0.5]).view(1, 2, 1)
    for fn in (selective_scan_ref, lambda *t: selective_scan_chunked(*t, chunk=1)):
        torch.testing.assert_close(fn(x, delta, A, B, C, D), expected)


def test_chunked_scan_saves_a_fraction_of_the_states():
    # the reference's autograd keeps several (B, L, E, N) tensors; the chunked scan keeps
    # its inputs and one state every SEGMENT steps
    inputs = _scan_inputs(batch=2, L=64, E=32, N=32, dtype=torch.float32)
    full_states = 2 * 64 * 32 * 32  # (B, L, E, N)

    def saved(fn):
        n = [0]

        def pack(t):
            n[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(*inputs).sum()
        return n[0]

    assert saved(lambda *t: selective_scan_chunked(*t, chunk=16)) < 0.5 * full_states
    assert saved(selective_scan_ref) > 2 * full_states


def test_auto_chunk_keeps_one_chunk_for_training_batches_and_splits_small_ones():
    assert ss._auto_chunk(128, 200, 128, 32) == 200  # one chunk: the slice is already 2^19
    assert ss._auto_chunk(4, 2048, 128, 32) == 256  # 8 chunks side by side
    assert ss._auto_chunk(1, 3, 128, 32) == 1


def test_causal_conv_full_step_and_hand_computed():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 5, generator=g)
    w, b = torch.randn(5, 4, generator=g), torch.randn(5, generator=g)
    y = causal_conv1d(x, w, b, activation="silu")
    # y_t = silu(b + Σ_j w[:, j] x_{t-3+j}), zeros before the start
    xp = F.pad(x, (0, 0, 3, 0))
    manual = F.silu(b + sum(w[:, j] * xp[:, j : j + 9] for j in range(4)))
    torch.testing.assert_close(y, manual)
    state = torch.zeros(2, 5, 3)
    for t in range(9):
        state, y_t = causal_conv1d_step(state, x[:, t], w, b, activation="silu")
        torch.testing.assert_close(y_t, y[:, t])


def test_backend_switch(monkeypatch):
    inputs = [t.detach().float() for t in _scan_inputs(L=10)]
    y = selective_scan_chunked(*inputs)
    torch.testing.assert_close(selective_scan(*inputs, backend="torch"), y)
    torch.testing.assert_close(selective_scan(*inputs, backend="auto"), y)  # numba or torch, same numbers
    # float32 CPU tensors go to the numba kernel under auto; float64 never does
    calls = []
    real = ss.selective_scan_numba
    monkeypatch.setattr(ss, "selective_scan_numba", lambda *a: calls.append(a[0].dtype) or real(*a))
    selective_scan(*inputs, backend="auto")
    selective_scan(*[t.double() for t in inputs], backend="auto")
    assert calls == [torch.float32]
    monkeypatch.setattr(ss, "selective_scan_numba", None)  # numba not installed
    torch.testing.assert_close(selective_scan(*inputs, backend="auto"), y)
    with pytest.raises(RuntimeError, match="numba.*backend='torch'"):
        selective_scan(*inputs, backend="numba")
    with pytest.raises(ValueError, match="auto, torch, numba, cuda"):
        selective_scan(*inputs, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        Mamba4RecConfig(n_items=5, backend="fast")


# L below, at, across and far across the kernel's checkpoint segment; batch 1 and 3; E = 37
# runs the vectorized channel loop (8/16 lanes) plus a remainder, as E = 128 does in training;
# E = 144 is 9 vectors of 16: the C forward's blocks of 8 plus 1, its backward's 4 + 4 + 1
@pytest.mark.parametrize("L,batch,E", [(1, 2, 5), (31, 3, 5), (32, 1, 5), (33, 2, 5), (100, 2, 5), (70, 2, 37), (40, 3, 144)])
def test_numba_kernel_matches_reference_in_value_and_every_gradient(L, batch, E, cpu_kernel):
    from perseq.ops.scan_numba import SEGMENT, selective_scan_numba

    assert SEGMENT == 32  # the lengths above are chosen around it
    inputs = _scan_inputs(batch=batch, L=L, E=E, N=6)
    y_ref, g_ref = _value_and_grads(selective_scan_ref, inputs)
    y, g = _value_and_grads(selective_scan_numba, [t.detach().float().requires_grad_() for t in inputs])
    assert y.dtype == torch.float32
    # float32 against the float64 reference: errors of float32 rounding, relative to scale
    tol = lambda ref: dict(rtol=1e-4, atol=1e-5 * ref.abs().max().item())  # noqa: E731
    torch.testing.assert_close(y.double(), y_ref, **tol(y_ref))
    for name, a, b in zip(["x", "delta", "A", "B", "C", "D"], g, g_ref):
        torch.testing.assert_close(a.double(), b, **tol(b), msg=f"d/d{name}")


@pytest.mark.parametrize("with_D", [True, False])
@pytest.mark.parametrize("L,E", [(33, 5), (70, 37)])
def test_fused_gate_matches_reference_in_value_and_every_gradient(L, E, with_D, cpu_kernel):
    # y = (scan + D x) ⊙ SiLU(z): the numba kernels fuse D and the gate (their backward
    # recomputes the pre-gate output from the rerun states); the chunked path applies them in
    # torch. Both against the reference, including d/dz and d/dD.
    from perseq.ops.scan_numba import selective_scan_numba

    inputs = _scan_inputs(batch=2, L=L, E=E, N=6)
    z = (torch.randn(2, L, E, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3).requires_grad_()
    if not with_D:
        inputs = inputs[:5]
    ref = lambda *t: selective_scan_ref(*t[:-1], **({} if with_D else {"D": None}), z=t[-1])  # noqa: E731
    y_ref, g_ref = _value_and_grads(ref, [*inputs, z])
    names = ["x", "delta", "A", "B", "C", "D", "z"] if with_D else ["x", "delta", "A", "B", "C", "z"]
    # gate really applied: the gated output differs from the plain scan's
    assert not torch.allclose(y_ref, selective_scan_ref(*inputs))
    y, g = _value_and_grads(lambda *t: selective_scan_chunked(*t[:-1], chunk=8, z=t[-1]), [*inputs, z])
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(names, g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"chunked d/d{name}")
    f32 = [t.detach().float().requires_grad_() for t in (*inputs, z)]
    numba_fn = lambda *t: selective_scan_numba(*t[:-1], **({} if with_D else {"D": None}), z=t[-1])  # noqa: E731
    y, g = _value_and_grads(numba_fn, f32)
    tol = lambda r: dict(rtol=1e-4, atol=1e-5 * r.abs().max().item())  # noqa: E731
    torch.testing.assert_close(y.double(), y_ref, **tol(y_ref))
    for name, a, b in zip(names, g, g_ref):
        torch.testing.assert_close(a.double(), b, **tol(b), msg=f"numba d/d{name}")


@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_delta_softplus_matches_reference_in_value_and_every_gradient(with_bias, cpu_kernel):
    # Δ = softplus(delta + delta_bias) inside the kernels (own vectorized log1p), with the
    # pre-activations spread over ±30 so both branches of softplus and its flat ends are hit
    from perseq.ops.scan_numba import selective_scan_numba

    g = torch.Generator().manual_seed(7)
    x, _, A, B, C, D = _scan_inputs(batch=2, L=40, E=37, N=6)
    pre = torch.randn(2, 40, 37, generator=g, dtype=torch.float64) * 2 - 3
    pre[0, :3] = torch.linspace(-30, 30, 37, dtype=torch.float64)
    z = torch.randn(2, 40, 37, generator=g, dtype=torch.float64)
    ins = [x, pre.requires_grad_(), A, B, C, D, z.requires_grad_()]
    names = ["x", "delta", "A", "B", "C", "D", "z"]
    if with_bias:
        ins.append(torch.randn(37, generator=g, dtype=torch.float64).requires_grad_())
        names.append("delta_bias")

    def call(fn):  # inputs in the order of ``ins`` -> fn(x, delta, A, B, C, D, z=, delta_bias=, delta_softplus=True)
        return lambda *t: fn(*t[:6], z=t[6], delta_bias=t[7] if with_bias else None, delta_softplus=True)

    y_ref, g_ref = _value_and_grads(call(selective_scan_ref), ins)
    # softplus really applied: Δ = delta + bias without it gives other numbers
    assert not torch.allclose(y_ref, selective_scan_ref(*ins[:6], z=z, delta_bias=ins[7] if with_bias else None))
    y, gr = _value_and_grads(call(selective_scan_numba), [t.detach().float().requires_grad_() for t in ins])
    tol = lambda r: dict(rtol=1e-4, atol=1e-5 * r.abs().max().item())  # noqa: E731
    torch.testing.assert_close(y.double(), y_ref, **tol(y_ref))
    for name, a, b in zip(names, gr, g_ref):
        torch.testing.assert_close(a.double(), b, **tol(b), msg=f"numba d/d{name}")
    y, gr = _value_and_grads(call(lambda *a, **k: selective_scan_chunked(*a, chunk=8, **k)), ins)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(names, gr, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"chunked d/d{name}")


@pytest.mark.parametrize("softplus", [True, False])
def test_fused_dt_projection_matches_reference_in_value_and_every_gradient(softplus, cpu_kernel):
    # Δ = softplus(dt W_Δᵀ + bias) with dt (B, L, R) the low-rank input and W_Δ (E, R):
    # the numba kernels fuse the projection (their gradients of W_Δ and the bias are per-row
    # partials); every other backend applies F.linear first. L=40 crosses a checkpoint
    # segment, E=37 runs the vector lanes plus a remainder.
    from perseq.ops.scan_numba import selective_scan_numba

    g = torch.Generator().manual_seed(11)
    x, _, A, B, C, D = _scan_inputs(batch=3, L=40, E=37, N=6)
    dt = torch.randn(3, 40, 3, generator=g, dtype=torch.float64).requires_grad_()
    W = (torch.randn(37, 3, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    bias = (torch.randn(37, generator=g, dtype=torch.float64) * 0.5 + (0.0 if softplus else 3.0)).requires_grad_()
    z = torch.randn(3, 40, 37, generator=g, dtype=torch.float64).requires_grad_()
    if not softplus:  # Δ ≥ 0 without the softplus too (the kernel's exp assumes Δ A ≤ 0)
        W = (W.detach().abs() * 0.1).requires_grad_()
        dt = (dt.detach().abs()).requires_grad_()
    ins = [x, dt, A, B, C, D, z, bias, W]
    names = ["x", "dt", "A", "B", "C", "D", "z", "delta_bias", "delta_proj"]

    def call(fn):
        return lambda *t: fn(*t[:6], z=t[6], delta_bias=t[7], delta_softplus=softplus, delta_proj=t[8])

    y_ref, g_ref = _value_and_grads(call(selective_scan_ref), ins)
    # the projection is really applied: Δ = softplus(dt W_Δᵀ + b) against the explicit form
    expect = selective_scan_ref(x, F.linear(dt, W), A, B, C, D, z=z, delta_bias=bias, delta_softplus=softplus)
    torch.testing.assert_close(y_ref, expect, rtol=0, atol=0)
    y, gr = _value_and_grads(call(selective_scan_numba), [t.detach().float().requires_grad_() for t in ins])
    tol = lambda r: dict(rtol=1e-4, atol=1e-5 * r.abs().max().item())  # noqa: E731
    torch.testing.assert_close(y.double(), y_ref, **tol(y_ref))
    for name, a, b in zip(names, gr, g_ref):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b, **tol(b), msg=f"numba d/d{name}")
    y, gr = _value_and_grads(call(lambda *a, **k: selective_scan(*a, backend="torch", chunk=8, **k)), ins)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(names, gr, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"torch d/d{name}")
    # shapes are checked before any kernel indexes (the kernels do not bounds-check)
    with pytest.raises(ValueError, match=r"delta of shape \(3, 40, 3\) expected"):
        selective_scan(x, dt[..., :2], A, B, C, delta_proj=W)
    with pytest.raises(ValueError, match=r"delta_proj \(36, 3\)"):
        selective_scan(x, dt, A, B, C, delta_proj=W[:36])
    with pytest.raises(ValueError, match=r"delta of shape \(3, 40, 37\) expected"):
        selective_scan(x, dt, A, B, C)


def test_kernel_softplus_is_float32_accurate():
    import numpy as np
    from numba import njit

    from perseq.ops.scan_numba import _softplus

    @njit(fastmath=True)  # as the kernels compile it
    def apply(a, out):
        for i in range(a.size):
            out[i] = _softplus(a[i])

    v = np.linspace(-60, 60, 240_001).astype(np.float32)
    out = np.empty_like(v)
    apply(v, out)
    exact = np.logaddexp(0, v.astype(np.float64))
    assert np.max(np.abs(out - exact) / exact) < 1e-6


@pytest.mark.parametrize("W,L", [(1, 9), (2, 9), (4, 9), (4, 2)])
def test_numba_conv_silu_matches_torch_in_value_and_every_gradient(W, L):
    from perseq.ops.scan_numba import causal_conv1d_silu_numba

    g = torch.Generator().manual_seed(W)
    x = torch.randn(3, L, 37, generator=g, requires_grad=True)  # L < W too; E = 37 covers the lane remainder
    w = torch.randn(37, W, generator=g, requires_grad=True)
    b = torch.randn(37, generator=g, requires_grad=True)
    y_ref, g_ref = _value_and_grads(lambda *a: causal_conv1d(*a, activation="silu", backend="torch"), [x, w, b])
    y, grads = _value_and_grads(causal_conv1d_silu_numba, [x, w, b])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, a, r in zip(["x", "weight", "bias"], grads, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4, msg=f"d/d{name}")
    # the CPU default (auto) takes the kernel; other activations stay on torch
    torch.testing.assert_close(causal_conv1d(x, w, b, activation="silu"), y)


def test_numba_kernel_exp_is_float32_accurate_and_never_denormal():
    import numpy as np
    from numba import njit

    from perseq.ops.scan_numba import _exp_nonpos

    @njit(fastmath=True)  # as the kernels compile it
    def apply(a, out):
        for i in range(a.size):
            out[i] = _exp_nonpos(a[i])

    x = -np.linspace(0, 120, 200_001).astype(np.float32)
    out = np.empty_like(x)
    apply(x, out)
    exact = np.exp(x.astype(np.float64))
    ok = x >= -80
    assert np.max(np.abs(out[ok] - exact[ok]) / exact[ok]) < 1e-6
    assert out[0] == 1.0 and (np.diff(out) <= 0).all()  # monotone
    assert out.min() >= np.finfo(np.float32).tiny and out.min() < 1e-37  # clamped, not denormal


def test_numba_kernel_refuses_positive_A_and_auto_then_takes_the_torch_path():
    from perseq.ops.scan_numba import selective_scan_numba

    inputs = [t.detach().float() for t in _scan_inputs(L=6)]
    inputs[2] = inputs[2].abs()  # A > 0: outside the kernel's exp domain
    with pytest.raises(ValueError, match="A <= 0"):
        selective_scan_numba(*inputs)
    torch.testing.assert_close(selective_scan(*inputs, backend="auto"), selective_scan_chunked(*inputs))


def test_numba_kernels_are_safe_to_call_from_several_threads(cpu_kernel):
    # numba's workqueue pool aborts the whole process on concurrent entry; perseq serializes
    import threading

    from perseq.ops.dropout import hash_dropout
    from perseq.ops.scan_numba import selective_scan_numba

    inputs = [t.detach().float() for t in _scan_inputs(batch=8, L=64, E=16, N=8)]
    ref = selective_scan_numba(*inputs)
    errors, outs = [], []

    def work():
        try:
            for _ in range(20):
                outs.append(torch.equal(selective_scan_numba(*inputs), ref))
                hash_dropout(torch.ones(200_000), 0.3)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(outs) == 80 and all(outs)


def test_numba_kernel_scans_half_precision_in_float32(cpu_kernel):
    from perseq.ops.scan_numba import selective_scan_numba

    inputs = [t.detach() for t in _scan_inputs(L=9)]
    y = selective_scan_numba(*[t.bfloat16() for t in inputs])
    assert y.dtype == torch.bfloat16
    y32 = selective_scan_numba(*[t.bfloat16().float() for t in inputs])
    torch.testing.assert_close(y, y32.bfloat16())
    with pytest.raises(ValueError, match="float32"):
        selective_scan_numba(*inputs)  # float64 is the torch path's


def test_auto_never_sends_cpu_tensors_to_the_cuda_kernel(monkeypatch):
    def kernel(*args, **kwargs):
        raise AssertionError("CUDA kernel called with CPU tensors")

    monkeypatch.setattr(ss, "_mamba_selective_scan_fn", kernel)
    inputs = [t.detach().float() for t in _scan_inputs(L=5)]
    torch.testing.assert_close(selective_scan(*inputs, backend="auto"), selective_scan_chunked(*inputs))
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        selective_scan(*inputs, backend="cuda")


def _mamba_ssm_importable():
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_mamba_ssm_importable(), reason="mamba_ssm is installed")
def test_cuda_backend_without_mamba_ssm_says_what_is_missing():
    inputs = [t.detach().float() for t in _scan_inputs(L=5)]
    with pytest.raises(RuntimeError, match="mamba_ssm.*backend='torch'"):
        selective_scan(*inputs, backend="cuda")
    m = Mamba4Rec(Mamba4RecConfig(n_items=10, d=8, d_state=4, backend="cuda"))
    with pytest.raises(RuntimeError, match="mamba_ssm"):
        m.encode(torch.ones(1, 3, dtype=torch.long))


# ---- the model -------------------------------------------------------------------------

def _model(**kw):
    torch.manual_seed(0)
    cfg = dict(n_items=50, max_len=16, d=16, d_state=8, dropout=0.0, chunk=3) | kw
    return Mamba4Rec(Mamba4RecConfig(**cfg)).eval()


@pytest.mark.parametrize("kw", [{}, {"n_layers": 2}, {"residual": True}, {"chunk": None}])
def test_step_over_a_sequence_equals_encode_at_every_position(kw):
    m = _model(**kw)
    x = torch.randint(1, 51, (3, 11))
    full = m.encode(x)
    state = m.init_state(3)
    for t in range(11):
        state, h = m.step(state, x[:, t])
        torch.testing.assert_close(h, full[:, t], rtol=1e-5, atol=1e-5, msg=f"position {t}")
    assert [tuple(s.shape) for s in state[0]] == [(3, 32, 3), (3, 32, 8)]  # conv window, SSM state


def test_model_is_causal_and_ignores_right_padding():
    m = _model(n_layers=2)
    x = torch.randint(1, 51, (2, 12))
    h = m.encode(x)
    for t in range(11):
        y = x.clone()
        y[:, t + 1] = x[:, t + 1] % 50 + 1  # a different item at t+1 only
        h2 = m.encode(y)
        torch.testing.assert_close(h2[:, : t + 1], h[:, : t + 1], rtol=0, atol=1e-6)
        assert (h2[:, t + 1] - h[:, t + 1]).abs().max() > 1e-3
    padded = torch.cat([x, torch.zeros(2, 5, dtype=torch.long)], 1)
    torch.testing.assert_close(m.encode(padded)[:, :12], h, rtol=1e-5, atol=1e-6)


def test_parameter_count_and_init_follow_the_paper_setting():
    m = Mamba4Rec(Mamba4RecConfig(n_items=100))  # d 64, N 32, d_conv 4, expand 2 -> E 128, dt_rank 4
    mamba = 64 * 256 + (128 * 4 + 128) + 128 * (4 + 2 * 32) + (4 * 128 + 128) + 128 * 32 + 128 + 128 * 64
    ffn = (64 * 256 + 256) + (256 * 64 + 64) + 2 * 64
    assert mamba == 38784
    assert sum(p.numel() for p in m.parameters()) == 101 * 64 + 2 * 64 + mamba + 2 * 64 + ffn == 78720
    block = m.layers[0].mamba
    torch.testing.assert_close(-torch.exp(block.A_log), -torch.arange(1, 33.0).repeat(128, 1))  # S4D-real
    dt = F.softplus(block.dt_proj.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6  # log-uniform in [1e-3, 0.1], floor 1e-4
    assert not m.layers[0].residual and Mamba4Rec(Mamba4RecConfig(n_items=5, n_layers=2)).layers[0].residual
    assert m.item_emb.weight[0].abs().sum() == 0 and m.objective == "causal" and m.incremental


def test_tiny_model_learns_a_deterministic_successor():
    # next item = current item + 1 (cyclic over 12 items): after training, the next-item
    # scores must put the successor first at (almost) every position
    torch.manual_seed(0)
    m = Mamba4Rec(Mamba4RecConfig(n_items=12, d=16, d_state=4, expand=1, dropout=0.0))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    starts = torch.arange(64) % 12
    seqs = (starts[:, None] + torch.arange(10)) % 12 + 1  # (64, 10), items 1..12
    for _ in range(80):
        logits = m.encode(seqs[:, :-1]) @ m.output_embeddings().T  # (64, 9, 13)
        loss = F.cross_entropy(logits.reshape(-1, 13), seqs[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        acc = ((m.encode(seqs[:, :-1]) @ m.output_embeddings().T).argmax(-1) == seqs[:, 1:]).float().mean()
    assert acc > 0.95, acc


def test_numba_kernels_use_the_workqueue_pool_not_a_second_openmp(monkeypatch):
    # a second OpenMP runtime's spinning workers slowed a training step ~2.7x (scan_numba.py)
    import os

    import numba

    from perseq.ops.scan_numba import selective_scan_numba

    selective_scan_numba(*[t.detach().float() for t in _scan_inputs(L=3)][:5])
    if "NUMBA_THREADING_LAYER" not in os.environ:
        assert numba.threading_layer() == "workqueue"


def test_init_option_reproduces_the_authors_code_or_mamba_ssm():
    # authors' code: every Linear N(0, 0.02), zero bias -> Δ starts at softplus(0) = ln 2
    m = Mamba4Rec(Mamba4RecConfig(n_items=10, d=16, init="mamba4rec_code"))
    mamba = m.layers[0].mamba
    torch.testing.assert_close(F.softplus(mamba.dt_proj.bias), torch.full((32,), 0.6931471805599453))
    assert abs(mamba.in_proj.weight.std().item() - 0.02) < 0.003
    # mamba_ssm: Δ log-uniform in [1e-3, 0.1]
    d = F.softplus(Mamba4Rec(Mamba4RecConfig(n_items=10, d=16)).layers[0].mamba.dt_proj.bias)
    assert d.min() >= 1e-4 and d.max() <= 0.1 + 1e-6
    with pytest.raises(ValueError, match="init"):
        Mamba4RecConfig(n_items=10, init="xavier")


def test_native_kernels_switch_off_and_fall_back_with_a_warning(monkeypatch, tmp_path):
    # PERSEQ_NATIVE=0 never builds; a compiler that fails warns once and leaves the numba
    # kernels in charge; a good build lands in the cache under a source hash and is reused
    from perseq.ops import native

    def fresh():
        monkeypatch.setattr(native, "_tried", False)
        monkeypatch.setattr(native, "_lib", None)

    monkeypatch.setenv("PERSEQ_CACHE_DIR", str(tmp_path))
    fresh()
    monkeypatch.setenv("PERSEQ_NATIVE", "0")
    assert native.library() is None
    assert not (tmp_path / "native").exists()
    if not native._host_has_avx512():
        pytest.skip("no AVX-512 on this CPU: the kernels are never built here")
    monkeypatch.setenv("PERSEQ_NATIVE", "1")
    fresh()
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    with pytest.warns(RuntimeWarning, match="could not be built.*numba kernels run instead"):
        assert native.library() is None
    assert native.library() is None  # tried once per process, no second warning
    assert list((tmp_path / "native").iterdir()) == []  # no half-written library left behind
    monkeypatch.delenv("CC")
    fresh()
    if native.library() is None:
        pytest.skip("no working C compiler here")
    built = list((tmp_path / "native").glob("scan_avx512-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    fresh()
    assert native.library() is not None and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
