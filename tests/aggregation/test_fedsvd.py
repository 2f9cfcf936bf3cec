"""FedSVD: exact factored re-factorisation, rank deficiency, FFA equivalence, B-only downlink with a
bit-identical client recompute, missed rounds, and bit-identical resume."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from agg_helpers import HEAD_W, build_state, build_updates, lora_key
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.aggregation import create
from fedlora.aggregation.base import apply_mean_delta, kind_of, lora_pairs, weighted_sum
from fedlora.aggregation.fedsvd import FedSVD, dense_refactor, lowrank_refactor, refactor, refactor_state

TOL = 1e-5


def rel_err(B_new, A_new, B, A) -> float:
    P = B.double() @ A.double()
    return ((B_new.double() @ A_new.double() - P).norm() / P.norm()).item()


def orth_err(A_new) -> float:
    r = A_new.shape[-2]
    return (A_new.double() @ A_new.double().mT - torch.eye(r, dtype=torch.float64)).abs().max().item()


def orthonormal(n, k, g, dtype=torch.float32):
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0].to(dtype)


# ---- the factored refactor ----------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(0, 3),
    d_out=st.integers(1, 40),
    d_in=st.integers(1, 40),
    r=st.integers(1, 8),
    a_scale=st.sampled_from([1e-3, 1.0, 1e3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_refactor_exact_and_orthonormal_random(batch, d_out, d_in, r, a_scale, seed):
    r = min(r, d_out, d_in)
    g = torch.Generator().manual_seed(seed)
    lead = (batch,) if batch else ()
    B = torch.randn(*lead, d_out, r, generator=g)
    A = torch.randn(*lead, r, d_in, generator=g) * a_scale / d_in**0.5
    B_new, A_new = refactor(B, A)
    assert B_new.shape == B.shape and A_new.shape == A.shape and B_new.dtype == A_new.dtype == torch.float32
    assert rel_err(B_new, A_new, B, A) <= TOL
    assert orth_err(A_new) <= TOL
    # deterministic, with the sign convention: the largest-|.| entry of every row of A_new is positive
    B2, A2 = refactor(B, A)
    assert torch.equal(B2, B_new) and torch.equal(A2, A_new)
    lo, hi = torch.aminmax(A_new, dim=-1)
    assert (hi >= -lo).all()


def test_refactor_zero_b_gives_zero_b_and_orthonormal_a():
    g = torch.Generator().manual_seed(0)
    B = torch.zeros(3, 20, 4)
    A = torch.randn(3, 4, 16, generator=g) / 4
    B_new, A_new = refactor(B, A)
    assert torch.isfinite(B_new).all() and torch.isfinite(A_new).all()
    assert B_new.abs().max().item() == 0.0
    assert orth_err(A_new) <= TOL
    # and with A = 0 as well
    B_new, A_new = refactor(torch.zeros(20, 4), torch.zeros(4, 16))
    assert B_new.abs().max().item() == 0.0 and orth_err(A_new) <= TOL


def test_refactor_rank_one_b():
    g = torch.Generator().manual_seed(1)
    B = torch.randn(24, 1, generator=g) @ torch.randn(1, 6, generator=g)  # rank 1, r = 6
    A = torch.randn(6, 30, generator=g) / 30**0.5
    B_new, A_new = refactor(B, A)
    assert torch.isfinite(B_new).all() and torch.isfinite(A_new).all()
    assert rel_err(B_new, A_new, B, A) <= TOL
    assert orth_err(A_new) <= TOL
    norms = B_new.norm(dim=0)  # = singular values, decreasing; all but the first vanish
    assert norms[1:].max() <= 1e-5 * norms[0]


def test_refactor_repeated_singular_values():
    g = torch.Generator().manual_seed(2)
    s = torch.tensor([3.0, 3.0, 3.0, 1.0, 0.0])
    B = orthonormal(32, 5, g) * s
    A = orthonormal(28, 5, g).T
    B_new, A_new = refactor(B, A)
    assert torch.isfinite(B_new).all() and torch.isfinite(A_new).all()
    assert rel_err(B_new, A_new, B, A) <= TOL
    assert orth_err(A_new) <= TOL
    torch.testing.assert_close(B_new.norm(dim=0), s, atol=1e-5, rtol=1e-5)


def test_factored_matches_dense_and_lowrank():
    g = torch.Generator().manual_seed(3)
    B = torch.randn(4, 48, 6, generator=g)
    A = torch.randn(4, 6, 40, generator=g) / 40**0.5
    P = B.double() @ A.double()
    want_sv = torch.linalg.svdvals(P)[..., :6]
    for fn in (refactor, dense_refactor, lowrank_refactor):
        B_new, A_new = fn(B, A)
        assert rel_err(B_new, A_new, B, A) <= TOL, fn.__name__
        assert orth_err(A_new) <= TOL, fn.__name__
        torch.testing.assert_close(B_new.double().norm(dim=-2), want_sv, rtol=1e-5, atol=1e-6)
    # distinct singular values: with the sign convention the factors themselves agree too
    Bf, Af = refactor(B, A)
    Bd, Ad = dense_refactor(B, A)
    torch.testing.assert_close(Af, Ad, atol=1e-4, rtol=0)
    torch.testing.assert_close(Bf, Bd, atol=1e-4, rtol=1e-4)


def test_refactor_dtypes_and_shape_checks():
    g = torch.Generator().manual_seed(4)
    B = torch.randn(2, 16, 4, generator=g, dtype=torch.float64)
    A = torch.randn(2, 4, 12, generator=g, dtype=torch.float64)
    B_new, A_new = refactor(B, A)
    assert B_new.dtype == torch.float64 and rel_err(B_new, A_new, B, A) <= 1e-12 and orth_err(A_new) <= 1e-12
    Bh, Ah = refactor(B.to(torch.bfloat16), A.to(torch.bfloat16))
    assert Bh.dtype == Ah.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="r <= min"):
        refactor(torch.randn(3, 4), torch.randn(4, 10))
    with pytest.raises(ValueError, match="do not pair"):
        refactor(torch.randn(8, 4), torch.randn(3, 10))


def test_refactor_state_batches_by_shape_and_is_deterministic():
    st_ = build_state(layers=3, b_zero=False, seed=5)
    new = refactor_state(st_)
    assert set(new) == {k for k in st_ if kind_of(k) != "head"}
    for a_key, b_key in lora_pairs(st_).values():
        # batched kernels may round differently from single calls: close, not necessarily equal ...
        B1, A1 = refactor(st_[b_key], st_[a_key])
        torch.testing.assert_close(new[b_key], B1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(new[a_key], A1, rtol=1e-5, atol=1e-5)
    # ... which is why server and client both go through refactor_state (same grouping, same order);
    # repeated calls, and other torch thread counts, give the same bits
    n = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            again = refactor_state(st_)
            assert all(torch.equal(again[k], new[k]) for k in new)
    finally:
        torch.set_num_threads(n)


# ---- the strategy -------------------------------------------------------------------------------


def run(strategy, g, rounds, seed0=100, n=3):
    states = []
    for t in range(rounds):
        g = strategy.aggregate(g, build_updates(strategy, g, n=n, seed=seed0 + t))
        states.append(g)
    return states


def assert_states_equal(x, y):
    assert set(x) == set(y)
    for k in x:
        assert torch.equal(x[k], y[k]), k


def test_fedsvd_is_registered_ffa_subclass_with_checked_params():
    s = create("fedsvd")
    assert type(s) is FedSVD and s.svd_every == 1
    assert s.trains == ("lora_B", "head") and s.shares == ("lora_B", "head") and s.has_global_model
    assert create("fedsvd", svd_every=0).svd_every == 0
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="svd_every"):
            create("fedsvd", svd_every=bad)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), uniform=st.booleans(), train_head=st.booleans())
def test_mean_delta_is_bit_identical_to_the_fp64_weighted_sum(n, seed, uniform, train_head):
    """The buffered fp64 accumulation gives exactly X + Σ p_k ΔX_k as ``weighted_sum`` computes it, for every
    shared key, and leaves every other key untouched."""
    s = create("fedsvd", weighting="uniform" if uniform else "examples", train_head=train_head)
    g0 = s.init_global(build_state(layers=2, b_zero=False, seed=seed % 1000))
    counts = [1 + (seed >> k) % 97 for k in range(n)]
    ups = build_updates(s, g0, n=n, seed=seed, counts=counts)
    p = s.weights(ups)
    want = {k: (v + weighted_sum(ups, p, k) if s.shares_key(k) else v) for k, v in g0.items()}
    assert_states_equal(apply_mean_delta(s, g0, ups), want)


def test_aggregate_refactors_without_moving_the_model():
    s = create("fedsvd")
    g0 = s.init_global(build_state(seed=6))
    g1 = s.aggregate(g0, build_updates(s, g0, n=3, seed=7))
    assert s.version == 1 and s.a_version == 1 and s.pre_b is not None
    p = s.weights(build_updates(s, g0, n=3, seed=7))
    for a_key, b_key in lora_pairs(g0).values():
        b_prime = s.pre_b[b_key]
        ups = build_updates(s, g0, n=3, seed=7)
        torch.testing.assert_close(b_prime, g0[b_key] + sum(w * u.deltas[b_key] for w, u in zip(p.tolist(), ups)))
        assert rel_err(g1[b_key], g1[a_key], b_prime, g0[a_key]) <= TOL
        assert orth_err(g1[a_key]) <= TOL
    torch.testing.assert_close(g1[HEAD_W], g0[HEAD_W] + sum(w * u.deltas[HEAD_W] for w, u in zip(p.tolist(), ups)))


def test_svd_every_zero_is_exactly_ffa():
    ffa, svd0 = create("ffa"), create("fedsvd", svd_every=0)
    g0 = ffa.init_global(build_state(seed=8))
    for a, b in zip(run(ffa, g0, 4), run(svd0, g0, 4)):
        assert_states_equal(a, b)
    assert svd0.version == 4 and svd0.a_version == 0 and svd0.pre_b is None
    payload, meta = svd0.downlink(b, 1)
    assert meta == {} and payload and all(svd0.shares_key(k) for k in payload)


def test_svd_every_two_refactors_every_other_round():
    s = create("fedsvd", svd_every=2)
    g0 = s.init_global(build_state(seed=9))
    g1, g2, g3 = run(s, g0, 3)
    a = lora_key(1, "value", "A")
    assert torch.equal(g1[a], g0[a]) and not torch.equal(g2[a], g1[a]) and torch.equal(g3[a], g2[a])


def test_client_one_round_behind_recomputes_bit_identical_factors(caplog):
    s = create("fedsvd")
    g = s.init_global(build_state(seed=10))
    payload, meta = s.downlink(g, None)
    held = s.client_sync(None, payload, meta)
    assert_states_equal(held, g)
    assert s.downlink(g, 0) == ({}, {})  # holds the current version: nothing to send
    with caplog.at_level(logging.WARNING, logger="fedlora.aggregation.fedsvd"):
        for t in range(3):
            g = s.aggregate(g, build_updates(s, g, n=3, seed=20 + t))
            payload, meta = s.downlink(g, s.version - 1)
            assert meta["recompute"] is True and isinstance(meta["digest"], str)
            assert not any(kind_of(k) == "lora_A" for k in payload)  # no A on the wire
            assert {k for k in payload if kind_of(k) == "lora_B"} == {k for k in g if kind_of(k) == "lora_B"}
            assert HEAD_W in payload
            held = s.client_sync(held, payload, meta)
            assert_states_equal(held, g)  # torch.equal on every key: bit-identical
    assert not caplog.records


def test_recompute_digest_mismatch_is_reported(caplog):
    s = create("fedsvd")
    g0 = s.init_global(build_state(seed=11))
    held = dict(g0)
    a = lora_key(0, "query", "A")
    held[a] = held[a] + 1e-3  # the client does not hold what the server thinks
    g1 = s.aggregate(g0, build_updates(s, g0, n=2, seed=12))
    with caplog.at_level(logging.WARNING, logger="fedlora.aggregation.fedsvd"):
        s.client_sync(held, *s.downlink(g1, 0))
    assert "differ" in caplog.text
    with pytest.raises(ValueError, match="held"):
        s.client_sync(None, *s.downlink(g1, 0))


def test_missed_rounds_and_unknown_versions_get_the_full_state():
    s = create("fedsvd")
    g0 = s.init_global(build_state(seed=13))
    held0 = s.client_sync(None, *s.downlink(g0, None))
    g1, g2 = run(s, g0, 2)
    for client_round in (0, None, 7, -1):
        payload, meta = s.downlink(g2, client_round)
        assert meta == {} and set(payload) == set(g2)
        assert_states_equal(s.client_sync(held0 if client_round == 0 else None, payload, meta), g2)


def test_no_refactor_last_round_sends_b_and_head_only():
    s = create("fedsvd", svd_every=2)
    g0 = s.init_global(build_state(seed=14))
    held0 = dict(g0)
    g1, g2, g3 = run(s, g0, 3)
    payload, meta = s.downlink(g3, 2)  # A unchanged since version 2
    assert meta == {} and not any(kind_of(k) == "lora_A" for k in payload)
    payload, meta = s.downlink(g3, 1)  # A changed at version 2, and the last round did not refactor
    assert set(payload) == set(g3)
    s1 = create("fedsvd", svd_every=2)
    s1.aggregate(g0, build_updates(s1, g0, n=3, seed=100))
    payload, meta = s1.downlink(g1, 0)
    assert meta == {} and not any(kind_of(k) == "lora_A" for k in payload)
    assert_states_equal(s1.client_sync(held0, payload, meta), g1)


def test_resume_is_bit_identical():
    g0 = create("fedsvd").init_global(build_state(seed=15))
    ref = create("fedsvd")
    uninterrupted = run(ref, g0, 5)

    first = create("fedsvd")
    g3 = run(first, g0, 3)[-1]
    buf = io.BytesIO()
    torch.save({"global": g3, "strategy": first.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    resumed = create("fedsvd")
    resumed.load_state_dict(ck["strategy"])
    assert resumed.version == 3
    # a client one version behind is served identically before and after the restart
    p_before, m_before = first.downlink(g3, 2)
    p_after, m_after = resumed.downlink(ck["global"], 2)
    assert m_before == m_after and m_after["recompute"]
    assert_states_equal(p_before, p_after)
    g = ck["global"]
    for t in range(3, 5):
        g = resumed.aggregate(g, build_updates(resumed, g, n=3, seed=100 + t))
    assert_states_equal(g, uninterrupted[-1])
    assert_states_equal(resumed.state_dict()["pre_b"], ref.state_dict()["pre_b"])


def test_load_state_dict_refuses_foreign_state():
    s = create("fedsvd")
    with pytest.raises(ValueError, match="needs keys"):
        s.load_state_dict({})
    with pytest.raises(ValueError, match="needs keys"):
        s.load_state_dict({"version": 1, "a_version": 0, "pre_b": None, "extra": 1})
    with pytest.raises(ValueError, match="inconsistent"):
        s.load_state_dict({"version": 1, "a_version": 2, "pre_b": None})


def test_other_routes_refactor_exactly_but_never_ask_clients_to_recompute():
    s = create("fedsvd")
    s.route = "dense"
    g0 = s.init_global(build_state(seed=16))
    g1 = s.aggregate(g0, build_updates(s, g0, n=2, seed=17))
    for a_key, b_key in lora_pairs(g0).values():
        assert rel_err(g1[b_key], g1[a_key], s.pre_b[b_key], g0[a_key]) <= TOL
    payload, meta = s.downlink(g1, 0)
    assert meta == {} and set(payload) == set(g1)
