"""Fleet composition: which client of a mixed-bitwidth fleet stores and sends at which bitwidth."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from fedlora.aggregation.quant import check_bits


def _parse_bits(b: Any) -> int:
    if isinstance(b, str) and b.strip().isdigit():
        b = int(b)
    return check_bits(b, key="clients.bitwidths")


def fleet_bitwidths(mix: Mapping[Any, float], num_clients: int, seed: int) -> list[int]:
    """Bitwidth of each of ``num_clients`` clients (index = client index), deterministic in ``seed``.

    Exact counts by the largest-remainder method (ties go to the higher bitwidth), then a seeded
    permutation so bitwidths are not correlated with client index (and hence with data shards).
    ``mix`` maps bitwidth → fraction; fractions must be ≥ 0 and sum to 1 (± 1e-6).
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 0:
        raise ValueError(f"clients.bitwidths: num_clients={num_clients!r} must be a non-negative integer")
    if not mix:
        raise ValueError("clients.bitwidths: the mix is empty; give at least one bitwidth with fraction 1")
    fracs: dict[int, float] = {}
    for b, f in mix.items():
        bits = _parse_bits(b)
        if bits in fracs:
            raise ValueError(f"clients.bitwidths: bitwidth {bits} given twice")
        try:
            f = float(f)
        except (TypeError, ValueError):
            raise ValueError(f"clients.bitwidths: fraction for {bits} bits is not a number: {f!r}") from None
        if not math.isfinite(f) or f < 0:
            raise ValueError(f"clients.bitwidths: fraction for {bits} bits must be finite and >= 0, got {f}")
        fracs[bits] = f
    total = sum(fracs.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"clients.bitwidths: fractions must sum to 1, got {total:.6g} ({fracs})")
    exact = {b: round(f * num_clients, 9) for b, f in fracs.items()}
    counts = {b: int(math.floor(x)) for b, x in exact.items()}
    left = num_clients - sum(counts.values())
    for b in sorted(fracs, key=lambda b: (-(exact[b] - counts[b]), -b))[:left]:
        counts[b] += 1
    ordered = [b for b in sorted(counts, reverse=True) for _ in range(counts[b])]
    perm = torch.randperm(num_clients, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return [ordered[i] for i in perm]
