"""What one client does with one message, free of Flower so it can be tested and reused on a device.

The Flower ClientApp (``fedlora.clients.app``) only converts records to tensors and calls ``train`` /
``evaluate`` here. Everything a client must remember between rounds (the global adapter it synced to, its
personal factors, its privacy ledger) lives in a ``ClientStore`` keyed by the client's identity, so a fresh
process per round (Flower deployment) or a restarted coordinator changes nothing.

Heavy objects (model, tokenizer, tokenised data) are cached per process: Flower's simulation runs many
virtual clients in a few Ray actors, and rebuilding MiniLM per message would cost seconds. The cached model
is only a workspace: before every use its whole adapter is overwritten from (seeded init ∪ synced global ∪
this client's personal state), so no state leaks from one client to the next through it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.aggregation.base import Strategy, Tensors

CLIENT_ID_FMT = "client-{:03d}"


class StaleState(RuntimeError):
    """The client does not hold the global version the coordinator's delta payload assumes."""


@dataclass
class ClientContext:
    cfg: dict
    index: int
    client_id: str
    bits: int
    strategy: Strategy
    model: Any
    pad_id: int
    init_adapter: Tensors
    train: list[dict]
    val: list[dict]


_CACHE: dict[str, Any] = {}


def _specs(cfg: dict):
    from fedlora.clients.data import DataSpec
    from fedlora.clients.model import ModelSpec

    data = DataSpec.from_dict({**cfg["data"], "seed": cfg["seed"]})
    model = ModelSpec.from_dict({**cfg["model"], "seed": cfg["seed"], "num_labels": cfg["num_labels"]})
    return data, model


def make_strategy(cfg: dict) -> Strategy:
    from fedlora.aggregation import create

    s = cfg["strategy"]
    return create(s["name"], train_head=s["train_head"], weighting=s["weighting"], **(s.get("params") or {}))


def _model_entry(cfg: dict):
    """(model, tokenizer, seeded initial adapter) for this model spec, built once per process."""
    from fedlora.clients.model import adapter_state, build_model, configure_threads, load_tokenizer

    _, mspec = _specs(cfg)
    key = "model:" + repr(mspec)
    if key not in _CACHE:
        configure_threads(cfg.get("runtime", {}).get("torch_threads"))
        model = build_model(mspec)
        tok = load_tokenizer(mspec)
        _CACHE.clear()  # one model per process: a new federation spec replaces the old one
        _CACHE[key] = (model, tok, adapter_state(model))
    return _CACHE[key]


def client_bits(cfg: dict, index: int) -> int:
    from fedlora.config import fleet_mix

    mix = fleet_mix(cfg)
    if set(mix) == {32}:
        return 32
    from fedlora.aggregation.bitwidth import fleet_bitwidths

    return fleet_bitwidths(mix, cfg["clients"]["num"], cfg["seed"])[index]


def context(cfg: dict, index: int, client_id: str | None = None) -> ClientContext:
    from fedlora.clients.data import client_split, tokenize

    model, tok, init = _model_entry(cfg)
    dspec, mspec = _specs(cfg)
    key = f"data:{dspec!r}:{cfg['clients']['num']}:{index}"
    if key not in _CACHE:
        train, val = client_split(dspec, cfg["clients"]["num"], index)
        _CACHE[key] = (tokenize(train, tok, mspec.max_length), tokenize(val, tok, mspec.max_length))
    train, val = _CACHE[key]
    return ClientContext(
        cfg=cfg,
        index=index,
        client_id=client_id or CLIENT_ID_FMT.format(index),
        bits=client_bits(cfg, index),
        strategy=make_strategy(cfg),
        model=model,
        pad_id=tok.pad_token_id or 0,
        init_adapter=init,
        train=train,
        val=val,
    )


def hello(ctx: ClientContext, store) -> dict:
    _, held_version = store.load_held()
    return {
        "client_id": ctx.client_id,
        "index": ctx.index,
        "n_train": len(ctx.train),
        "n_val": len(ctx.val),
        "bits": ctx.bits,
        "held_version": -1 if held_version is None else held_version,
    }


def _decode_payload(ctx: ClientContext, payload: Tensors) -> Tensors:
    if ctx.bits == 32:
        return payload
    from fedlora.aggregation.quant import decode_tensors

    shapes = {k: v.shape for k, v in ctx.init_adapter.items()}
    keys = {k.split("::", 1)[0] for k in payload}
    return decode_tensors(payload, ctx.bits, {k: shapes[k] for k in keys})


def sync(ctx: ClientContext, store, payload: Tensors, meta: dict) -> Tensors:
    """The full global adapter state for this round, from what the client held and the downlink."""
    held, held_version = store.load_held()
    base = meta.get("base_version")
    if base is not None and held_version != base:
        raise StaleState(
            f"{ctx.client_id} holds global version {held_version}, the payload is a delta on version {base}"
        )
    full = ctx.strategy.client_sync(held if base is not None else None, _decode_payload(ctx, payload), meta.get("sync", {}))
    store.save_held(full, int(meta["version"]))
    return full


def _load_workspace(ctx: ClientContext, store, global_state: Tensors) -> Tensors:
    """Overwrite the cached model's whole adapter: init, then global, then this client's personal keys."""
    from fedlora.clients.model import load_adapter_state

    personal = {k: v for k, v in store.load_personal().items() if ctx.strategy.personal_key(k)}
    start = {**ctx.init_adapter, **global_state, **personal}
    load_adapter_state(ctx.model, start)
    return start


def _ledger(ctx: ClientContext, store):
    from fedlora.privacy.calibrate import DPSettings
    from fedlora.privacy.ledger import PrivacyLedger

    settings = DPSettings.from_dict(ctx.cfg["privacy"])
    saved = store.load_ledger()
    if saved is not None:
        return settings, PrivacyLedger.from_state_dict(saved)
    ledger = PrivacyLedger.create(
        settings,
        n=len(ctx.train),
        batch_size=ctx.cfg["clients"]["batch_size"],
        rounds=ctx.cfg["rounds"],
        local_steps=ctx.cfg["clients"]["local_steps"],
    )
    return settings, ledger


def train(ctx: ClientContext, store, payload: Tensors, meta: dict) -> tuple[Tensors, dict, dict]:
    """One round of local training. Returns (upload, metrics, info); an empty upload when declined."""
    from fedlora.clients.model import adapter_state, set_trainable
    from fedlora.clients.trainer import train_local

    t0 = time.perf_counter()
    global_state = sync(ctx, store, payload, meta)
    start = _load_workspace(ctx, store, global_state)
    set_trainable(ctx.model, ctx.strategy.trains_key)
    privacy, ledger = (None, None)
    if ctx.cfg["privacy"].get("enabled"):
        privacy, ledger = _ledger(ctx, store)
    rnd = int(meta["round"])
    res = train_local(
        ctx.model,
        ctx.train,
        steps=ctx.cfg["clients"]["local_steps"],
        batch_size=ctx.cfg["clients"]["batch_size"],
        lr=ctx.cfg["strategy"]["lr"],
        optimizer=ctx.cfg["strategy"]["optimizer"],
        seed=ctx.cfg["seed"] * 1_000_003 + rnd * 1009 + ctx.index,
        pad_id=ctx.pad_id,
        privacy=privacy,
        ledger=ledger,
    )
    info: dict[str, Any] = {"client_id": ctx.client_id, "bits": ctx.bits, "declined": res.declined or ""}
    if ledger is not None:
        store.save_ledger(ledger.state_dict())
        info["ledger"] = json.dumps(_ledger_summary(ledger))
        info["can_run_next"] = int(ledger.can_run(ctx.cfg["clients"]["local_steps"]))
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
    if ctx.bits != 32:
        from fedlora.aggregation.quant import encode_tensors

        upload = encode_tensors(upload, ctx.bits)
    metrics["client_s"] = time.perf_counter() - t0
    return upload, metrics, info


def evaluate(ctx: ClientContext, store, payload: Tensors, meta: dict) -> dict:
    """Personalised evaluation: synced global + this client's own personal state, on its own validation split."""
    from fedlora.clients.trainer import evaluate as eval_model

    global_state = sync(ctx, store, payload, meta)
    _load_workspace(ctx, store, global_state)
    out = eval_model(ctx.model, ctx.val, pad_id=ctx.pad_id)
    return {"accuracy": float(out["accuracy"]), "loss": float(out["loss"]), "num_examples": int(out["n"])}


def _ledger_summary(ledger) -> dict:
    return {
        "epsilon": ledger.epsilon(),
        "steps": ledger.steps,
        "target_epsilon": ledger.target_epsilon,
        "delta": ledger.delta,
        "noise_multiplier": ledger.noise_multiplier,
        "sample_rate": ledger.sample_rate,
        "accountant": ledger.accountant,
    }


def payload_bytes(tensors: Tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors.values()))


def to_records(tensors: Tensors):
    from flwr.app import ArrayRecord

    return ArrayRecord(torch_state_dict={k: v.contiguous() for k, v in tensors.items()})


def from_records(rec) -> Tensors:
    return {k: v for k, v in rec.to_torch_state_dict().items()} if rec is not None else {}


def tensors_equal(a: Tensors, b: Tensors) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
