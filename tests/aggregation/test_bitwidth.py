"""The BitwidthAggregator wrapper around an inner strategy: naive, grouped, progressive; explicit forwarding."""

from __future__ import annotations

import io
import math

import pytest
import torch

from fedlora.aggregation import ClientUpdate, available, create
from fedlora.aggregation.bitwidth import BitwidthAggregator
from fedlora.aggregation.quant import fake_quantize
from fedlora.aggregation.selective import masked_weighted_mean, selective_mask

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
    assert not hasattr(agg, "svd_every")  # nothing is forwarded implicitly (no __getattr__)
    assert not agg.has_reference_global
    fedsa = BitwidthAggregator(create("fedsa"), "naive")
    assert fedsa.has_reference_global and not fedsa.has_global_model
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
