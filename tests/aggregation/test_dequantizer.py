"""The progressive dequantizer: better than plain dequantisation on held-out pairs, its ladder, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.aggregation.dequantizer import ProgressiveDequantizer
from fedlora.aggregation.quant import fake_quantize

LAYERS = [f"m.{i}.lora_B.weight" for i in range(3)]


def _draw_B(g: torch.Generator, n: int, d_out: int = 64, r: int = 8) -> list[tuple[str, torch.Tensor]]:
    """LoRA-B-like updates: Laplace entries (heavy tails, like raw gradient updates), log-normal row scales."""
    out = []
    for i in range(n):
        row_scale = torch.exp(0.5 * torch.randn(d_out, 1, generator=g))
        u = torch.rand(d_out, r, generator=g) - 0.5
        z = -torch.sign(u) * torch.log1p(-2 * u.abs())
        out.append((LAYERS[i % len(LAYERS)], row_scale * z * 1e-2))
    return out


def _lora_A(g: torch.Generator, r: int = 8, d_in: int = 32) -> dict[str, torch.Tensor]:
    return {k: (torch.rand(r, d_in, generator=g) * 2 - 1) / math.sqrt(d_in) for k in LAYERS}


def _product_error(dq, pairs, A, bits) -> tuple[float, float]:
    """(‖(B̂ − B)A‖_F with the dequantizer, the same with plain dequantisation) over all pairs."""
    num = den = 0.0
    for key, B in pairs:
        x = fake_quantize(B, bits)
        num += float(((dq.refine(x, bits) - B) @ A[key]).pow(2).sum())
        den += float(((x - B) @ A[key]).pow(2).sum())
    return math.sqrt(num), math.sqrt(den)


@pytest.fixture(scope="module")
def trained():
    g = torch.Generator().manual_seed(0)
    A = _lora_A(g)
    train, held_out = _draw_B(g, 32), _draw_B(g, 32)
    dq = ProgressiveDequantizer(seed=0)
    dq.ensure_rungs([32, 4, 2])
    stats = dq.fit(train, A, steps=150, lr=1e-2)
    return dq, A, train, held_out, stats


def test_dequantizer_beats_plain_dequantisation_on_held_out_pairs(trained):
    dq, A, _train, held_out, stats = trained
    assert stats["enabled"] == {2: True, 4: True}
    assert stats["loss_after"] < stats["loss_before"] == pytest.approx(1.0)
    assert stats["steps"] == 150 and dq.fits == 1
    ratios = {}
    for bits in (4, 2):
        refined, plain = _product_error(dq, held_out, A, bits)
        ratios[bits] = refined / plain
    print(f"held-out product-space error, dequantizer / plain: {ratios}")
    assert ratios[4] < 1.0
    assert ratios[2] < 0.95
    ev = dq.evaluate(held_out, A)  # squared, raw + product terms
    assert ev[4] < 1.0 and ev[2] < 0.9


def test_dequantizer_ladder_and_invariants(trained):
    dq, *_ = trained
    assert dq.ladder == [2, 4]
    assert dq.chain(2) == [2, 4] and dq.chain(4) == [4] and dq.chain(8) == [] and dq.chain(2, top=4) == [2]
    g = torch.Generator().manual_seed(5)
    B = torch.randn(16, 8, generator=g) * 1e-2
    B[3] = 0
    for bits in (4, 2):
        x = fake_quantize(B, bits)
        y = dq.refine(x, bits)
        assert y.shape == x.shape and torch.isfinite(y).all()
        assert torch.equal(y[x == 0], torch.zeros_like(y[x == 0]))  # zeros (and zero rows) stay zero
        assert (y.abs() <= x.abs().amax(dim=1, keepdim=True)).all()  # never beyond the row's absmax
        assert torch.allclose(dq.refine(-x, bits), -y)  # odd map
    # fp16/fp32 and rungs without a block pass through unchanged
    assert torch.equal(dq.refine(B, 32), B)
    assert torch.equal(dq.refine(B.half().float(), 16), B.half().float())
    x8 = fake_quantize(B, 8)
    assert torch.equal(dq.refine(x8, 8), x8)


def test_dequantizer_deterministic_and_state_round_trip(trained):
    _, A, train, held_out, _ = trained
    small = train[:6]
    d1, d2 = ProgressiveDequantizer(seed=3), ProgressiveDequantizer(seed=3)
    for d in (d1, d2):
        d.ensure_rungs([32, 2])
        d.fit(small, A, steps=20)
    sd = d1.state_dict()
    assert all(torch.equal(v, d2.state_dict()[k]) for k, v in sd.items() if isinstance(v, torch.Tensor))
    assert len(d1.replay) == 6 and d1.fits == 1
    fresh = ProgressiveDequantizer(seed=99)
    fresh.load_state_dict(sd)  # recreates the blocks from the extra state
    assert fresh.ladder == d1.ladder and fresh.enabled == d1.enabled and fresh.fits == 1 and len(fresh.replay) == 6
    x = fake_quantize(held_out[0][1], 2)
    assert torch.equal(fresh.refine(x, 2), d1.refine(x, 2))


def test_dequantizer_replay_buffer_is_capped():
    g = torch.Generator().manual_seed(1)
    d = ProgressiveDequantizer(seed=0, replay_size=5)
    d.ensure_rungs([2])
    for _ in range(3):
        d.fit(_draw_B(g, 3, d_out=8), None, steps=2)
    assert len(d.replay) == 5 and d.fits == 3


def test_dequantizer_steps_zero_is_identity():
    g = torch.Generator().manual_seed(2)
    d = ProgressiveDequantizer(seed=0)
    d.ensure_rungs([4, 2])
    d.fit(_draw_B(g, 3, d_out=8), None, steps=0)
    x = fake_quantize(torch.randn(8, 8, generator=g), 2)
    assert torch.equal(d.refine(x, 2), x)
