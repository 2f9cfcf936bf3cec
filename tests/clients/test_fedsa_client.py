"""FedSA-LoRA on the client: only A leaves, B and the head are personal, persist, and are what evaluation uses."""

from __future__ import annotations

import pytest
import torch

from fedlora.aggregation.base import LORA_A, kind_of
from fedlora.aggregation.quant import payload_bytes
from fedlora.clients import worker
from fedlora.clients.state import ClientStore
from fedlora.federation import client_spec
from fedlora.lifecycle import prepare, simulated_site
from tests.conftest import TINY, config


def _meta(rnd: int, version: int, base: int | None) -> dict:
    return {"round": rnd, "version": version, "base_version": base, "sync": {}, "kind": "train", "bits": 32}


def _personal_b(store: ClientStore) -> dict[str, torch.Tensor]:
    return {k: v for k, v in store.load_personal().items() if "lora_B" in k}


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """Clients 0 and 1 after one round of FedSA-LoRA from the initial global state (each test reads, none
    depends on another test's writes)."""
    root = tmp_path_factory.mktemp("fedsa")
    cfg = config(*TINY, f"runs_root={root}", "strategy=fedsa", "clients.local_steps=4")
    spec = client_spec(cfg, prepare(cfg))
    site = simulated_site(cfg, root / "run")
    ctx0 = worker.context(spec, site, 0)
    payload = ctx0.strategy.init_global(ctx0.init_adapter)
    ups = {}
    for i in (0, 1):
        store = ClientStore(site.state_root, site.client_id(i))
        ups[i] = worker.train(worker.context(spec, site, i), store, payload, _meta(1, 0, None))
    return spec, site, payload, ups


def test_only_a_leaves_and_b_is_personal_per_client(fed):
    spec, site, payload, ups = fed
    for up, metrics, info in ups.values():
        assert up and all(kind_of(k) == LORA_A for k in up), sorted(up)[:3]
        assert metrics["num_examples"] > 0 and not info["declined"]
    assert payload_bytes(ups[0][0]) == sum(v.numel() * 4 for k, v in payload.items() if kind_of(k) == LORA_A)
    stores = [ClientStore(site.state_root, site.client_id(i)) for i in (0, 1)]
    b0, b1 = (_personal_b(s) for s in stores)
    assert b0.keys() == b1.keys() and b0
    assert any(not torch.equal(b0[k], b1[k]) for k in b0), "two clients with different data hold the same B"
    assert all(v.abs().sum() > 0 for v in b0.values())  # trained away from PEFT's zero init
    heads = [{k: v for k, v in s.load_personal().items() if kind_of(k) == "head"} for s in stores]
    assert heads[0] and any(not torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_round_t_plus_1_starts_from_the_clients_own_b_after_a_restart(fed, monkeypatch):
    """A fresh context and store object (a new ClientApp process) resume from the B saved after round t."""
    from fedlora.clients import trainer
    from fedlora.task.model import adapter_state

    spec, site, payload, _ = fed
    store = ClientStore(site.state_root, site.client_id(2))
    worker.train(worker.context(spec, site, 2), store, payload, _meta(1, 0, None))
    after_1 = _personal_b(store)
    seen = {}
    real = trainer.train_local

    def spy(model, *a, **kw):
        seen.update({k: v.clone() for k, v in adapter_state(model).items() if "lora_B" in k})
        return real(model, *a, **kw)

    monkeypatch.setattr(trainer, "train_local", spy)
    fresh_store = ClientStore(site.state_root, site.client_id(2))
    worker.train(worker.context(spec, site, 2), fresh_store, {}, _meta(2, 1, 0))  # nothing new from the server
    assert seen.keys() == after_1.keys()
    assert all(torch.equal(seen[k], after_1[k]) for k in after_1)
    assert any(not torch.equal(after_1[k], v) for k, v in _personal_b(fresh_store).items())  # and it trained on


def test_personalised_evaluation_uses_the_clients_own_b(fed):
    from fedlora.task.model import load_adapter_state
    from fedlora.task.train import evaluate

    spec, site, payload, _ = fed
    s0, s1 = (ClientStore(site.state_root, site.client_id(i)) for i in (0, 1))
    ctx = worker.context(spec, site, 0)
    got = worker.evaluate(ctx, s0, payload, _meta(1, 1, None))
    held, _ = s0.load_held()
    for store, should_match in ((s0, True), (s1, False)):
        load_adapter_state(ctx.model, {**ctx.init_adapter, **held, **store.load_personal()})
        ref = evaluate(ctx.model, ctx.val, pad_id=ctx.pad_id)
        assert (ref["loss"] == pytest.approx(got["loss"], rel=1e-6)) is should_match
