"""Selective aggregation: the sign-agreement mask and the masked mean."""

from __future__ import annotations

import torch

from fedlora.aggregation.selective import masked_weighted_mean, selective_mask


def test_selective_mask_semantics():
    ref = torch.tensor([1.0, -2.0, 0.0, 3.0, -1.0, 2.0])
    low = torch.tensor([0.5, 1.0, -4.0, 0.0, -0.1, -3.0])
    assert selective_mask(low, ref).tolist() == [True, False, True, True, True, False]


def test_masked_weighted_mean_semantics():
    h = torch.tensor([1.0, -1.0, 2.0, 0.0])
    lo1 = torch.tensor([3.0, 1.0, 4.0, 5.0])  # disagrees at index 1
    lo2 = torch.tensor([-1.0, -3.0, 6.0, -5.0])  # disagrees at index 0
    deltas, w = [h, lo1, lo2], [0.5, 0.25, 0.25]
    masks = [torch.ones(4, dtype=torch.bool), selective_mask(lo1, h), selective_mask(lo2, h)]
    out = masked_weighted_mean(deltas, w, masks, fallback=h)
    expect = torch.tensor(
        [
            (0.5 * 1 + 0.25 * 3) / 0.75,  # lo2 dropped, weights renormalised over the rest
            (0.5 * -1 + 0.25 * -3) / 0.75,  # lo1 dropped
            0.5 * 2 + 0.25 * 4 + 0.25 * 6,  # everyone agrees: the plain weighted mean
            0.5 * 0 + 0.25 * 5 + 0.25 * -5,  # reference 0: everyone kept
        ]
    )
    assert torch.allclose(out, expect)
    # all agree: exactly the plain weighted mean
    all_kept = [torch.ones(4, dtype=torch.bool)] * 3
    plain = sum(wi * d.double() for wi, d in zip(w, deltas)).float()
    assert torch.equal(masked_weighted_mean(deltas, w, all_kept, h), plain)
    # nobody keeps an element: it falls back to the reference
    none_at_2 = [torch.tensor([True, True, False, True])] * 3
    fb = torch.full((4,), 42.0)
    got = masked_weighted_mean(deltas, w, none_at_2, fb)
    assert got[2] == 42.0 and torch.equal(got[[0, 1, 3]], plain[[0, 1, 3]])
