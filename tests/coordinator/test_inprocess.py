"""Whole federations driven in-process (the coordinator and client code `fedlora run` uses, no transport)."""

from __future__ import annotations

import pytest

from fedlora.aggregation.base import LORA_A, kind_of
from fedlora.lifecycle import run_inprocess

pytestmark = pytest.mark.federation


@pytest.fixture
def run(tiny_cfg, tmp_path):
    count = iter(range(100))

    def go(*overrides: str) -> dict:  # a fresh run directory per federation (an existing one would resume)
        return run_inprocess(tiny_cfg(*overrides), tmp_path / f"run{next(count)}", echo=lambda *_: None)

    return go


def test_fedsa_reports_personalised_and_labelled_reference_global(run, tiny_cfg):
    s = run("strategy=fedsa")
    assert s["global_accuracy"] is None  # no global model
    last = s["history"][-1]
    assert last["personalized_clients"] == 4
    assert s["personalized_accuracy"] == last["personalized_accuracy"] is not None
    assert s["reference_global_accuracy"] == last["reference_global_accuracy"]
    assert "reference" in last["reference_global_label"]
    # bytes up: A only — per reporting client, the size of every lora_A tensor in fp32
    from fedlora.task.model import adapter_state, build_model

    cfg = tiny_cfg("strategy=fedsa")
    init = adapter_state(build_model(cfg.model, num_labels=2, seed=cfg.seed))
    a_bytes = sum(v.numel() * 4 for k, v in init.items() if kind_of(k) == LORA_A)
    assert all(h["bytes_up"] == h["reported"] * a_bytes for h in s["history"])


def test_mixed_fleet_reports_accuracy_per_device_class_and_smaller_uploads(run):
    full = run("strategy=ffa", "rounds=1", "clients.per_round=4")
    mixed = run("strategy=ffa", "rounds=1", "clients.per_round=4", "clients.bitwidths={32: 0.5, 4: 0.5}")
    by_bits = mixed["history"][-1]["global_accuracy_by_bits"]
    assert set(by_bits) == {4}
    assert "global_accuracy_by_bits" not in full["history"][-1]
    per_client_full = full["history"][0]["bytes_up"] / full["history"][0]["reported"]
    assert mixed["history"][0]["bytes_up"] < mixed["history"][0]["reported"] * per_client_full



def test_exhausted_clients_are_never_scheduled_again_and_never_pass_their_budget(run):
    """privacy.max_participations=1: each client trains once, says it cannot run again, and the coordinator
    stops sampling it; the federation ends when nobody is left, with every ε within the target, and its final
    model is evaluated although the planned last round (the only eval_every round) never came."""
    s = run("privacy=dp", "privacy.epsilon=20", "privacy.max_participations=1", "rounds=4", "eval_every=4",
            "clients.num=4", "clients.per_round=2", "clients.local_steps=3", "strategy=ffa")
    ledgers = s["privacy"]["ledgers"]
    assert set(ledgers) == {f"client-{i:03d}" for i in range(4)}
    assert all(led["steps"] == 3 for led in ledgers.values())  # exactly one participation each
    assert set(s["privacy"]["exhausted"]) == set(ledgers)
    assert s["rounds_completed"] == 2 and all(h["reported"] == 2 for h in s["history"])
    assert 0 < s["epsilon_max"] <= 20 and s["epsilon_per_client"] == {c: led["epsilon"] for c, led in ledgers.items()}
    assert "global_accuracy" not in s["history"][0]  # round 1: not an eval round, clients still left
    assert s["global_accuracy"] is not None and s["global_accuracy"] == s["history"][-1]["global_accuracy"]


def test_mixed_fleet_composes_with_fedsvd_and_dp(run):
    """Bitwidth-heterogeneous aggregation is post-processing: under DP and with FedSVD's re-factorisation the
    progressive dequantizer still trains every round and every client stays within its ε."""
    s = run("strategy=fedsvd", "privacy=dp", "privacy.epsilon=20", "clients.per_round=4",
            "clients.bitwidths={32: 0.5, 4: 0.5}")
    assert s["rounds_completed"] == 2 and s["rejected_updates"] == 0
    assert all(h["strategy_stats"]["method"] == "progressive" for h in s["history"])
    assert [h["strategy_stats"]["dequantizer_fits"] for h in s["history"]] == [1, 2]  # one fit per round
    assert set(s["history"][-1]["global_accuracy_by_bits"]) == {4}
    ledgers = s["privacy"]["ledgers"]
    assert len(ledgers) == 4 and all(0 < led["epsilon"] <= 20 for led in ledgers.values())


def test_only_sampled_clients_load_their_data(run):
    """Registration reads the partitions' sizes, not their records: of 12 registered clients, only the 2 a round
    samples are tokenised (a client's data loads when it is first sampled), and the sizes registered are the ones
    each client then trains on."""
    from fedlora.clients import worker

    worker._CACHE.clear()
    s = run("clients.num=12", "clients.per_round=2", "rounds=1")
    loaded = [k for k in worker._CACHE if k.startswith("data:")]
    assert s["history"][0]["reported"] == 2 and len(loaded) == 2
    assert {k.split(":")[-3] for k in loaded} == {c.split("-")[1].lstrip("0") or "0"
                                                  for c in s["history"][0]["sampled_clients"]}
