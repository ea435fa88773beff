"""Client-level differential privacy: DP-FedAvg (McMahan et al. 2018, "Learning
Differentially Private Recurrent Language Models").

Each round the server (1) clips every participating client's whole update to L2 norm
<= clip_norm, (2) sums the clipped updates, (3) adds Gaussian noise N(0, (z * clip_norm)²)
to every coordinate of the sum (z = noise_multiplier), and (4) divides by the *expected*
number of clients per round, q * N, a fixed denominator. Adding or removing one client
changes the sum by at most clip_norm, so the sum's sensitivity is clip_norm, and the noisy
sum is the Gaussian mechanism with noise multiplier z. With clients sampled independently
with probability q each round (Poisson sampling), T rounds are T compositions of the
Poisson-subsampled Gaussian mechanism; the guarantee is about one whole client's data
(add-or-remove-one-client adjacency), not about one event.

Privacy accounting is Google's ``dp_accounting`` library (its RDP accountant), never code of
our own; :func:`noise_for_epsilon` only bisects over the library's epsilon.

Updates use the package's representation: {name: tensor of shape (C, *param_shape)} for a
round's C clients (see :mod:`perseq.federated.strategies`). Nothing here imports Flower.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .strategies import Params, _num_clients, norm_bound

# ------------------------------------------------------------------- the DP aggregation


def _check_noise(noise_multiplier: float) -> None:
    if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")


def _check_clip(clip_norm: float) -> None:
    if not (isinstance(clip_norm, (int, float)) and math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")


def clip_updates(updates: Params, clip_norm: float) -> tuple[Params, Tensor]:
    """Scale each client's whole update (all parameters together) to L2 norm <= clip_norm.

    updates: {name: (C, *shape)}. Returns (clipped {name: (C, *shape)}, norms before
    clipping (C,)); clients already within the bound are returned unchanged.
    """
    return norm_bound(updates, clip_norm)


def gaussian_noise_sum(
    clipped_sum: Params, noise_multiplier: float, clip_norm: float, generator: torch.Generator | None
) -> Params:
    """The sum of clipped updates plus N(0, (noise_multiplier * clip_norm)²) on every
    coordinate: the Gaussian mechanism on a sum whose sensitivity is clip_norm.

    The caller then divides by the *expected* number of clients per round (a fixed
    denominator, as in DP-FedAvg), not the number that showed up: the actual count is
    itself changed by adding or removing one client, so dividing by it would release it
    without noise.

    clipped_sum: {name: (*shape)}. generator: a CPU torch.Generator for reproducible noise
    (None = torch's global one); the noise is drawn on the CPU and moved to each tensor's
    device, so a seed gives the same noise on every machine. Returns {name: (*shape)}.
    """
    _check_noise(noise_multiplier)
    _check_clip(clip_norm)
    std = noise_multiplier * clip_norm
    if std == 0:
        return {name: s.clone() for name, s in clipped_sum.items()}
    out = {}
    for name, s in clipped_sum.items():
        if not s.is_floating_point():
            raise ValueError(f"clipped_sum[{name!r}] has dtype {s.dtype}; expected floating point")
        # drawn in float64 then cast: float32 noise would be fine too, but float64 keeps a
        # seed's noise identical whatever the parameters' dtype
        noise = torch.randn(s.shape, generator=generator, dtype=torch.float64) * std
        out[name] = s + noise.to(dtype=s.dtype, device=s.device)
    return out


def dp_aggregate(
    updates: Params,
    *,
    clip_norm: float | None,
    noise_multiplier: float,
    expected_clients: float,
    generator: torch.Generator | None = None,
) -> Params:
    """DP-FedAvg's server aggregate: clip each client, sum, add noise, divide by
    expected_clients (q * N, fixed).

    Unweighted on purpose: weighting by example counts would let one client's weight, and
    so its influence, grow past clip_norm (McMahan et al. bound the weights instead; we keep
    every client's weight 1). clip_norm None switches clipping off, which also voids the
    guarantee (the noise then has no sensitivity to be calibrated to) and is meant for
    ablations only: noise_multiplier must then be 0. With clip_norm None and
    noise_multiplier 0 this is exactly the plain unweighted mean when expected_clients == C.

    updates: {name: (C, *shape)}. Returns {name: (*shape)}.
    """
    _check_noise(noise_multiplier)
    if not (isinstance(expected_clients, (int, float)) and math.isfinite(expected_clients) and expected_clients > 0):
        raise ValueError(f"expected_clients must be a finite number > 0, got {expected_clients!r}")
    _num_clients(updates)
    if clip_norm is None:
        if noise_multiplier != 0:
            raise ValueError("noise_multiplier > 0 needs a clip_norm: noise is calibrated to the clipped sensitivity")
        clipped = updates
    else:
        clipped, _ = clip_updates(updates, clip_norm)
    total = {name: u.sum(dim=0) for name, u in clipped.items()}
    if noise_multiplier > 0:
        total = gaussian_noise_sum(total, noise_multiplier, clip_norm, generator)
    return {name: s / expected_clients for name, s in total.items()}


# ------------------------------------------------------------------------- accounting


def _check_accounting_args(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> None:
    _check_noise(noise_multiplier)
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if not (isinstance(rounds, int) and rounds >= 0):
        raise ValueError(f"rounds must be an int >= 0, got {rounds!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _dp_accounting():
    # imported here, not at the top: clipping and noising work without the accounting
    # library, which comes with the "federated" extra
    try:
        import dp_accounting
        import dp_accounting.rdp
    except ImportError as e:
        raise ImportError("privacy accounting needs the dp-accounting package: pip install 'perseq[federated]'") from e
    return dp_accounting


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """ε of ``rounds`` rounds of DP-FedAvg at the given δ, from dp_accounting's RDP
    accountant (its default orders, add-or-remove-one-client adjacency): the
    Poisson-subsampled Gaussian mechanism (rate ``sample_rate``, noise multiplier
    ``noise_multiplier``) composed ``rounds`` times.

    0 rounds spend nothing (0.0); noise_multiplier 0 gives no guarantee (inf).
    """
    _check_accounting_args(noise_multiplier, sample_rate, rounds, delta)
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    dp_accounting = _dp_accounting()
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), rounds
    )
    # at small orders the library's series may not converge; it then leaves those orders out
    # (ε stays a valid bound over the rest) and logs a warning per order, which would fill a
    # run's log every round: quiet them for this call
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        accountant = dp_accounting.rdp.RdpAccountant()
        accountant.compose(event)
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def noise_for_epsilon(
    target_eps: float, sample_rate: float, rounds: int, delta: float, *, rel_tol: float = 1e-3
) -> float:
    """The smallest noise multiplier (to a relative ``rel_tol``) whose :func:`epsilon` is
    <= target_eps, by bisection on log σ (ε decreases as σ grows). The returned σ always
    meets the target: it is the upper end of the final bracket.
    """
    if not (math.isfinite(target_eps) and target_eps > 0):
        raise ValueError(f"target_eps must be a finite number > 0, got {target_eps!r}")
    _check_accounting_args(1.0, sample_rate, rounds, delta)
    if rounds == 0:
        raise ValueError("rounds is 0: every noise multiplier spends ε = 0, there is nothing to solve for")
    lo, hi = 0.25, 1.0
    # widen the bracket until hi meets the target and lo does not
    while epsilon(hi, sample_rate, rounds, delta) > target_eps:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"no noise multiplier up to 1e6 reaches ε <= {target_eps} in {rounds} rounds at q={sample_rate}")
    while lo > 1e-3 and epsilon(lo, sample_rate, rounds, delta) <= target_eps:
        lo, hi = lo / 2, lo
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        if epsilon(mid, sample_rate, rounds, delta) <= target_eps:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass
class PrivacyLedger:
    """The privacy spent so far by a run with a fixed noise multiplier, client sample rate
    and δ: call :meth:`record` once per finished round, :meth:`epsilon` for ε so far.

    Mutable on purpose (it counts rounds); :meth:`to_dict` / :meth:`from_dict` carry it in a
    run's results and across a resume.
    """

    noise_multiplier: float
    sample_rate: float
    delta: float
    rounds: int = 0

    def __post_init__(self) -> None:
        _check_accounting_args(self.noise_multiplier, self.sample_rate, self.rounds, self.delta)

    def record(self, rounds: int = 1) -> None:
        """Count ``rounds`` more rounds (each one noisy aggregate released)."""
        if not (isinstance(rounds, int) and rounds >= 0):
            raise ValueError(f"rounds must be an int >= 0, got {rounds!r}")
        self.rounds += rounds

    def epsilon(self) -> float:
        """ε spent by the rounds recorded so far, at :attr:`delta`."""
        return epsilon(self.noise_multiplier, self.sample_rate, self.rounds, self.delta)

    def spent(self) -> tuple[float, float]:
        """(ε, δ) so far."""
        return self.epsilon(), self.delta

    def to_dict(self) -> dict:
        """The settings, rounds and (ε, δ), plain JSON values (an infinite ε is the string
        "inf", which JSON has no number for)."""
        eps = self.epsilon()
        return {**asdict(self), "epsilon": eps if math.isfinite(eps) else "inf", "accountant": "dp_accounting.rdp"}

    @classmethod
    def from_dict(cls, d: dict) -> PrivacyLedger:
        """A ledger from :meth:`to_dict`'s output (ε is recomputed, not trusted)."""
        return cls(noise_multiplier=d["noise_multiplier"], sample_rate=d["sample_rate"], delta=d["delta"], rounds=d["rounds"])
