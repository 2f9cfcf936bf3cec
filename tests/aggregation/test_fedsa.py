"""FedSA-LoRA: only A travels and is averaged; B and the head are personal; reference global model."""

from __future__ import annotations

import pytest
import torch
from agg_helpers import HEAD_B, HEAD_W, build_state, build_updates, lora_key

from fedlora.aggregation import create
from fedlora.aggregation.base import kind_of
from fedlora.aggregation.fedsa import REFERENCE_LABEL, FedSALoRA


def test_only_a_is_shared_and_b_head_are_personal():
    s = create("fedsa")
    assert type(s) is FedSALoRA and s.has_global_model is False
    st = build_state()
    for k in st:
        kind = kind_of(k)
        assert s.trains_key(k)
        assert s.shares_key(k) == (kind == "lora_A")
        assert s.personal_key(k) == (kind in ("lora_B", "head"))


def test_head_not_trained_is_frozen_not_personal():
    s = create("fedsa", train_head=False)
    st = build_state()
    assert not s.trains_key(HEAD_W) and not s.personal_key(HEAD_W) and not s.shares_key(HEAD_W)
    assert {k for k in st if s.personal_key(k)} == {k for k in st if kind_of(k) == "lora_B"}
    g0 = s.init_global(st)
    assert set(g0) == {k for k in st if kind_of(k) == "lora_A"} | {HEAD_W, HEAD_B}  # frozen head travels once


def test_init_global_and_downlink_hold_only_a():
    s = create("fedsa")
    st = build_state()
    g0 = s.init_global(st)
    assert set(g0) == {k for k in st if kind_of(k) == "lora_A"}
    assert all(torch.equal(g0[k], st[k]) and g0[k] is not st[k] for k in g0)
    payload, _ = s.downlink(g0, 0)
    assert set(payload) == set(g0)


@pytest.mark.parametrize(
    "weighting,counts,p", [("examples", [10, 30], [0.25, 0.75]), ("uniform", [10, 30], [0.5, 0.5])]
)
def test_aggregate_averages_only_a(weighting, counts, p):
    s = create("fedsa", weighting=weighting)
    g0 = s.init_global(build_state(seed=1))
    ups = build_updates(s, g0, n=2, seed=2, counts=counts)
    assert all(kind_of(k) == "lora_A" for u in ups for k in u.deltas)
    new = s.aggregate(g0, ups)
    assert set(new) == set(g0)
    for k in g0:
        torch.testing.assert_close(new[k], g0[k] + p[0] * ups[0].deltas[k] + p[1] * ups[1].deltas[k])


def test_reference_global_averages_personal_b_and_head():
    s = create("fedsa")
    st = build_state(seed=3)
    g = s.init_global(st)
    g_ = torch.Generator().manual_seed(4)
    personal = [{k: torch.randn(v.shape, generator=g_) for k, v in st.items() if s.personal_key(k)} for _ in range(3)]
    ref = s.reference_global(g, personal, weights=[1, 1, 2])
    b = lora_key(2, "value", "B")
    torch.testing.assert_close(ref[b], 0.25 * personal[0][b] + 0.25 * personal[1][b] + 0.5 * personal[2][b])
    head = 0.25 * personal[0][HEAD_W] + 0.25 * personal[1][HEAD_W] + 0.5 * personal[2][HEAD_W]
    torch.testing.assert_close(ref[HEAD_W], head)
    assert all(ref[k] is g[k] for k in g)  # global A as is
    assert set(ref) == set(st)
    uni = s.reference_global(g, personal)
    torch.testing.assert_close(uni[b], (personal[0][b] + personal[1][b] + personal[2][b]) / 3)
    assert "reference" in REFERENCE_LABEL
    with pytest.raises(ValueError, match="weights"):
        s.reference_global(g, personal, weights=[1, 2])
    with pytest.raises(ValueError, match="keys"):
        s.reference_global(g, [personal[0], {b: personal[1][b]}])
    with pytest.raises(ValueError, match="at least one"):
        s.reference_global(g, [])
