"""What one client does with one message, free of Flower so it can be tested and reused on a device.

The Flower ClientApp (``fedlora.clients.app``) only converts records and calls ``hello`` / ``train`` / ``evaluate``
here. Everything a client must remember between rounds (the global adapter it synced to, its personal factors,
its privacy ledger) lives in a ``ClientStore`` keyed by the client's identity, so a fresh process per round
(Flower deployment) or a restarted coordinator changes nothing.

Heavy objects (model, tokenizer, tokenised data) are cached per process: Flower's simulation runs many virtual
clients in a few Ray actors, and rebuilding MiniLM per message would cost seconds. The cached model is only a
workspace: before every use its whole adapter is overwritten from (seeded init ∪ synced global ∪ this client's
personal state), so no state leaks from one client to the next through it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from fedlora.aggregation.base import Strategy, Tensors
from fedlora.aggregation.quant import check_bits, decode_tensors, encode_tensors
from fedlora.clients.state import ClientStore
from fedlora.federation import ClientSpec


class StaleState(RuntimeError):
    """The client does not hold the global version the coordinator's delta payload assumes."""


@dataclass
class ClientContext:
    spec: ClientSpec
    index: int
    client_id: str
    strategy: Strategy
    model: Any
    pad_id: int
    init_adapter: Tensors
    train: list[dict]
    val: list[dict]


_CACHE: dict[str, Any] = {}


def _model_entry(spec: ClientSpec):
    """(model, tokenizer, seeded initial adapter) for this model spec, built once per process."""
    from fedlora.task.model import adapter_state, build_model, configure_threads, load_tokenizer

    key = f"model:{spec.model!r}:{spec.num_labels}:{spec.seed}"
    if key not in _CACHE:
        configure_threads(spec.torch_threads)
        model = build_model(spec.model, num_labels=spec.num_labels, seed=spec.seed)
        tok = load_tokenizer(spec.model)
        _CACHE.clear()  # one model per process: a new federation spec replaces the old one
        _CACHE[key] = (model, tok, adapter_state(model))
    return _CACHE[key]


def context(spec: ClientSpec, site, index: int, client_id: str | None = None) -> ClientContext:
    """The client ``index`` of ``site`` (its records tokenised once per process) ready for ``spec``."""
    from fedlora.task.data import tokenize

    model, tok, init = _model_entry(spec)
    key = f"data:{site.cache_key(index)}:{spec.model.max_length}"
    if key not in _CACHE:
        train, val = site.records(index)
        _CACHE[key] = (tokenize(train, tok, spec.model.max_length), tokenize(val, tok, spec.model.max_length))
    train, val = _CACHE[key]
    return ClientContext(
        spec=spec,
        index=index,
        client_id=client_id or site.client_id(index),
        strategy=spec.strategy.create(),
        model=model,
        pad_id=tok.pad_token_id or 0,
        init_adapter=init,
        train=train,
        val=val,
    )


def hello(ctx: ClientContext, store: ClientStore) -> dict:
    _, held_version = store.load_held()
    return {
        "client_id": ctx.client_id,
        "index": ctx.index,
        "n_train": len(ctx.train),
        "n_val": len(ctx.val),
        "held_version": -1 if held_version is None else held_version,
    }


def _bits(meta: dict) -> int:
    return check_bits(meta.get("bits", 32), key="meta.bits")


def _decode_payload(ctx: ClientContext, payload: Tensors, bits: int) -> Tensors:
    if bits == 32:
        return payload
    shapes = {k: v.shape for k, v in ctx.init_adapter.items()}
    keys = {k.split("::", 1)[0] for k in payload}
    return decode_tensors(payload, bits, {k: shapes[k] for k in keys})


def sync(ctx: ClientContext, store: ClientStore, payload: Tensors, meta: dict) -> Tensors:
    """The full global adapter state for this round, from what the client held and the downlink."""
    held, held_version = store.load_held()
    base = meta.get("base_version")
    if base is not None and held_version != base:
        raise StaleState(
            f"{ctx.client_id} holds global version {held_version}, the payload is a delta on version {base}"
        )
    payload = _decode_payload(ctx, payload, _bits(meta))
    full = ctx.strategy.client_sync(held if base is not None else None, payload, meta.get("sync", {}))
    store.save_held(full, int(meta["version"]))
    return full


def _load_workspace(ctx: ClientContext, store: ClientStore, global_state: Tensors) -> Tensors:
    """Overwrite the cached model's whole adapter: init, then global, then this client's personal keys."""
    from fedlora.task.model import load_adapter_state

    personal = {k: v for k, v in store.load_personal().items() if ctx.strategy.personal_key(k)}
    start = {**ctx.init_adapter, **global_state, **personal}
    load_adapter_state(ctx.model, start)
    return start


def _ledger(ctx: ClientContext, store: ClientStore):
    from fedlora.privacy.ledger import PrivacyLedger

    saved = store.load_ledger()
    if saved is not None:
        return PrivacyLedger.from_state_dict(saved)
    return PrivacyLedger.create(
        ctx.spec.privacy,
        n=len(ctx.train),
        batch_size=ctx.spec.batch_size,
        rounds=ctx.spec.rounds,
        local_steps=ctx.spec.local_steps,
    )


def train(ctx: ClientContext, store: ClientStore, payload: Tensors, meta: dict) -> tuple[Tensors, dict, dict]:
    """One round of local training. Returns (upload, metrics, info); an empty upload when declined."""
    from fedlora.clients.trainer import train_local
    from fedlora.task.model import adapter_state, set_trainable

    t0 = time.perf_counter()
    bits = _bits(meta)
    global_state = sync(ctx, store, payload, meta)
    start = _load_workspace(ctx, store, global_state)
    set_trainable(ctx.model, ctx.strategy.trains_key)
    privacy = ctx.spec.privacy if ctx.spec.privacy.enabled else None
    ledger = _ledger(ctx, store) if privacy is not None else None
    rnd = int(meta["round"])
    res = train_local(
        ctx.model,
        ctx.train,
        steps=ctx.spec.local_steps,
        batch_size=ctx.spec.batch_size,
        lr=ctx.spec.strategy.lr,
        optimizer=ctx.spec.strategy.optimizer,
        seed=ctx.spec.seed * 1_000_003 + rnd * 1009 + ctx.index,
        pad_id=ctx.pad_id,
        privacy=privacy,
        ledger=ledger,
    )
    info: dict[str, Any] = {"client_id": ctx.client_id, "bits": bits, "declined": res.declined or ""}
    if ledger is not None:
        store.save_ledger(ledger.state_dict())
        info["ledger"] = json.dumps(ledger_summary(ledger))
        info["can_run_next"] = int(ledger.can_run(ctx.spec.local_steps))
    metrics = {
        "loss": float(res.loss) if res.loss is not None else float("nan"),
        "num_examples": len(ctx.train),
        "steps": res.steps,
        "train_s": res.seconds,
        "client_s": 0.0,
        "epsilon": float(res.epsilon) if res.epsilon is not None else 0.0,
    }
    if res.declined:
        metrics["client_s"] = time.perf_counter() - t0
        return {}, metrics, info
    after = adapter_state(ctx.model)
    upload = {k: after[k] - start[k] for k in after if ctx.strategy.shares_key(k)}
    personal = {k: after[k] for k in after if ctx.strategy.personal_key(k)}
    if personal:
        store.save_personal(personal)
    if bits != 32:
        upload = encode_tensors(upload, bits)
    metrics["client_s"] = time.perf_counter() - t0
    return upload, metrics, info


def evaluate(ctx: ClientContext, store: ClientStore, payload: Tensors, meta: dict) -> dict:
    """Personalised evaluation: synced global + this client's own personal state, on its own validation split."""
    from fedlora.task.train import evaluate as eval_model

    global_state = sync(ctx, store, payload, meta)
    _load_workspace(ctx, store, global_state)
    out = eval_model(ctx.model, ctx.val, pad_id=ctx.pad_id)
    return {"accuracy": float(out["accuracy"]), "loss": float(out["loss"]), "num_examples": int(out["n"])}


def ledger_summary(ledger) -> dict:
    return {
        "epsilon": ledger.epsilon(),
        "steps": ledger.steps,
        "target_epsilon": ledger.target_epsilon,
        "delta": ledger.delta,
        "noise_multiplier": ledger.noise_multiplier,
        "sample_rate": ledger.sample_rate,
        "accountant": ledger.accountant,
    }
