"""Selective aggregation: keep only the low-bit elements that agree with the high-precision aggregate, then
average elementwise with per-element normalised weights."""

from __future__ import annotations

import torch


def selective_mask(delta: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Keep (True) the elements of a low-bit ``delta`` that do not point against ``reference``.

    Dropped exactly where the signs are strictly opposite (delta·reference < 0). Kept where they agree,
    where the reference is 0 (no opinion), and where the delta is 0 (quantised to zero: no direction).
    """
    return (delta * reference) >= 0


def masked_weighted_mean(
    deltas: list[torch.Tensor], weights: torch.Tensor | list[float], masks: list[torch.Tensor], fallback: torch.Tensor
) -> torch.Tensor:
    """Σ_k p_k m_k Δ_k / Σ_k p_k m_k elementwise (float64), ``fallback`` where no client keeps the element."""
    w = torch.as_tensor(weights, dtype=torch.float64).tolist()
    num = torch.zeros(fallback.shape, dtype=torch.float64)
    den = torch.zeros(fallback.shape, dtype=torch.float64)
    for p, d, m in zip(w, deltas, masks, strict=True):
        mk = m.to(torch.float64) * p
        num += mk * d.to(torch.float64)
        den += mk
    out = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), fallback.to(torch.float64))
    return out.to(fallback.dtype)
