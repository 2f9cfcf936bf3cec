"""What travels to a client: the client spec carries what it needs to train, nothing about other clients (their
data sizes, the partitioning) and no server path."""

from __future__ import annotations

import csv
import dataclasses
import json
import random

import pytest

from fedlora.federation import ClientSpec
from fedlora.lifecycle import InProcessTransport, prepare, run_inprocess
from fedlora.task.data import partition_sizes
from tests.conftest import TINY, config

pytestmark = pytest.mark.federation


def test_the_spec_a_client_receives_carries_no_other_clients_data_and_no_server_path(tmp_path, monkeypatch):
    data = tmp_path / "server-only" / "corpus.csv"
    data.parent.mkdir()
    rng = random.Random(0)
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(400):
            w.writerow([f"sentence {i} " + " ".join(rng.choice("abcdefgh") for _ in range(6)), rng.choice("ab")])
    runs = tmp_path / "runs-root"
    cfg = config(*[o for o in TINY if not o.startswith("data.")], "data=local", f"data.path={data}",
                 f"runs_root={runs}", "privacy=dp", "privacy.epsilon=50", "rounds=1", "data.partitioner=iid")
    sizes = partition_sizes(cfg.data, cfg.clients.num, cfg.seed)
    seen: list[str] = []
    real_handshake, real_exchange = InProcessTransport.handshake, InProcessTransport.exchange
    monkeypatch.setattr(InProcessTransport, "handshake",
                        lambda self, spec: seen.append(spec) or real_handshake(self, spec))
    monkeypatch.setattr(InProcessTransport, "exchange",
                        lambda self, kind, spec, msgs: seen.append(spec) or real_exchange(self, kind, spec, msgs))
    run_dir = tmp_path / "the-run-dir"
    s = run_inprocess(cfg, run_dir, echo=lambda *_: None)
    assert s["rounds_completed"] == 1 and seen
    assert len(set(seen)) == 1  # one spec for every client and message: nothing in it is per-client
    spec = json.loads(seen[0])
    assert set(spec) == {f.name for f in dataclasses.fields(ClientSpec)}
    text = seen[0]
    for secret in (str(tmp_path), str(data), str(runs), str(run_dir), "client_train_sizes", "state_root"):
        assert secret not in text, secret
    assert json.dumps(sizes) not in text and "num_clients" not in text and "partitioner" not in text
    assert spec["labels"] == prepare(cfg) == ["a", "b"]
    assert ClientSpec.from_dict(spec).privacy == cfg.privacy
