"""The client's privacy under faults: the ledger fails closed, privacy is charged on disk before any noise is
drawn, a round already charged is never charged again, and a straggler's late result changes nothing."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from fedlora.clients import worker
from fedlora.clients.state import ClientStore
from fedlora.federation import client_spec
from fedlora.lifecycle import prepare, simulated_site
from tests.conftest import TINY, config


@pytest.fixture
def client(tmp_path):
    cfg = config(*TINY, f"runs_root={tmp_path}", "strategy=fedsa", "privacy=dp", "privacy.epsilon=50",
                 "rounds=6")
    spec = client_spec(cfg, prepare(cfg))
    site = simulated_site(cfg, tmp_path / "run")
    ctx = worker.context(spec, site, 1)
    store = ClientStore(site.state_root, ctx.client_id)
    init = ctx.strategy.init_global(ctx.init_adapter)

    def train(rnd: int, version: int | None = None, *, store=store):
        version = rnd - 1 if version is None else version
        held = store.load_held()[1]
        payload = init if held is None else {}
        meta = {"round": rnd, "version": version if held is None else held, "base_version": held, "sync": {},
                "kind": "train", "bits": 32}
        return worker.train(worker.context(spec, site, 1), store, payload, meta)

    return cfg, ctx, store, train


def _ledger(store: ClientStore) -> dict:
    return json.loads(store.ledger_path.read_text())


def test_a_deleted_ledger_fails_closed_naming_the_file(client):
    cfg, ctx, store, train = client
    up, _, info = train(1)
    assert up and not info["declined"] and _ledger(store)["steps"] == cfg.clients.local_steps
    store.ledger_path.unlink()
    up, metrics, info = train(2)
    assert up == {} and metrics["steps"] == 0
    assert str(store.ledger_path) in info["declined"] and "missing" in info["declined"]
    assert "restore" in info["declined"] and "new budget" in info["declined"]
    assert not store.ledger_path.exists()  # never restarted at ε = 0
    assert worker.hello(ctx, store)["ledger_steps"] == -1


def test_a_wiped_state_folder_is_refused_by_the_coordinators_ledger_floor(client):
    """A client whose whole state folder is gone (ledger and spent-privacy marker both: a reimaged disk, a node
    without the shared storage) would look new. The coordinator registers simulated clients without asking them,
    so every train message carries the DP steps the client reported before; below it, the client refuses."""
    import shutil

    cfg, ctx, store, train = client
    up, _, info = train(1)
    reported = json.loads(info["ledger"])["steps"]
    shutil.rmtree(store.dir)
    meta = {"round": 2, "version": 1, "base_version": None, "sync": {}, "kind": "train", "bits": 32,
            "ledger_floor": reported}
    init = ctx.strategy.init_global(ctx.init_adapter)
    up, metrics, info = worker.train(ctx, store, init, meta)
    assert up == {} and metrics["steps"] == 0
    assert f"below the {reported}" in info["declined"] and str(store.ledger_path) in info["declined"]
    assert not store.ledger_path.exists()  # nothing charged, nothing trained
    up, _, info = worker.train(ctx, store, init, {**meta, "ledger_floor": 0})  # no floor: it would look new
    assert up and not info["declined"]


@pytest.mark.parametrize("garbage", ["", "{not json", "[1, 2]", '{"version": 2, "steps": "many"}'])
def test_a_corrupt_ledger_fails_closed_naming_the_file(client, garbage):
    _, _, store, train = client
    train(1)
    store.ledger_path.write_text(garbage)
    up, _, info = train(2)
    assert up == {} and str(store.ledger_path) in info["declined"]
    assert "unreadable" in info["declined"] or "inconsistent" in info["declined"]


def test_privacy_is_on_disk_before_the_first_random_draw(client, monkeypatch):
    """A straggler stopped mid-round, or a crash, can never leave the ledger below what ran: the steps are
    charged on disk before DP-SGD draws its first sampling or noise bit."""
    from fedlora.privacy.noise import SecureNoise

    cfg, _, store, train = client
    train(1)
    seen = []
    real = SecureNoise.uniform

    def spy(self, n):
        if not seen:
            led = _ledger(store)
            seen.append((led["steps"], [c["round"] for c in led["charges"]]))
        return real(self, n)

    monkeypatch.setattr(SecureNoise, "uniform", spy)
    train(2)
    assert seen == [(2 * cfg.clients.local_steps, [1, 2])]


def test_a_crash_after_the_charge_leaves_the_charge_on_disk(client, monkeypatch):
    from fedlora.faults import FailpointError

    cfg, _, store, train = client
    monkeypatch.setenv("FEDLORA_FAILPOINTS", "client.charged@1=raise")
    with pytest.raises(FailpointError):
        train(1)
    led = _ledger(store)
    assert led["steps"] == cfg.clients.local_steps and led["participations"] == 1


def test_a_round_already_answered_is_replayed_not_charged_again(client):
    _, _, store, train = client
    first = train(1)
    again = train(1, version=0)  # a resumed coordinator asks for round 1 again
    assert _ledger(store)["participations"] == 1
    assert first[0].keys() == again[0].keys() and all(torch.equal(first[0][k], again[0][k]) for k in first[0])
    assert again[2] == first[2]


def test_a_straggler_that_wakes_up_late_changes_nothing(client, monkeypatch):
    """Round 3's process stops after its charge; round 5 runs meanwhile (another process in real life); the
    straggler then finishes: both charges stay in the ledger and round 5's personal state is not overwritten."""
    import fedlora.clients.worker as w

    cfg, ctx, store, train = client
    train(1)
    go, parked = threading.Event(), threading.Event()
    real = w.failpoint

    def park(name, **kw):
        if name == "client.charged" and kw.get("round") == 3:
            parked.set()
            go.wait(60)
        return real(name, **kw)

    monkeypatch.setattr(w, "failpoint", park)
    late: dict = {}
    t = threading.Thread(target=lambda: late.update(r=train(3, store=ClientStore(store.dir.parent, ctx.client_id))))
    t.start()
    assert parked.wait(60)
    train(5, version=3)
    personal_5 = store.load_personal()
    go.set()
    t.join(120)
    led = _ledger(store)
    assert [c["round"] for c in led["charges"]] == [1, 3, 5] and led["steps"] == 3 * cfg.clients.local_steps
    assert all(torch.equal(personal_5[k], v) for k, v in store.load_personal().items())
    assert store.load_reply(3, 0) is None and late["r"][0]  # the late reply was produced, but not committed
