"""Fuzzing the coordinator with malformed client replies through the real aggregate_round path: no exception
escapes, every malformed reply is rejected (or counted as failed), and the global state never moves."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.coordinator.core import Coordinator
from fedlora.lifecycle import prepare
from tests.conftest import TINY, config

N_TRAIN = 50


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    cfg = config(*TINY, f"runs_root={root}", "strategy=fedavg", "privacy=dp", "privacy.epsilon=50",
                 "clients.bitwidths={32: 0.5, 4: 0.5}")
    c = Coordinator(cfg, prepare(cfg), str(root / "run"))
    c.register({100 + i: {"client_id": f"client-{i:03d}", "index": i, "n_train": N_TRAIN, "n_val": 5,
                          "held_version": -1, "ledger_steps": 0} for i in range(4)})
    return c, copy.deepcopy(c.state_dict())


def _good(coord, nid: int, bits: int, scale: float = 1e-3) -> dict:
    from fedlora.aggregation.quant import encode_tensors

    up = {k: torch.full(s, scale) for k, s in coord.expected.items()}
    ledger = {"epsilon": 1.0, "steps": 3, "participations": 1, "target_epsilon": 50.0, "delta": 1e-5,
              "noise_multiplier": 1.0, "sample_rate": 0.3, "accountant": "prv", "noise": "csprng"}
    return {"node_id": nid, "error": None, "update": encode_tensors(up, bits) if bits != 32 else up,
            "metrics": {"num_examples": N_TRAIN, "loss": 0.5, "client_s": 1.0, "steps": 3},
            "info": {"client_id": coord.nodes[nid]["client_id"], "bits": bits, "declined": "",
                     "ledger": json.dumps(ledger), "can_run_next": 1}}


BAD_NUMBER = st.sampled_from([[1], "3", None, math.nan, math.inf, -math.inf, True, {}, -1, 0])
BAD_EXAMPLES = st.sampled_from([[1], 0.5, 2.5, -1, 0, 2**63, 1e308, math.nan, math.inf, "50", True, N_TRAIN + 1])
BAD_LEDGER = st.sampled_from(["not json", "[]", "{}", "null", json.dumps({"epsilon": "x"}),
                              json.dumps({"epsilon": -1, "steps": 3}), json.dumps({"epsilon": math.inf}), 7, [1]])


def _mutations(coord, key: str, bits: int):
    """One invalid change to a good reply (each alone must be rejected)."""
    shape = coord.expected[key]
    tensors = st.sampled_from([
        torch.zeros(3, 3), torch.full(shape, math.nan), torch.full(shape, math.inf), torch.full(shape, 1e6),
        torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.int64), "tensor", None, [0.0],
    ])

    def reply(field, sub, value):
        def apply(r):
            if sub is None:
                r[field] = value
            elif isinstance(r.get(field), dict):
                r[field][sub] = value
            return r
        return apply

    out = [
        st.builds(lambda v: reply("metrics", "num_examples", v), BAD_EXAMPLES),
        st.builds(lambda v: reply("metrics", "loss", v), st.sampled_from([[1], "x", math.inf, -1.0, {}])),
        st.builds(lambda v: reply("metrics", "client_s", v), BAD_NUMBER.filter(lambda v: v != 0)),
        st.builds(lambda v: reply("metrics", "handler_s", v), BAD_NUMBER.filter(lambda v: v not in (0, None))),
        st.builds(lambda v: reply("info", "bits", v), st.sampled_from(["8", 3.5, True, 16 if bits != 16 else 8, []])),
        st.builds(lambda v: reply("info", "ledger", v), BAD_LEDGER),
        st.builds(lambda v: reply("info", "can_run_next", v), st.sampled_from(["junk", 2, -1, [1], 0.5, math.nan])),
        st.builds(lambda v: reply("info", "client_id", v), st.sampled_from(["client-999", "", 7, None])),
        st.builds(lambda v: reply("info", "declined", v), st.sampled_from([7, ["no"], "x" * 5000])),
        st.builds(lambda v: reply("info", None, v), st.sampled_from([None, "info", [1], 3])),
        st.builds(lambda v: reply("metrics", None, v), st.sampled_from([None, "metrics", [1], 3])),
        st.builds(lambda v: reply("update", None, v), st.sampled_from([None, "update", [1], 3, {1: torch.zeros(1)}])),
    ]
    if bits == 32:
        out += [
            st.builds(lambda v: (lambda r: (r["update"].__setitem__(key, v), r)[1]), tensors),
            st.just(lambda r: (r["update"].pop(key), r)[1]),
            st.just(lambda r: (r["update"].__setitem__("base_model.extra.lora_B.weight", torch.zeros(2)), r)[1]),
        ]
    else:
        out += [
            st.just(lambda r: (r["update"].pop(next(iter(r["update"]))), r)[1]),
            st.just(lambda r: (r["update"].update({k: torch.zeros_like(v) for k, v in r["update"].items()
                                                   if k.endswith("::scales")}), r)[1]),  # zero scale, non-zero codes
            st.just(lambda r: (r["update"].update({k: torch.full_like(v, 255) for k, v in r["update"].items()
                                                   if k.endswith("::codes")}), r)[1]),  # codes out of range
            st.just(lambda r: (r["update"].update({k: v.float() for k, v in r["update"].items()}), r)[1]),
        ]
    return st.one_of(out)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_no_malformed_reply_escapes_or_is_aggregated(fresh, data):
    """Each round: one malformed reply and one good one. Nothing raises, the malformed one is counted as rejected
    (or failed), and the new global state is exactly the one the good reply alone gives."""
    coord, state = fresh
    coord.load_state_dict(copy.deepcopy(state))
    plan = coord.plan_round()
    nid = data.draw(st.sampled_from(sorted(plan.sent)))
    other = next(n for n in plan.sent if n != nid)
    good_other = _good(coord, other, plan.sent[other].bits)
    coord.aggregate_round(plan.header(), [copy.deepcopy(good_other)])
    want = {k: v.clone() for k, v in coord.global_state.items()}
    coord.load_state_dict(copy.deepcopy(state))
    plan = coord.plan_round()
    bits = plan.sent[nid].bits
    key = data.draw(st.sampled_from(sorted(coord.expected)))
    mutate = data.draw(_mutations(coord, key, bits))
    scale = data.draw(st.floats(1e-5, 1e-2))  # a continuous draw: every example is a distinct reply
    reply = mutate(_good(coord, nid, bits, scale))
    record = coord.aggregate_round(plan.header(), [reply, copy.deepcopy(good_other)])  # must not raise
    assert record.reported == 1 and record.rejected + record.failed + record.declined == 1, reply
    assert coord.version == 1
    assert all(torch.equal(want[k], coord.global_state[k]) for k in want)


def test_the_good_reply_of_the_fuzzer_is_accepted(fresh):
    """The fuzz test mutates a reply that is itself accepted: each rejection above is the mutation's."""
    coord, state = fresh
    coord.load_state_dict(copy.deepcopy(state))
    plan = coord.plan_round()
    replies = [_good(coord, nid, s.bits) for nid, s in plan.sent.items()]
    record = coord.aggregate_round(plan.header(), replies)
    assert record.reported == len(replies) == 2 and record.rejected == 0 and coord.version == 1


def test_a_weight_claim_cannot_take_over_the_average(fresh):
    """num_examples is bounded by what the client declared: 2**63 or 1e308 is rejected, not weighted."""
    coord, state = fresh
    coord.load_state_dict(copy.deepcopy(state))
    plan = coord.plan_round()
    (a, sa), (b, sb) = sorted(plan.sent.items())
    honest, greedy = _good(coord, a, sa.bits), _good(coord, b, sb.bits)
    greedy["metrics"]["num_examples"] = 2**63
    record = coord.aggregate_round(plan.header(), [honest, greedy])
    assert record.reported == 1 and record.rejected == 1

