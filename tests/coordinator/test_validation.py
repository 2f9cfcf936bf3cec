"""Every kind of bad client update is rejected, logged and counted; the global state does not move."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from fedlora.coordinator.core import Coordinator
from fedlora.lifecycle import prepare
from tests.conftest import TINY, config


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cfg = config(*TINY, f"runs_root={root}", "strategy=fedavg")
    c = Coordinator(cfg, prepare(cfg), str(root / "run"))
    c.register({100 + i: {"client_id": f"client-{i:03d}", "index": i, "n_train": 50, "held_version": -1}
                for i in range(4)})
    return c, copy.deepcopy(c.state_dict())


@pytest.fixture
def coord(fresh):
    """The registered coordinator, restored to its state before any round (through its checkpoint API)."""
    c, state = fresh
    c.load_state_dict(copy.deepcopy(state))
    return c


def _good(coord) -> dict[str, torch.Tensor]:
    return {k: torch.full(s, 1e-3) for k, s in coord.expected.items()}


def _bad_cases(coord):
    good = _good(coord)
    key = sorted(good)[0]
    yield "wrong keys", {k: v for k, v in good.items() if k != key}
    yield "wrong keys", {**good, "base_model.model.bert.pooler.dense.weight": torch.zeros(2)}
    yield "shape", {**good, key: torch.zeros(3, 3)}
    yield "dtype", {**good, key: good[key].double()}
    yield "non-finite", {**good, key: torch.full_like(good[key], float("nan"))}
    yield "non-finite", {**good, key: torch.full_like(good[key], float("inf"))}
    yield "exceeds clients.max_update_norm", {**good, key: torch.full_like(good[key], 1e6)}


def _reply(nid, update, num_examples=50, **kw):
    return {"node_id": nid, "error": None, "update": update, "metrics": {"num_examples": num_examples, "loss": 0.5},
            "info": {}, **kw}


def _after_good_only(c, state, nid) -> dict:
    """The global state the good reply of ``nid`` alone gives, from ``state``."""
    c.load_state_dict(copy.deepcopy(state))
    c.aggregate_round(c.plan_round().header(), [_reply(nid, _good(c))])
    out = {k: v.clone() for k, v in c.global_state.items()}
    c.load_state_dict(copy.deepcopy(state))
    return out


def test_each_bad_update_is_rejected_and_never_aggregated(fresh, caplog):
    c, state = fresh
    for reason, deltas in _bad_cases(c):
        plan = c.plan_round()
        bad, good = sorted(plan.sent)
        want = _after_good_only(c, state, good)
        plan = c.plan_round()
        with caplog.at_level(logging.WARNING, logger="fedlora.coordinator"):
            record = c.aggregate_round(plan.header(), [_reply(bad, deltas), _reply(good, _good(c))])
        assert record.rejected == 1 and record.reported == 1, reason
        assert reason in caplog.text
        assert all(torch.equal(want[k], c.global_state[k]) for k in want), reason
        c.load_state_dict(copy.deepcopy(state))
        caplog.clear()


def test_zero_examples_rejected(coord):
    plan = coord.plan_round()
    bad, good = sorted(plan.sent)
    record = coord.aggregate_round(plan.header(), [_reply(bad, _good(coord), num_examples=0),
                                                   _reply(good, _good(coord))])
    assert record.rejected == 1 and record.reported == 1


def test_error_reply_counts_as_failure_not_empty_aggregate(coord):
    before = {k: v.clone() for k, v in coord.global_state.items()}
    plan = coord.plan_round()
    n0, n1 = list(plan.sent)
    good = _good(coord)
    record = coord.aggregate_round(plan.header(), [{"node_id": n0, "error": "0: ValueError: boom"}, _reply(n1, good)])
    assert record.failed == 1 and record.reported == 1 and record.dropped == 0
    # the one good update was applied in full (FedAvg over one client = its delta)
    for k in coord.expected:
        assert torch.allclose(coord.global_state[k], before[k] + good[k])
    assert coord.client_versions[plan.sent[n0].client_id] is None  # failed client gets a full payload next time


def test_missing_replies_count_as_dropped_and_get_a_full_payload_next(coord):
    plan = coord.plan_round()
    answered, silent = sorted(plan.sent)
    record = coord.aggregate_round(plan.header(), [_reply(answered, _good(coord))])
    assert record.dropped == 1 and record.reported == 1
    assert coord.client_versions[plan.sent[silent].client_id] is None


def test_too_few_reports_stop_the_run_and_apply_nothing(coord):
    from fedlora.coordinator.core import RoundFailed

    before = {k: v.clone() for k, v in coord.global_state.items()}
    plan = coord.plan_round()
    with pytest.raises(RoundFailed, match=r"0 accepted report\(s\) < clients.min_reports=1.*fedlora resume"):
        coord.aggregate_round(plan.header(), [{"node_id": n, "error": "0: crashed"} for n in plan.sent])
    assert coord.version == 0 and coord.round == 0
    assert all(torch.equal(before[k], coord.global_state[k]) for k in before)
