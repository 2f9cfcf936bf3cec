"""FedAvg-LoRA and FFA-LoRA aggregation, weighting, parameter checks and the registry."""

from __future__ import annotations

import pytest
import torch
from agg_helpers import HEAD_B, HEAD_W, build_state, build_updates, lora_key

from fedlora.aggregation import ClientUpdate, available, create, get_class, register
from fedlora.aggregation.base import Strategy, kind_of, lora_pairs
from fedlora.aggregation.fedavg import FedAvgLoRA
from fedlora.aggregation.ffa import FFALoRA


def _weighted_product(bs, as_, p):
    return sum(pk * (b @ a) for pk, b, a in zip(p, bs, as_))


def test_ffa_aggregation_is_exact():
    """mean_p(B_k)·A == mean_p(B_k·A) because A is common."""
    s = create("ffa")
    g0 = s.init_global(build_state(b_zero=False))
    ups = build_updates(s, g0, n=4, seed=1, counts=[5, 10, 20, 65])
    new = s.aggregate(g0, ups)
    p = s.weights(ups).tolist()
    for a_key, b_key in lora_pairs(g0).values():
        A = g0[a_key]
        client_bs = [g0[b_key] + u.deltas[b_key] for u in ups]
        assert torch.equal(new[a_key], A)  # A never moves
        torch.testing.assert_close(new[b_key] @ A, _weighted_product(client_bs, [A] * 4, p), rtol=1e-5, atol=1e-6)


def test_fedavg_aggregation_is_inexact():
    """mean(B_k)·mean(A_k) differs from mean(B_k·A_k) once the clients' A differ."""
    s = create("fedavg", weighting="uniform")
    g0 = s.init_global(build_state(b_zero=False))
    ups = build_updates(s, g0, n=3, seed=2, scale=0.5)
    new = s.aggregate(g0, ups)
    a_key, b_key = lora_key(0, "query", "A"), lora_key(0, "query", "B")
    want = _weighted_product(
        [g0[b_key] + u.deltas[b_key] for u in ups], [g0[a_key] + u.deltas[a_key] for u in ups], [1 / 3] * 3
    )
    got = new[b_key] @ new[a_key]
    rel = ((got - want).norm() / want.norm()).item()
    assert rel > 1e-2, rel
    # ... but each factor on its own is the plain mean
    torch.testing.assert_close(new[a_key], g0[a_key] + sum(u.deltas[a_key] for u in ups) / 3)


@pytest.mark.parametrize("name", ["fedavg", "ffa"])
def test_weighting_examples_vs_uniform(name):
    counts = [1, 3]
    ex, un = create(name), create(name, weighting="uniform")
    g0 = ex.init_global(build_state(b_zero=False))
    ups = build_updates(ex, g0, n=2, seed=3, counts=counts)
    torch.testing.assert_close(ex.weights(ups), torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(un.weights(ups), torch.tensor([0.5, 0.5], dtype=torch.float64))
    b_key = lora_key(1, "value", "B")
    d0, d1 = ups[0].deltas[b_key], ups[1].deltas[b_key]
    torch.testing.assert_close(ex.aggregate(g0, ups)[b_key], g0[b_key] + 0.25 * d0 + 0.75 * d1)
    torch.testing.assert_close(un.aggregate(g0, ups)[b_key], g0[b_key] + 0.5 * d0 + 0.5 * d1)


def test_weights_refuse_bad_counts_and_empty_rounds():
    s = create("ffa")
    with pytest.raises(ValueError, match="num_examples > 0"):
        s.weights([ClientUpdate("c0", {}, 0)])
    with pytest.raises(ValueError, match="zero updates"):
        s.weights([])


def test_ffa_trains_and_shares_b_and_head_only():
    s = create("ffa")
    st = build_state()
    assert {kind_of(k) for k in st if s.shares_key(k)} == {"lora_B", "head"}
    assert not any(s.trains_key(k) for k in st if kind_of(k) == "lora_A")
    assert not any(s.personal_key(k) for k in st)
    g0 = s.init_global(st)
    assert set(g0) == set(st)  # A is frozen but the client needs it
    frozen_head = create("ffa", train_head=False)
    assert not frozen_head.shares_key(HEAD_W) and not frozen_head.trains_key(HEAD_B)
    assert HEAD_W in frozen_head.init_global(st)


def test_ffa_downlink_sends_a_once():
    s = create("ffa")
    g0 = s.init_global(build_state())
    full, _ = s.downlink(g0, None)
    assert set(full) == set(g0)
    part, _ = s.downlink(g0, 0)
    assert part and all(kind_of(k) != "lora_A" for k in part)


def test_unshared_keys_pass_through_and_input_is_not_mutated():
    s = create("ffa")
    g0 = s.init_global(build_state(b_zero=False))
    before = {k: v.clone() for k, v in g0.items()}
    new = s.aggregate(g0, build_updates(s, g0, n=2, seed=4))
    assert all(torch.equal(g0[k], before[k]) for k in g0)
    assert all(new[k] is g0[k] for k in g0 if kind_of(k) == "lora_A")


@pytest.mark.parametrize("name", ["fedavg", "ffa", "fedsvd", "fedsa"])
def test_unknown_params_refused(name):
    with pytest.raises(ValueError, match="unknown parameters.*bogus"):
        create(name, bogus=1)
    with pytest.raises(ValueError, match=r"strategy.weighting='median': allowed values are \['examples', 'uniform'\]"):
        create(name, weighting="median")


def test_registry_errors_name_allowed_values():
    with pytest.raises(ValueError) as e:
        create("fedprox")
    for name in ("fedavg", "ffa", "fedsvd", "fedsa"):
        assert name in str(e.value)
    assert set(available()) >= {"fedavg", "ffa", "fedsvd", "fedsa"}
    assert get_class("ffa") is FFALoRA and get_class("fedavg") is FedAvgLoRA
    with pytest.raises(ValueError, match="already registered"):

        @register("ffa")
        class Again(Strategy):  # noqa: F841
            def aggregate(self, global_state, updates):
                return global_state
