"""Aggregators and the server optimizer, against numbers worked out by hand."""
import dataclasses
import math

import pytest
import torch
from safetensors.torch import load, save

from perseq.federated.strategies import (
    AGGREGATORS,
    ServerOptConfig,
    ServerOptimizer,
    aggregate,
    coordinate_median,
    fedavg,
    norm_bound,
    trimmed_mean,
)

f64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=f64)


# three clients, two parameters; whole-update norms 5, 0.5 and 10 (3-4-5 triangles split
# across the two tensors, so a per-tensor norm would give 3 and 4, not 5)
def three_clients():
    return {
        "a": t([[3.0, 0.0], [0.3, 0.0], [6.0, 0.0]]),  # (C=3, 2)
        "b": t([[[4.0]], [[0.4]], [[8.0]]]),  # (C=3, 1, 1)
    }


# ------------------------------------------------------------------------------- fedavg


def test_fedavg_weights_1_2_1():
    u = {"a": t([[1.0, 2.0], [3.0, 4.0], [5.0, 8.0]]), "b": t([[4.0], [0.0], [8.0]])}
    out = fedavg(u, t([1.0, 2.0, 1.0]))
    # normalised weights 1/4, 1/2, 1/4: a = [1/4 + 3/2 + 5/4, 2/4 + 4/2 + 8/4]
    assert torch.equal(out["a"], t([3.0, 4.5]))
    assert torch.equal(out["b"], t([1.0 + 0.0 + 2.0]))
    # only the ratios matter
    assert torch.equal(fedavg(u, t([2.0, 4.0, 2.0]))["a"], out["a"])


def test_fedavg_float32_updates_keep_their_dtype():
    u = {"a": torch.tensor([[1.0], [3.0]])}
    out = fedavg(u, torch.tensor([3.0, 1.0]))
    assert out["a"].dtype == torch.float32 and out["a"].item() == 1.5


@pytest.mark.parametrize("weights, match", [
    ([0.0, 0.0, 0.0], "all zero"),
    ([1.0, -1.0, 1.0], ">= 0"),
    ([1.0, 1.0], r"expected \(3,\)"),
    ([1.0, float("nan"), 1.0], "finite"),
])
def test_fedavg_rejects_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        fedavg(three_clients(), t(weights))


def test_updates_must_agree_on_the_number_of_clients():
    with pytest.raises(ValueError, match="number of clients"):
        fedavg({"a": torch.zeros(3, 2), "b": torch.zeros(2, 1)}, torch.ones(3))
    with pytest.raises(ValueError, match="empty"):
        coordinate_median({})


# ------------------------------------------------------------------------- robust rules


def test_median_odd_number_of_clients():
    u = {"a": t([[1.0, 10.0], [3.0, -2.0], [2.0, 5.0]])}
    assert torch.equal(coordinate_median(u)["a"], t([2.0, 5.0]))


def test_median_even_number_of_clients_is_the_mean_of_the_two_middle_values():
    u = {"a": t([[1.0, 0.0], [4.0, -1.0], [2.0, 7.0], [10.0, 3.0]])}
    # column 0 sorted 1 2 4 10 -> (2 + 4) / 2; column 1 sorted -1 0 3 7 -> (0 + 3) / 2
    out = coordinate_median(u)["a"]
    assert torch.equal(out, t([3.0, 1.5]))
    assert torch.equal(out, torch.quantile(u["a"], 0.5, dim=0))


def test_median_ignores_weights():
    u = three_clients()
    heavy = coordinate_median(u, t([1000.0, 1.0, 1.0]))
    assert all(torch.equal(heavy[k], coordinate_median(u)[k]) for k in u)
    assert torch.equal(heavy["a"], t([3.0, 0.0]))


def test_trimmed_mean_drops_the_extremes_so_an_outlier_does_not_move_it():
    honest = t([[1.0], [2.0], [3.0], [4.0], [5.0]])
    # trim 0.2 of C=5 drops floor(1.0) = 1 value at each end: mean(2, 3, 4) = 3
    assert torch.equal(trimmed_mean({"a": honest}, 0.2)["a"], t([3.0]))
    attacked = honest.clone()
    attacked[4] *= 100  # the fifth client sends 500 instead of 5
    assert torch.equal(trimmed_mean({"a": attacked}, 0.2)["a"], t([3.0]))
    # while the plain mean is dragged from 3 to (1 + 2 + 3 + 4 + 500) / 5 = 102
    assert fedavg({"a": attacked}, torch.ones(5))["a"].item() == 102.0


def test_trimmed_mean_counts_and_bounds():
    u = {"a": t([[1.0], [2.0], [6.0]])}
    # trim 0.1 of C=3 drops floor(0.3) = 0 values: the plain mean, 3
    assert torch.equal(trimmed_mean(u, 0.1)["a"], t([3.0]))
    assert torch.equal(trimmed_mean(u, 0.0)["a"], t([3.0]))
    # 0.29 * 100 is 28.999999999999996 in floating point; the rule's floor is 29
    squares = {"a": t([[float(i * i)] for i in range(100)])}
    expected = sum(i * i for i in range(29, 71)) / 42
    assert trimmed_mean(squares, 0.29)["a"].item() == pytest.approx(expected, rel=1e-12)
    for bad in (0.5, -0.1, 0.7):
        with pytest.raises(ValueError, match=r"trim must be in \[0, 0.5\)"):
            trimmed_mean(u, bad)


# ------------------------------------------------------------------------ norm bounding


def test_norm_bound_scales_only_clients_over_the_bound_by_their_global_norm():
    u = three_clients()
    bounded, norms = norm_bound(u, 1.0)
    # the norm is over both parameters together: sqrt(3² + 4²) = 5, not 3 or 4
    assert torch.allclose(norms, t([5.0, 0.5, 10.0]), rtol=1e-15)
    # client 0 scaled by 1/5, client 2 by 1/10: both land on (0.6, 0) and 0.8
    assert torch.allclose(bounded["a"], t([[0.6, 0.0], [0.3, 0.0], [0.6, 0.0]]), rtol=1e-15)
    assert torch.allclose(bounded["b"], t([[[0.8]], [[0.4]], [[0.8]]]), rtol=1e-15)
    # client 1 (norm 0.5 <= 1) is untouched, bit for bit
    assert torch.equal(bounded["a"][1], u["a"][1]) and torch.equal(bounded["b"][1], u["b"][1])
    new_norms = torch.sqrt(bounded["a"].pow(2).sum(1) + bounded["b"].pow(2).flatten(1).sum(1))
    assert torch.allclose(new_norms, t([1.0, 0.5, 1.0]), rtol=1e-15)


def test_norm_bound_keeps_a_zero_update_and_rejects_a_bad_bound():
    bounded, norms = norm_bound({"a": torch.zeros(2, 3)}, 1.0)
    assert torch.equal(bounded["a"], torch.zeros(2, 3)) and torch.equal(norms, torch.zeros(2))
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="max_norm"):
            norm_bound(three_clients(), bad)


def test_aggregate_bounds_norms_first_then_averages():
    out = aggregate(three_clients(), t([1.0, 2.0, 1.0]), name="fedavg", max_norm=1.0)
    # bounded clients (0.6, 0 | 0.8), (0.3, 0 | 0.4), (0.6, 0 | 0.8) with weights 1/4 1/2 1/4
    assert torch.allclose(out["a"], t([0.45, 0.0]), rtol=1e-14)
    assert torch.allclose(out["b"], t([[0.6]]), rtol=1e-14)
    # without the bound: a = 3/4 + 0.15 + 6/4 = 2.4
    assert torch.allclose(aggregate(three_clients(), t([1.0, 2.0, 1.0]))["a"], t([2.4, 0.0]), rtol=1e-14)


def test_aggregate_dispatches_by_name():
    u = three_clients()
    assert set(AGGREGATORS) == {"fedavg", "median", "trimmed_mean"}
    assert torch.equal(aggregate(u, None, name="median")["a"], t([3.0, 0.0]))
    # fedavg without weights weighs the clients equally: (3 + 0.3 + 6) / 3
    assert aggregate(u, None)["a"][0].item() == pytest.approx(3.1, rel=1e-14)
    # trim 0.34 of C=3 drops floor(1.02) = 1 value at each end: the middle of the bounded
    # b values 0.8, 0.4, 0.8, which is 0.8
    assert torch.allclose(aggregate(u, None, name="trimmed_mean", trim=0.34, max_norm=1.0)["b"], t([[0.8]]))
    with pytest.raises(ValueError, match="unknown aggregator 'krum'"):
        aggregate(u, None, name="krum")


def test_aggregators_do_not_modify_their_inputs():
    u, w = three_clients(), t([1.0, 2.0, 1.0])
    before = {k: v.clone() for k, v in u.items()}
    for name in AGGREGATORS:
        aggregate(u, w, name=name, trim=0.34, max_norm=1.0)
    norm_bound(u, 0.1)
    assert all(torch.equal(u[k], before[k]) for k in u) and torch.equal(w, t([1.0, 2.0, 1.0]))


# --------------------------------------------------------------------- server optimizer


def test_server_opt_config_defaults_and_validation():
    assert ServerOptConfig().lr == 1.0 and ServerOptConfig(kind="adam").lr == 1e-2
    assert ServerOptConfig(kind="adam", lr=0.1).lr == 0.1
    with pytest.raises(dataclasses.FrozenInstanceError):
        ServerOptConfig().lr = 2.0
    for kwargs, match in (({"kind": "rmsprop"}, "kind 'rmsprop'"), ({"lr": 0.0}, "lr"), ({"momentum": 1.0}, "momentum"),
                          ({"b2": -0.1}, "b2"), ({"tau": 0.0}, "tau")):
        with pytest.raises(ValueError, match=match):
            ServerOptConfig(**kwargs)


def test_sgd_lr1_momentum0_is_global_plus_update():
    opt = ServerOptimizer(ServerOptConfig())
    g, d = {"w": t([1.0, 2.0])}, {"w": t([0.5, -1.0])}
    assert torch.equal(opt.step(g, d)["w"], t([1.5, 1.0]))
    assert torch.equal(ServerOptimizer(ServerOptConfig(lr=0.5)).step(g, d)["w"], t([1.25, 1.5]))


def test_fedavgm_two_steps_by_hand():
    opt = ServerOptimizer(ServerOptConfig(kind="sgd", lr=0.5, momentum=0.9))
    x1 = opt.step({"w": t([0.0, 0.0])}, {"w": t([1.0, -2.0])})
    # buf = (1, -2); x = 0 + 0.5 * buf
    assert torch.allclose(x1["w"], t([0.5, -1.0]), rtol=1e-15)
    x2 = opt.step(x1, {"w": t([0.5, 0.5])})
    # buf = 0.9 * (1, -2) + (0.5, 0.5) = (1.4, -1.3); x = (0.5, -1) + 0.5 * buf
    assert torch.allclose(x2["w"], t([1.2, -1.65]), rtol=1e-15)
    assert opt.step_count == 2


def test_fedadam_one_and_two_steps_by_hand():
    opt = ServerOptimizer(ServerOptConfig(kind="adam"))  # lr 1e-2, b1 0.9, b2 0.99, tau 1e-3
    x1 = opt.step({"w": t([0.0, 1.0])}, {"w": t([0.1, -0.2])})
    # m = 0.1 Δ = (0.01, -0.02); v = 0.01 Δ² = (1e-4, 4e-4); sqrt(v) + tau = (0.011, 0.021)
    # no bias correction: x = x + 0.01 * (0.01 / 0.011, -0.02 / 0.021)
    assert torch.allclose(x1["w"], t([0.01 * 10 / 11, 1.0 - 0.01 * 20 / 21]), rtol=1e-14)
    x2 = opt.step(x1, {"w": t([0.1, 0.2])})
    # m = 0.9 (0.01, -0.02) + 0.1 (0.1, 0.2) = (0.019, 0.002)
    # v = 0.99 (1e-4, 4e-4) + 0.01 (0.01, 0.04) = (1.99e-4, 7.96e-4)
    expected = [x1["w"][0].item() + 0.01 * 0.019 / (math.sqrt(1.99e-4) + 1e-3),
                x1["w"][1].item() + 0.01 * 0.002 / (math.sqrt(7.96e-4) + 1e-3)]
    assert torch.allclose(x2["w"], t(expected), rtol=1e-14)


@pytest.mark.parametrize("cfg", [ServerOptConfig(), ServerOptConfig(momentum=0.9, lr=0.7), ServerOptConfig(kind="adam")])
def test_state_dict_round_trip_gives_identical_next_steps(cfg):
    gen = torch.Generator().manual_seed(0)
    x = {"emb.weight": torch.randn(4, 3, generator=gen), "bias": torch.randn(3, generator=gen)}
    deltas = [{k: torch.randn(v.shape, generator=gen) for k, v in x.items()} for _ in range(3)]
    a = ServerOptimizer(cfg)
    x = a.step(a.step(x, deltas[0]), deltas[1])
    raw = a.state_dict()  # kept as returned: checked below against the step taken after it
    # through safetensors and back, as a server checkpoint stores it
    state = {**raw, "tensors": load(save(raw["tensors"])) if raw["tensors"] else {}}
    b = ServerOptimizer(cfg)
    b.load_state_dict(state)
    assert b.step_count == 2
    xa, xb = a.step(x, deltas[2]), b.step(x, deltas[2])
    assert all(torch.equal(xa[k], xb[k]) for k in x)
    # the returned state is a copy: the step just taken did not change it
    again = ServerOptimizer(cfg)
    again.load_state_dict(raw)
    xc = again.step(x, deltas[2])
    assert all(torch.equal(xc[k], xa[k]) for k in x)


def test_load_state_dict_rejects_another_kind():
    adam = ServerOptimizer(ServerOptConfig(kind="adam"))
    adam.step({"w": t([0.0])}, {"w": t([1.0])})
    with pytest.raises(ValueError, match="kind 'adam'"):
        ServerOptimizer(ServerOptConfig(momentum=0.9)).load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match="unexpected tensor 'm/w'"):
        ServerOptimizer(ServerOptConfig(momentum=0.9)).load_state_dict({k: v for k, v in adam.state_dict().items() if k != "kind"})


@pytest.mark.parametrize("cfg", [ServerOptConfig(), ServerOptConfig(momentum=0.9), ServerOptConfig(kind="adam")])
def test_step_does_not_modify_its_inputs(cfg):
    opt = ServerOptimizer(cfg)
    g, d = {"w": t([1.0, 2.0])}, {"w": t([0.5, -1.0])}
    for _ in range(2):
        new = opt.step(g, d)
        assert torch.equal(g["w"], t([1.0, 2.0])) and torch.equal(d["w"], t([0.5, -1.0]))
        assert new["w"] is not g["w"] and new["w"] is not d["w"]


def test_step_rejects_mismatched_updates():
    opt = ServerOptimizer()
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        opt.step({"w": t([1.0]), "b": t([1.0])}, {"w": t([1.0])})
    with pytest.raises(ValueError, match="shape"):
        opt.step({"w": t([1.0])}, {"w": t([1.0, 2.0])})
