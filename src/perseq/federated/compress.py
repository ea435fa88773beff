"""Smaller uploads: a client's update quantized to 8 bits before it leaves the device.

A phone's uplink is the scarce direction, and a dense float32 update of ML-1M's Mamba4Rec is
1.2 MB per round. With ``federated.update_bits: 8`` each tensor's update is sent row by row
(a row = the last dimension; a 1-d tensor is one row) as

    codes  uint8, one per entry      code = floor((x - lo) / step + u),  u ~ U[0, 1)
    lo     float32 per row           the row's minimum
    step   float32 per row           (max - min) / 255

and the server decodes x̂ = lo + step · code. The rounding is stochastic, so x̂ is an
unbiased estimate of x (E[x̂] = x entry by entry) with an error below one ``step``: averaged
over a round's clients the quantization noise shrinks as the clients grow in number, where
round-to-nearest would bias every small coordinate towards its row's grid. A row of
constant values is exact. The upload is about a quarter of float32's (1 byte per entry plus
8 per row); the download (the global weights) stays float32.

What the codes reveal is what the float update reveals (the item rows a user touched still
move most): client-level DP or secure aggregation hides that, not compression. With DP, the
server clips the decoded update, so the sensitivity bound, and the ε, are unchanged.

Unbiasedness is a property of the mean: FedAvg and FedProx average the decoded updates, so the
rounding noise cancels in expectation. The robust aggregators do not average: a coordinate's
median or trimmed mean of noisy values is not the median of the exact ones, and the
update-norm bound clips a decoded update whose norm the noise has raised. Combined with
8-bit uploads they are therefore slightly biased; the bias is below one ``step`` per entry,
and it is not measured here.

Offered by the in-process simulator (both engines); the Flower apps send float32.
"""
from __future__ import annotations

import numpy as np
import torch

UPDATE_BITS = (32, 8)
_LEVELS = 255  # uint8 codes 0..255


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as (rows, last dimension); a scalar is one row of one."""
    return x.reshape(1, -1) if x.dim() <= 1 else x.reshape(-1, x.shape[-1])


def quantize(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x -> (codes uint8 shaped as x's rows, lo (rows,), step (rows,)), stochastic rounding.
    On the CPU (``generator`` is a CPU one), so the rounding is the same whatever device
    trained the update. Rows whose range is below float32's smallest normal (~1e-38) lose
    the guarantees to underflow."""
    rows = _rows(x.detach().float().cpu())
    lo = rows.min(dim=1).values
    step = (rows.max(dim=1).values - lo) / _LEVELS
    scaled = (rows - lo[:, None]) / step.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    scaled = torch.where(step[:, None] > 0, scaled, torch.zeros_like(scaled))  # a constant row: every code 0, exact
    u = torch.rand(scaled.shape, generator=generator)
    codes = torch.floor(scaled + u).clamp_(0, _LEVELS).to(torch.uint8)
    return codes, lo, step


def dequantize(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return (lo[:, None] + step[:, None] * codes.float()).reshape(shape)


def _roundtrip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if x.numel() == 0:
        return x
    return dequantize(*quantize(x, generator), x.shape).to(x.device, x.dtype)


def compress_update(delta: dict[str, torch.Tensor], bits: int, seed: int) -> dict[str, torch.Tensor]:
    """What the server decodes from a client's update sent at ``bits`` (32: the update
    itself). ``seed`` draws the rounding (the simulator derives it from the run's seed, the
    round and the client, so a resumed run rounds exactly as an uninterrupted one)."""
    if bits == 32:
        return delta
    if bits != 8:
        raise ValueError(f"federated.update_bits={bits!r}; valid: {', '.join(map(str, UPDATE_BITS))}")
    generator = torch.Generator().manual_seed(seed)
    return {n: _roundtrip(d, generator) for n, d in delta.items()}


def update_bytes(shapes: dict[str, torch.Size], bits: int) -> int:
    """Bytes of one update of tensors shaped ``shapes`` sent at ``bits``."""
    if bits == 32:
        return sum(4 * int(np.prod(s, dtype=np.int64)) for s in shapes.values())
    total = 0
    for s in shapes.values():
        numel = int(np.prod(s, dtype=np.int64))
        rows = 0 if numel == 0 else 1 if len(s) <= 1 else numel // s[-1]
        total += numel + 8 * rows  # a code per entry; lo and step (float32) per row
    return total


def round_seed(seed: int, round_: int, client: int) -> int:
    """The rounding seed of ``client``'s update in round ``round_``."""
    return int(np.random.SeedSequence([seed, round_, client, 8]).generate_state(1)[0])
