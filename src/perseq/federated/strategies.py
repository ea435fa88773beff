"""Server-side aggregation of client updates, as pure functions, plus a server optimizer.

Representation (the whole federated package uses it): a model's parameters, or one
client's update, is a ``dict[str, Tensor]`` (name -> tensor). An update is the client's
local weights minus the global weights it started from. A round's updates are *stacked*
per parameter: ``updates[name]`` has shape ``(C, *param_shape)`` for the round's C
clients, and the clients' weights (example counts) are a float tensor of shape ``(C,)``.

Reading order: input checks, the aggregators (FedAvg, coordinate-wise median, trimmed
mean), per-client norm bounding, the registry and :func:`aggregate` that combines them,
then :class:`ServerOptimizer` (FedAvg / FedAvgM / FedAdam server steps).

No function here modifies its inputs; each returns new tensors. Nothing here imports
Flower: these are the pure-torch pieces that a Flower strategy or the simulator calls.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

Params = dict[str, Tensor]


# --------------------------------------------------------------------------- input checks


def _num_clients(updates: Params) -> int:
    """C, the leading size shared by every stacked update; ValueError if they disagree."""
    if not updates:
        raise ValueError("updates is empty: expected {name: tensor of shape (C, *param_shape)}")
    sizes = {}
    for name, u in updates.items():
        if not isinstance(u, Tensor):
            raise ValueError(f"updates[{name!r}] is a {type(u).__name__}, expected a torch.Tensor")
        if u.dim() == 0:
            raise ValueError(f"updates[{name!r}] is a scalar; stacked updates have shape (C, *param_shape)")
        if not u.is_floating_point():
            raise ValueError(f"updates[{name!r}] has dtype {u.dtype}; updates must be floating point")
        sizes[name] = u.shape[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(f"stacked updates disagree on the number of clients (dim 0): {sizes}")
    c = next(iter(sizes.values()))
    if c == 0:
        raise ValueError("updates hold 0 clients (dim 0 is empty)")
    return c


def _check_weights(weights: Tensor, c: int) -> Tensor:
    """The weights as a (C,) float64 tensor normalised to sum 1 (float64 so that many
    clients with very different counts still sum exactly enough)."""
    if not isinstance(weights, Tensor):
        weights = torch.as_tensor(weights)
    if weights.shape != (c,):
        raise ValueError(f"weights has shape {tuple(weights.shape)}, expected ({c},): one per client")
    w = weights.detach().to(torch.float64)
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"weights must be finite and >= 0, got {weights.tolist()}")
    total = w.sum()
    if total <= 0:
        raise ValueError("weights are all zero: there is nothing to average")
    return w / total


def _per_client(x: Tensor, like: Tensor) -> Tensor:
    """A (C,) tensor reshaped to broadcast against ``like`` of shape (C, *param_shape)."""
    return x.to(dtype=like.dtype, device=like.device).reshape((-1,) + (1,) * (like.dim() - 1))


# ---------------------------------------------------------------------------- aggregators


def fedavg(updates: Params, weights: Tensor) -> Params:
    """Weighted mean over clients: sum_c w_c u_c / sum_c w_c.

    updates: {name: (C, *shape)}; weights: (C,), >= 0, not all zero (ValueError otherwise).
    Returns {name: (*shape)}.
    """
    w = _check_weights(weights, _num_clients(updates))
    return {name: (_per_client(w, u) * u).sum(dim=0) for name, u in updates.items()}


def _sorted_over_clients(u: Tensor) -> Tensor:
    # sort rather than torch.quantile: quantile refuses inputs over 2**24 elements, which a
    # stacked embedding table (C x items x dim) passes easily
    return torch.sort(u, dim=0).values


def coordinate_median(updates: Params, weights: Tensor | None = None) -> Params:
    """Per-coordinate median over clients (Yin et al. 2018), robust to a minority of bad
    clients.

    Unweighted: ``weights`` is accepted so that every aggregator takes the same arguments,
    and ignored (a weighted median would let one client with a huge example count decide
    alone, which is what a robust rule is meant to prevent). For an even C the result is
    the mean of the two middle values, i.e. ``torch.quantile(u, 0.5, dim=0)`` semantics
    (linear interpolation), not torch.median's lower middle value.

    updates: {name: (C, *shape)}. Returns {name: (*shape)}.
    """
    c = _num_clients(updates)
    out = {}
    for name, u in updates.items():
        s = _sorted_over_clients(u)
        out[name] = s[c // 2] if c % 2 == 1 else (s[c // 2 - 1] + s[c // 2]) / 2
    return out


def _num_trimmed(trim: float, c: int) -> int:
    if not (isinstance(trim, (int, float)) and 0 <= trim < 0.5):
        raise ValueError(f"trim must be in [0, 0.5), got {trim!r}")
    # the small slack keeps e.g. 0.29 * 100 = 28.999999999999996 from flooring to 28
    return math.floor(trim * c + 1e-9)


def trimmed_mean(updates: Params, trim: float) -> Params:
    """Per coordinate, drop the ``floor(trim * C)`` largest and as many smallest client
    values, and average the rest (Yin et al. 2018). Unweighted, like the median.

    trim in [0, 0.5) (ValueError otherwise), so at least one value always remains; trim 0
    is the plain unweighted mean. updates: {name: (C, *shape)}. Returns {name: (*shape)}.
    """
    c = _num_clients(updates)
    k = _num_trimmed(trim, c)
    return {name: _sorted_over_clients(u)[k : c - k].mean(dim=0) for name, u in updates.items()}


# ------------------------------------------------------------------------- norm bounding


def client_norms(updates: Params) -> Tensor:
    """Each client's global L2 norm over all its parameters together: shape (C,), float32
    or wider (the sum of squares is accumulated in at least float32)."""
    _num_clients(updates)
    acc = None
    for u in updates.values():
        wide = u.to(torch.promote_types(u.dtype, torch.float32))
        sq = wide.pow(2).flatten(start_dim=1).sum(dim=1)
        acc = sq if acc is None else acc + sq.to(acc.dtype)
    return acc.sqrt()


def norm_bound(updates: Params, max_norm: float) -> tuple[Params, Tensor]:
    """Scale each client's whole update down to global L2 norm <= ``max_norm``.

    A client over the bound is multiplied by max_norm / norm (its direction kept, as in
    DP-FedAvg's clipping and Sun et al. 2019's norm bounding); a client at or under it is
    returned unchanged (the same values, bit for bit). The norm is taken over all of the
    client's parameters together, not per tensor, so the bound holds for the whole update.

    updates: {name: (C, *shape)}; max_norm: finite, > 0.
    Returns (bounded updates {name: (C, *shape)}, norms before bounding (C,)).
    """
    if not (isinstance(max_norm, (int, float)) and math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}")
    norms = client_norms(updates)
    # torch.where, not min(1, max_norm / norm): clients under the bound must not be touched
    # by a rounding of max_norm / norm that lands just below 1
    scale = torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms))
    bounded = {name: u * _per_client(scale, u) for name, u in updates.items()}
    return bounded, norms


# --------------------------------------------------------------------- registry, combined

# Every entry is called as fn(updates, weights, trim): the same arguments for all, so a
# config can name the rule. weights may be None (fedavg then weighs clients equally).
Aggregator = Callable[[Params, Tensor | None, float], Params]


def _fedavg_entry(updates: Params, weights: Tensor | None, trim: float) -> Params:
    if weights is None:
        weights = torch.ones(_num_clients(updates), dtype=torch.float64)
    return fedavg(updates, weights)


def _median_entry(updates: Params, weights: Tensor | None, trim: float) -> Params:
    return coordinate_median(updates, weights)


def _trimmed_mean_entry(updates: Params, weights: Tensor | None, trim: float) -> Params:
    return trimmed_mean(updates, trim)


AGGREGATORS: dict[str, Aggregator] = {
    "fedavg": _fedavg_entry,
    "median": _median_entry,
    "trimmed_mean": _trimmed_mean_entry,
}


def aggregate(
    updates: Params,
    weights: Tensor | None,
    *,
    name: str = "fedavg",
    trim: float = 0.1,
    max_norm: float | None = None,
) -> Params:
    """Bound each client's norm to ``max_norm`` (when set), then aggregate with the rule
    ``name`` from :data:`AGGREGATORS`. ``trim`` is used by "trimmed_mean" only; ``weights``
    (C,) by "fedavg" only (None = equal weights).

    updates: {name: (C, *shape)}. Returns {name: (*shape)}.
    """
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; choose one of {sorted(AGGREGATORS)}")
    if max_norm is not None:
        updates, _ = norm_bound(updates, max_norm)
    return AGGREGATORS[name](updates, weights, trim)


# ----------------------------------------------------------------------- server optimizer

SERVER_OPTIMIZERS = ("sgd", "adam")
_DEFAULT_LR = {"sgd": 1.0, "adam": 1e-2}


@dataclass(frozen=True)
class ServerOptConfig:
    """How the server applies the aggregated update Δ to the global weights x.

    kind "sgd": x + lr * Δ (FedAvg when lr 1 and momentum 0); with momentum it is FedAvgM
    (Hsu et al. 2019): buf = momentum * buf + Δ, x + lr * buf.
    kind "adam": FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization", Alg. 2):
    m = b1 m + (1 - b1) Δ; v = b2 v + (1 - b2) Δ²; x + lr * m / (sqrt(v) + tau).
    lr None picks the kind's default: 1.0 for sgd, 1e-2 for adam (resolved at construction,
    so ``cfg.lr`` is always a number). momentum is used by sgd only; b1, b2, tau by adam only.
    """

    kind: str = "sgd"
    lr: float | None = None
    momentum: float = 0.0
    b1: float = 0.9
    b2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"server optimizer kind {self.kind!r} is unknown; choose one of {list(SERVER_OPTIMIZERS)}")
        if self.lr is None:
            object.__setattr__(self, "lr", _DEFAULT_LR[self.kind])
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"server lr must be a finite number > 0, got {self.lr!r}")
        for field, value in (("momentum", self.momentum), ("b1", self.b1), ("b2", self.b2)):
            if not 0 <= value < 1:
                raise ValueError(f"server optimizer {field} must be in [0, 1), got {value!r}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"server optimizer tau must be a finite number > 0, got {self.tau!r}")


def _check_same_layout(reference: Params, other: Params, what: str = "aggregated_update") -> None:
    if set(reference) != set(other):
        missing, extra = sorted(set(reference) - set(other)), sorted(set(other) - set(reference))
        raise ValueError(f"{what} does not match global_params: missing {missing}, extra {extra}")
    for name, x in reference.items():
        if not x.is_floating_point():
            raise ValueError(f"global_params[{name!r}] has dtype {x.dtype}; the server optimizer steps floating-point tensors only")
        if other[name].shape != x.shape:
            raise ValueError(f"{what}[{name!r}] has shape {tuple(other[name].shape)}, global_params has {tuple(x.shape)}")


class ServerOptimizer:
    """Applies aggregated updates to the global weights, keeping the momentum / Adam
    buffers between rounds.

    :meth:`step` is pure with respect to its arguments (returns a new dict, never writes
    into them); only the optimizer's own buffers change. :meth:`state_dict` /
    :meth:`load_state_dict` save and restore those buffers and the step count exactly, so
    a resumed server takes the same next step as one that never stopped.

    FedAdam here follows Reddi et al. 2021 as written: no bias correction of m and v (the
    paper's Algorithm 2 has none, unlike Adam), so the first rounds' steps are not rescaled.
    Both moments start at zero (the paper allows any v_{-1} >= tau²; zero is the common
    choice, e.g. Flower's FedAdam).
    """

    def __init__(self, config: ServerOptConfig | None = None) -> None:
        self.config = config if config is not None else ServerOptConfig()
        self.step_count = 0
        # buffer name -> {param name -> tensor}; created at the first step, shaped like the
        # parameters: "momentum" for FedAvgM, "m" and "v" for FedAdam, none for plain sgd
        self._buffers: dict[str, Params] = {}

    def _buffer_names(self) -> tuple[str, ...]:
        if self.config.kind == "adam":
            return ("m", "v")
        return ("momentum",) if self.config.momentum > 0 else ()

    def step(self, global_params: Params, aggregated_update: Params) -> Params:
        """New global weights from the current ones and this round's aggregated update.

        global_params and aggregated_update: {name: tensor}, the same names and shapes.
        Returns {name: tensor}, new tensors (the inputs are left as they were).
        """
        _check_same_layout(global_params, aggregated_update)
        cfg = self.config
        for buf in self._buffer_names():
            if buf not in self._buffers:
                self._buffers[buf] = {n: torch.zeros_like(x) for n, x in global_params.items()}
            else:
                _check_same_layout(global_params, self._buffers[buf], what=f"the optimizer's {buf!r} buffer")
        new = {}
        for name, x in global_params.items():
            delta = aggregated_update[name].to(dtype=x.dtype, device=x.device)
            if cfg.kind == "adam":
                m = self._buffers["m"][name].mul_(cfg.b1).add_(delta, alpha=1 - cfg.b1)
                v = self._buffers["v"][name].mul_(cfg.b2).addcmul_(delta, delta, value=1 - cfg.b2)
                direction = m / (v.sqrt() + cfg.tau)
            elif cfg.momentum > 0:
                direction = self._buffers["momentum"][name].mul_(cfg.momentum).add_(delta)
            else:
                direction = delta
            new[name] = x + cfg.lr * direction
        self.step_count += 1
        return new

    def state_dict(self) -> dict:
        """{"kind", "steps", "tensors"}: "tensors" is a flat {"<buffer>/<param name>": tensor}
        dict of copies (savable as is with safetensors); kind and steps are plain values."""
        tensors = {f"{buf}/{name}": t.clone() for buf, params in self._buffers.items() for name, t in params.items()}
        return {"kind": self.config.kind, "steps": self.step_count, "tensors": tensors}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (copies it, so the caller's dict stays
        theirs). "kind" may be left out (a server that saves only tensors and steps); when
        present it must match this optimizer's."""
        if not {"steps", "tensors"} <= set(state):
            raise ValueError(f"server optimizer state needs the keys steps and tensors; got {sorted(state)}")
        if state.get("kind", self.config.kind) != self.config.kind:
            raise ValueError(f"server optimizer state is for kind {state['kind']!r}, this optimizer is {self.config.kind!r}")
        expected = self._buffer_names()
        buffers: dict[str, Params] = {}
        for key, t in state["tensors"].items():
            buf, sep, name = key.partition("/")
            if not sep or buf not in expected:
                raise ValueError(f"unexpected tensor {key!r} in server optimizer state; expected "
                                 f"'<buffer>/<param>' with buffer in {list(expected)}")
            buffers.setdefault(buf, {})[name] = t.clone()
        if buffers and set(buffers) != set(expected):
            raise ValueError(f"server optimizer state has buffers {sorted(buffers)}, expected {list(expected)}")
        if not buffers and int(state["steps"]) > 0 and expected:
            raise ValueError(f"server optimizer state says {state['steps']} steps were taken but holds no "
                             f"{'/'.join(expected)} buffers")
        self.step_count = int(state["steps"])
        self._buffers = buffers
