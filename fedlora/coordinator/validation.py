"""Every client update is checked here before it can touch the global state."""

from __future__ import annotations

import math

import torch

from fedlora.aggregation.base import Tensors


class UpdateRejected(ValueError):
    """A client update failed validation; ``reason`` is short and goes to logs and metrics."""

    def __init__(self, client_id: str, reason: str) -> None:
        super().__init__(f"update from {client_id} rejected: {reason}")
        self.client_id = client_id
        self.reason = reason


def validate_update(
    client_id: str,
    deltas: Tensors,
    expected: dict[str, torch.Size],
    *,
    max_norm: float,
    num_examples: float | int | None,
) -> float:
    """Raise ``UpdateRejected`` unless ``deltas`` has exactly the expected keys, shapes, a float32 dtype,
    finite values and a global L2 norm ≤ ``max_norm``; return the norm."""
    missing = sorted(set(expected) - set(deltas))
    extra = sorted(set(deltas) - set(expected))
    if missing or extra:
        raise UpdateRejected(client_id, f"wrong keys (missing {missing[:3]}, unexpected {extra[:3]})")
    sq = 0.0
    for key, shape in expected.items():
        t = deltas[key]
        if not isinstance(t, torch.Tensor):
            raise UpdateRejected(client_id, f"{key}: not a tensor")
        if t.dtype != torch.float32:
            raise UpdateRejected(client_id, f"{key}: dtype {t.dtype}, expected torch.float32")
        if tuple(t.shape) != tuple(shape):
            raise UpdateRejected(client_id, f"{key}: shape {tuple(t.shape)}, expected {tuple(shape)}")
        if not torch.isfinite(t).all():
            raise UpdateRejected(client_id, f"{key}: non-finite values")
        sq += float(t.double().pow(2).sum())
    norm = math.sqrt(sq)
    if norm > max_norm:
        raise UpdateRejected(client_id, f"update norm {norm:.4g} exceeds clients.max_update_norm={max_norm:g}")
    if num_examples is None or not (num_examples > 0) or not math.isfinite(float(num_examples)):
        raise UpdateRejected(client_id, f"num_examples={num_examples!r} must be a positive number")
    return norm
