"""Bitwidth-heterogeneous aggregation: fleet composition, progressive dequantizer, selective aggregation,
and the BitwidthAggregator wrapper around an inner strategy."""

from __future__ import annotations

import io
import math
from collections import Counter

import pytest
import torch

from fedlora.aggregation import ClientUpdate, Strategy, available, create
from fedlora.aggregation.bitwidth import (
    BitwidthAggregator,
    ProgressiveDequantizer,
    fleet_bitwidths,
    masked_weighted_mean,
    selective_mask,
)
from fedlora.aggregation.quant import fake_quantize


# ---- fleet composition ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mix", "n", "want"),
    [
        ({32: 0.5, 8: 0.5}, 10, {32: 5, 8: 5}),
        ({32: 0.5, 4: 0.5}, 7, {32: 4, 4: 3}),  # tie on the remainder: the higher bitwidth gets it
        ({32: 0.5, 8: 0.25, 4: 0.25}, 10, {32: 5, 8: 3, 4: 2}),
        ({32: 0.3, 16: 0.3, 2: 0.4}, 10, {32: 3, 16: 3, 2: 4}),
        ({32: 0.34, 8: 0.33, 2: 0.33}, 100, {32: 34, 8: 33, 2: 33}),
        ({32: 0.1, 2: 0.9}, 3, {32: 0, 2: 3}),
        ({4: 1.0}, 6, {4: 6}),
    ],
)
def test_fleet_bitwidths_exact_counts(mix, n, want):
    bits = fleet_bitwidths(mix, n, seed=0)
    assert len(bits) == n
    assert Counter(bits) == Counter({b: c for b, c in want.items() if c})


def test_fleet_bitwidths_deterministic_and_permuted():
    mix = {32: 0.5, 8: 0.25, 2: 0.25}
    a = fleet_bitwidths(mix, 40, seed=7)
    assert a == fleet_bitwidths(mix, 40, seed=7)
    assert a != fleet_bitwidths(mix, 40, seed=8)
    assert a != sorted(a, reverse=True)  # not simply grouped by index
    assert Counter(a) == Counter(fleet_bitwidths(mix, 40, seed=8))
    assert fleet_bitwidths({"32": 0.5, "4": 0.5}, 4, seed=0).count(4) == 2  # Hydra may give string keys
    assert fleet_bitwidths(mix, 0, seed=0) == []


@pytest.mark.parametrize(
    ("mix", "n"),
    [
        ({32: 0.5, 3: 0.5}, 4),
        ({32: 0.5, 8: 0.4}, 4),
        ({32: 1.2, 8: -0.2}, 4),
        ({}, 4),
        ({32: float("nan")}, 4),
        ({32: 1.0}, -1),
        ({True: 1.0}, 2),
    ],
)
def test_fleet_bitwidths_validation(mix, n):
    with pytest.raises(ValueError, match="clients.bitwidths"):
        fleet_bitwidths(mix, n, seed=0)


# ---- progressive dequantizer ---------------------------------------------------------------------------
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
    assert stats["fit_s"] > 0
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


# ---- selective aggregation -----------------------------------------------------------------------------
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


# ---- the wrapper ---------------------------------------------------------------------------------------
D_OUT, R, D_IN = 12, 4, 10
KEYS_B = [f"base.l{i}.q.lora_B.weight" for i in range(2)]
HEAD = "classifier.weight"


def _global(g):
    state = {}
    for i in range(2):
        state[f"base.l{i}.q.lora_A.weight"] = (torch.rand(R, D_IN, generator=g) * 2 - 1) / math.sqrt(D_IN)
        state[f"base.l{i}.q.lora_B.weight"] = torch.randn(D_OUT, R, generator=g) * 0.1
    state[HEAD] = torch.randn(2, 6, generator=g) * 0.1
    return state


def _updates(g, bits, keys, scale=0.05):
    sig = {k: torch.randn(*shape, generator=g) * scale for k, shape in keys.items()}
    ups = []
    for i, b in enumerate(bits):
        d = {k: fake_quantize(s + 0.5 * scale * torch.randn(s.shape, generator=g), b) for k, s in sig.items()}
        ups.append(ClientUpdate(f"c{i}", d, num_examples=50 + 17 * i, meta={"bits": b}))
    return ups


def _shared(strategy, state):
    return {k: v.shape for k, v in state.items() if strategy.shares_key(k)}


def _equal(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("inner_name", ["ffa", "fedavg"])
@pytest.mark.parametrize("method", ["naive", "grouped", "progressive"])
def test_all_full_precision_fleet_equals_inner_exactly(inner_name, method):
    g = torch.Generator().manual_seed(0)
    inner = create(inner_name)
    state = _global(g)
    ups = _updates(g, [32, 32, 32], _shared(inner, state))
    agg = BitwidthAggregator(create(inner_name), method, seed=0, dequantizer_steps=5)
    assert _equal(agg.aggregate(state, ups), inner.aggregate(state, ups))


@pytest.mark.parametrize("inner_name", available())
def test_wraps_every_registered_strategy(inner_name):
    g = torch.Generator().manual_seed(9)
    inner = create(inner_name)
    state = _global(g)
    shapes = _shared(inner, state)
    full = _updates(g, [32, 32], shapes)
    mixed = _updates(g, [32, 16, 8, 4, 2], shapes)
    for method in ("naive", "grouped", "progressive"):
        agg = BitwidthAggregator(create(inner_name), method, dequantizer_steps=5)
        assert _equal(agg.aggregate(state, full), inner.aggregate(state, full))
        out = agg.aggregate(state, mixed)
        assert set(out) == set(inner.aggregate(state, mixed)) and all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("inner_name", ["ffa", "fedavg"])
def test_naive_equals_inner_on_mixed_fleet(inner_name):
    g = torch.Generator().manual_seed(1)
    inner = create(inner_name)
    state = _global(g)
    ups = _updates(g, [32, 8, 4, 2, 16], _shared(inner, state))
    agg = BitwidthAggregator(create(inner_name), "naive")
    assert _equal(agg.aggregate(state, ups), inner.aggregate(state, ups))
    assert agg.last_stats["method"] == "naive" and agg.last_stats["bits_counts"] == {32: 1, 16: 1, 8: 1, 4: 1, 2: 1}


def test_grouped_semantics():
    g = torch.Generator().manual_seed(2)
    inner = create("ffa")
    state = _global(g)
    ups = _updates(g, [32, 4, 4, 4], _shared(inner, state))
    p = inner.weights(ups).tolist()
    out = BitwidthAggregator(create("ffa"), "grouped").aggregate(state, ups)
    for k in _shared(inner, state):
        hi = ups[0].deltas[k].double()
        lo = sum(p[i] * ups[i].deltas[k].double() for i in (1, 2, 3)) / sum(p[1:])
        assert torch.allclose(out[k].double(), state[k].double() + 0.5 * hi + 0.5 * lo, atol=1e-6)
    # group_weighting="examples" is algebraically the plain weighted mean (naive)
    ex = BitwidthAggregator(create("ffa"), "grouped", group_weighting="examples").aggregate(state, ups)
    naive = inner.aggregate(state, ups)
    assert all(torch.allclose(ex[k], naive[k], atol=1e-6) for k in naive)


def test_progressive_selective_semantics_without_dequantizer_training():
    # dequantizer_steps=0: refinement is the identity, so the result is exactly the masked mean
    g = torch.Generator().manual_seed(3)
    inner = create("ffa")
    state = _global(g)
    ups = _updates(g, [32, 16, 4, 2], _shared(inner, state))
    agg = BitwidthAggregator(create("ffa"), "progressive", dequantizer_steps=0)
    out = agg.aggregate(state, ups)
    p = inner.weights(ups)
    for k in _shared(inner, state):
        h = ups[0].deltas[k]  # the only 32-bit client is the reference
        deltas = [u.deltas[k] for u in ups]
        masks = [torch.ones(h.shape, dtype=torch.bool)] + [selective_mask(d, h) for d in deltas[1:]]
        want = state[k] + masked_weighted_mean(deltas, p, masks, h)
        assert torch.allclose(out[k], want, atol=1e-7)
        # elements where every low-bit client disagrees come out as the reference's
        none = ~torch.stack(masks[1:]).any(dim=0)
        assert torch.allclose(out[k][none], (state[k] + h)[none], atol=1e-7)
    st = agg.last_stats
    assert st["method"] == "progressive" and st["fallback"] is None
    assert set(st["kept_fraction"]) == {16, 4, 2} and all(0 < v <= 1 for v in st["kept_fraction"].values())
    assert st["dequantizer_fit_s"] >= 0


def test_progressive_ablation_both_off_is_naive():
    g = torch.Generator().manual_seed(4)
    inner = create("ffa")
    state = _global(g)
    ups = _updates(g, [32, 8, 2], _shared(inner, state))
    agg = BitwidthAggregator(create("ffa"), "progressive", dequantize=False, selective=False)
    out, naive = agg.aggregate(state, ups), inner.aggregate(state, ups)
    assert all(torch.allclose(out[k], naive[k], atol=1e-7) for k in naive)


def test_progressive_falls_back_to_naive_without_high_precision_clients():
    g = torch.Generator().manual_seed(5)
    inner = create("ffa")
    state = _global(g)
    ups = _updates(g, [8, 4, 2], _shared(inner, state))
    agg = BitwidthAggregator(create("ffa"), "progressive", dequantizer_steps=5)
    assert _equal(agg.aggregate(state, ups), inner.aggregate(state, ups))
    assert "naive" in agg.last_stats["fallback"]


def test_progressive_over_ffa_state_dict_round_trip():
    g = torch.Generator().manual_seed(6)
    state = _global(g)
    inner = create("ffa")
    shapes = _shared(inner, state)
    agg = BitwidthAggregator(create("ffa"), "progressive", seed=1, dequantizer_steps=15)
    state = agg.aggregate(state, _updates(g, [32, 32, 4, 2], shapes))
    assert agg.dequantizer.ladder == [2, 4] and len(agg.dequantizer.replay) > 0
    ck = agg.state_dict()
    assert set(ck) >= {"inner", "dequantizer"}
    buf = io.BytesIO()
    torch.save(ck, buf)  # what the coordinator's checkpoint does
    buf.seek(0)
    restored = BitwidthAggregator(create("ffa"), "progressive", seed=1, dequantizer_steps=15)
    restored.load_state_dict(torch.load(buf, weights_only=False))
    ck2 = restored.state_dict()
    w1, w2 = ck["dequantizer"], ck2["dequantizer"]
    assert set(w1) == set(w2) and all(torch.equal(w1[k], w2[k]) for k in w1 if isinstance(w1[k], torch.Tensor))
    nxt = _updates(g, [32, 4, 2, 2], shapes)
    assert _equal(agg.aggregate(state, nxt), restored.aggregate(state, nxt))
    with pytest.raises(ValueError, match="method"):
        BitwidthAggregator(create("ffa"), "naive").load_state_dict(ck)
    with pytest.raises(ValueError, match="missing"):
        restored.load_state_dict({"inner": {}})


def test_wrapper_delegates_to_inner():
    inner = create("ffa")
    agg = BitwidthAggregator(inner, "progressive")
    assert isinstance(agg, Strategy)
    assert agg.trains == inner.trains and agg.shares == inner.shares and agg.has_global_model
    assert agg.train_head == inner.train_head and agg.weighting == inner.weighting
    g = torch.Generator().manual_seed(7)
    state = _global(g)
    for k in state:
        assert agg.trains_key(k) == inner.trains_key(k) and agg.shares_key(k) == inner.shares_key(k)
        assert agg.personal_key(k) == inner.personal_key(k)
    assert _equal(agg.init_global(state), inner.init_global(state))
    for rnd in (None, 3):
        (p1, m1), (p2, m2) = agg.downlink(state, rnd), inner.downlink(state, rnd)
        assert _equal(p1, p2) and m1 == m2
    assert _equal(agg.client_sync(None, state, {}), inner.client_sync(None, state, {}))
    inner.some_flag = 123
    assert agg.some_flag == 123  # anything else is forwarded
    with pytest.raises(TypeError):
        BitwidthAggregator("ffa")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="method"):
        BitwidthAggregator(inner, "clever")


def test_bad_updates_rejected():
    g = torch.Generator().manual_seed(8)
    inner = create("ffa")
    state = _global(g)
    ups = _updates(g, [32, 4], _shared(inner, state))
    agg = BitwidthAggregator(create("ffa"), "progressive")
    bad = [ups[0], ClientUpdate("c9", ups[1].deltas, 10, meta={})]
    with pytest.raises(ValueError, match="c9.*bits"):
        agg.aggregate(state, bad)
    bad = [ups[0], ClientUpdate("c9", ups[1].deltas, 10, meta={"bits": 5})]
    with pytest.raises(ValueError, match="c9.*bits"):
        agg.aggregate(state, bad)
    with pytest.raises(ValueError, match="zero updates"):
        agg.aggregate(state, [])
