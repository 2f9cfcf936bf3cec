"""Every kind of bad client update is rejected, logged and counted; the global state does not move."""

from __future__ import annotations

import logging

import pytest
import torch

from fedlora.coordinator.core import Coordinator


@pytest.fixture(scope="module")
def coord(tmp_path_factory):
    from tests.conftest import TINY, compose
    from fedlora.coordinator.run import prepare

    root = tmp_path_factory.mktemp("runs")
    cfg = prepare(compose([*TINY, f"runs_root={root}", "strategy=fedavg"]))
    c = Coordinator(cfg, str(root / "run"))
    c.register({100 + i: {"client_id": f"client-{i:03d}", "n_train": 50, "bits": 32, "held_version": -1} for i in range(4)})
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


def test_each_bad_update_is_rejected_and_global_unchanged(coord, caplog):
    for reason, deltas in _bad_cases(coord):
        before = {k: v.clone() for k, v in coord.global_state.items()}
        version = coord.version
        plans = coord.plan_round()
        nid = plans[0]["node_id"]
        replies = [{"node_id": nid, "error": None, "update": deltas, "metrics": {"num_examples": 50, "loss": 0.5}, "info": {}}]
        with caplog.at_level(logging.WARNING, logger="fedlora.coordinator"):
            coord.finish_round(replies)
        row = coord._pending
        coord._pending = None
        coord.round -= 1  # replay the same round for the next case
        assert row["rejected"] == 1 and row["reported"] == 0, reason
        assert reason in caplog.text
        assert coord.version == version
        assert all(torch.equal(before[k], coord.global_state[k]) for k in before), reason
        caplog.clear()


def test_zero_examples_rejected(coord):
    plans = coord.plan_round()
    replies = [{"node_id": plans[0]["node_id"], "error": None, "update": _good(coord), "metrics": {"num_examples": 0}, "info": {}}]
    coord.finish_round(replies)
    assert coord._pending["rejected"] == 1
    coord._pending, coord.round = None, coord.round - 1


def test_error_reply_counts_as_failure_not_empty_aggregate(coord):
    before = {k: v.clone() for k, v in coord.global_state.items()}
    plans = coord.plan_round()
    good = _good(coord)
    replies = [
        {"node_id": plans[0]["node_id"], "error": "0: ValueError: boom"},
        {"node_id": plans[1]["node_id"], "error": None, "update": good, "metrics": {"num_examples": 50, "loss": 0.4}, "info": {}},
    ]
    coord.finish_round(replies)
    row = coord._pending
    assert row["failed"] == 1 and row["reported"] == 1 and row["dropped"] == 0
    # the one good update was applied in full (FedAvg over one client = its delta)
    for k in coord.expected:
        assert torch.allclose(coord.global_state[k], before[k] + good[k])
    assert coord.client_versions[plans[0]["client_id"]] is None  # failed client gets a full payload next time
    coord._pending = None


def test_missing_replies_count_as_dropped(coord):
    plans = coord.plan_round()
    coord.finish_round([])
    assert coord._pending["dropped"] == len(plans) and coord._pending["reported"] == 0
    coord._pending = None
