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
from fedlora.clients.state import ClientStore, LedgerUnavailable, attempt_alive, attempt_identity
from fedlora.faults import failpoint
from fedlora.federation import ClientSpec
from fedlora.schema import ConfigError
from fedlora.task.cache import cache_start, cached_records


class StaleState(RuntimeError):
    """The client does not hold the global version the coordinator's delta payload assumes."""


@dataclass
class ClientContext:
    spec: ClientSpec
    index: int
    client_id: str
    strategy: Strategy
    model: Any  # the PEFT model (adapter state lives here)
    runner: Any  # what trains and evaluates: the model, or its cached suffix (task.cache) on cached records
    pad_id: int
    init_adapter: Tensors
    train: list[dict]
    val: list[dict]


_CACHE: dict[str, Any] = {}
MAX_CACHED_CLIENTS = 512  # tokenised data kept per process (a client sampled again reuses it)


def client_device(spec: ClientSpec, site):
    """Where this client trains: ``clients.device``; ``auto`` is CUDA only for a client that holds a GPU (a
    simulated one whose actor reserved ``clients.gpus``, or a real device with a visible GPU)."""
    from fedlora.task.model import resolve_device

    return resolve_device(spec.device, key="clients.device", gpu_held=spec.gpus > 0 or not site.simulated)


def _model_entry(spec: ClientSpec, device):
    """(model, tokenizer, seeded initial adapter) for this model spec, built once per process."""
    from fedlora.task.model import adapter_state, build_model, configure_threads, load_tokenizer

    key = f"model:{spec.model!r}:{spec.num_labels}:{spec.seed}:{device}"
    if key not in _CACHE:
        configure_threads(spec.torch_threads)
        model = build_model(spec.model, num_labels=spec.num_labels, seed=spec.seed, device=device)
        tok = load_tokenizer(spec.model)
        _CACHE.clear()  # one model per process: a new federation spec replaces the old one
        _CACHE[key] = (model, tok, adapter_state(model))
    return _CACHE[key]


def _runner(model, start: int, pooling: str):
    """The model itself, or (cached frozen prefix) its suffix module, built once per process."""
    if not start:
        return model
    key = f"runner:{id(model)}:{start}:{pooling}"
    if key not in _CACHE:
        from fedlora.task.cache import CachedSuffix

        _CACHE[key] = CachedSuffix(model, start, pooling)
    return _CACHE[key]


def context(spec: ClientSpec, site, index: int, client_id: str | None = None) -> ClientContext:
    """The client ``index`` of ``site`` (its records tokenised once per process) ready for ``spec``."""
    from fedlora.task.data import tokenize

    model, tok, init = _model_entry(spec, client_device(spec, site))
    pad_id = tok.pad_token_id or 0
    strategy = spec.strategy.create()
    start = cache_start(spec.model, model, trains_lora=strategy.trains_lora)
    key = f"data:{site.cache_key(index)}:{spec.model.max_length}:{start}"
    if key not in _CACHE:
        train, val = (tokenize(part, tok, spec.model.max_length) for part in site.records(index, spec.labels))
        if start:
            train, val = (cached_records(model, start, part, cache_dir=site.cache_dir, pad_id=pad_id)
                          for part in (train, val))
        _CACHE[key] = (train, val)
        data_keys = [k for k in _CACHE if k.startswith("data:")]
        for old in data_keys[:-MAX_CACHED_CLIENTS]:  # thousands of virtual clients: keep the latest ones' data
            del _CACHE[old]
    train, val = _CACHE[key]
    return ClientContext(
        spec=spec,
        index=index,
        client_id=client_id or site.client_id(index),
        strategy=strategy,
        model=model,
        runner=_runner(model, start, spec.model.pooling),
        pad_id=pad_id,
        init_adapter=init,
        train=train,
        val=val,
    )


def hello(ctx: ClientContext, store: ClientStore) -> dict:
    """The handshake reply: who this client is, its data sizes, the global version it holds, and how many DP
    steps its ledger records (-1: no readable ledger), so a coordinator can tell a ledger that went backwards."""
    _, held_version = store.load_held()
    try:
        ledger = store.load_ledger()
        ledger_steps = int(ledger["steps"]) if ledger is not None else 0
    except (LedgerUnavailable, KeyError, TypeError, ValueError):
        ledger_steps = -1
    return {
        "client_id": ctx.client_id,
        "index": ctx.index,
        "n_train": len(ctx.train),
        "n_val": len(ctx.val),
        "held_version": -1 if held_version is None else held_version,
        "ledger_steps": ledger_steps,
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
    if held is not None and held_version == int(meta["version"]):
        return held  # already synced to this version (a round asked again after a coordinator restart)
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
    """This client's privacy ledger: the one on disk, or a new one for a client that never spent privacy.
    Raises ``LedgerUnavailable`` (fail closed) when the file is missing or unreadable for a client that did."""
    from fedlora.privacy.ledger import PrivacyLedger

    saved = store.load_ledger()
    if saved is not None:
        try:
            ledger = PrivacyLedger.from_state_dict(saved)
        except Exception as e:  # noqa: BLE001 - a ledger file is input: any inconsistency refuses, naming it
            raise LedgerUnavailable(f"{ctx.client_id}: privacy ledger {store.ledger_path} is inconsistent "
                                    f"({type(e).__name__}: {e}); the privacy it spent cannot be reconstructed, so "
                                    "this client refuses to train: restore it from a backup, or retire this "
                                    "client identity") from None
        if ledger.n is not None and ledger.n != len(ctx.train):
            raise LedgerUnavailable(f"{ctx.client_id}: the privacy ledger was made for n={ledger.n} records, this "
                                    f"client now has {len(ctx.train)}: its sample rate q = batch/n would be wrong")
        return ledger
    return PrivacyLedger.create(
        ctx.spec.privacy,
        n=len(ctx.train),
        batch_size=ctx.spec.batch_size,
        sample_rate=ctx.spec.sample_rate,
        rounds=ctx.spec.rounds,
        local_steps=ctx.spec.local_steps,
    )


def _charge(ctx: ClientContext, store: ClientStore, rnd: int, version: int, floor: int = 0):
    """Under the client's lock: (ledger, None) once this round's steps are charged on disk — before any noise is
    drawn — or (ledger or None, why not) when the client must not train. A round this client was already
    charged for by an attempt that died before replying (it released nothing) reuses that charge; one charged
    by an attempt still alive (a straggler that may yet reply) is charged again: over-counting is safe.
    ``floor``: the DP steps this client reported to the coordinator before; a ledger holding fewer was reset,
    deleted or replaced, and the privacy it forgot cannot be reconstructed: refuse."""
    try:
        ledger = _ledger(ctx, store)
    except LedgerUnavailable as e:
        return None, str(e)
    except ConfigError as e:  # its own privacy preconditions (δ < 1/n, batch <= n) fail: decline, say why
        return None, f"privacy preconditions: {e}"
    if ledger.steps < floor:
        return ledger, (f"privacy ledger {store.ledger_path} records {ledger.steps} DP steps, below the {floor} this "
                        "client reported before (reset, deleted or replaced): the privacy it spent cannot be "
                        "reconstructed; restore the ledger from a backup, or retire this client identity")
    prior = ledger.charge_for(rnd, version)
    if prior is not None and not attempt_alive(prior["attempt"]):
        return ledger, None
    reason = ledger.decline_reason(ctx.spec.local_steps)
    if reason is not None:
        return ledger, reason
    ledger.charge(round=rnd, version=version, steps=ctx.spec.local_steps, attempt=attempt_identity())
    store.save_ledger(ledger.state_dict())
    return ledger, None


def _privacy_info(ctx: ClientContext, ledger) -> dict[str, Any]:
    if ledger is None:
        return {}
    return {"ledger": json.dumps(ledger_summary(ledger, ctx.spec.privacy.noise)),
            "can_run_next": int(ledger.can_run(ctx.spec.local_steps))}


def train(ctx: ClientContext, store: ClientStore, payload: Tensors, meta: dict) -> tuple[Tensors, dict, dict]:
    """One round of local training. Returns (upload, metrics, info); an empty upload when declined.

    Exactly once per (round, version): the reply is stored before it is returned, and a request for a round
    already answered replays the stored reply instead of training (and, under DP, spending) again."""
    from fedlora.clients.trainer import train_local
    from fedlora.privacy.dp import DPPlan
    from fedlora.privacy.noise import noise_source
    from fedlora.task.model import adapter_state, set_trainable

    t0 = time.perf_counter()
    bits = _bits(meta)
    rnd, version = int(meta["round"]), int(meta["version"])
    seed = ctx.spec.seed * 1_000_003 + rnd * 1009 + ctx.index
    info: dict[str, Any] = {"client_id": ctx.client_id, "bits": bits, "declined": ""}
    plan = None
    with store.lock():
        stored = store.load_reply(rnd, version)
        if stored is not None:
            if stored["personal"]:  # a crash may have come between storing the reply and the personal state
                store.save_personal(stored["personal"])
            return stored["upload"], stored["metrics"], stored["info"]
        global_state = sync(ctx, store, payload, meta)
        store.mark_started(rnd)
        if ctx.spec.privacy.enabled:
            ledger, why_not = _charge(ctx, store, rnd, version, int(meta.get("ledger_floor") or 0))
            info.update(_privacy_info(ctx, ledger))
            if why_not is not None:
                info["declined"] = why_not
                metrics = {"loss": float("nan"), "num_examples": len(ctx.train), "steps": 0, "train_s": 0.0,
                           "client_s": time.perf_counter() - t0,
                           "epsilon": ledger.epsilon() if ledger is not None else float("nan")}
                return {}, metrics, info
            p = ctx.spec.privacy
            plan = DPPlan(noise_multiplier=ledger.noise_multiplier, sample_rate=ledger.sample_rate, clip=p.clip,
                          grad_sample_mode=p.grad_sample_mode, noise=noise_source(p.noise, seed))
    failpoint("client.charged", round=rnd, client=ctx.client_id)
    start = _load_workspace(ctx, store, global_state)
    set_trainable(ctx.model, ctx.strategy.trains_key)
    res = train_local(
        ctx.runner,
        ctx.train,
        steps=ctx.spec.local_steps,
        batch_size=ctx.spec.batch_for(len(ctx.train)),
        lr=ctx.spec.strategy.lr,
        optimizer=ctx.spec.strategy.optimizer,
        seed=seed,
        pad_id=ctx.pad_id,
        dp=plan,
    )
    after = adapter_state(ctx.model)
    upload = {k: after[k] - start[k] for k in after if ctx.strategy.shares_key(k)}
    personal = {k: after[k] for k in after if ctx.strategy.personal_key(k)}
    if bits != 32:
        upload = encode_tensors(upload, bits)
    metrics = {"loss": float(res.loss), "num_examples": len(ctx.train), "steps": res.steps, "train_s": res.seconds,
               "client_s": time.perf_counter() - t0, "epsilon": json.loads(info["ledger"])["epsilon"]
               if "ledger" in info else 0.0}
    with store.lock():
        if store.started_round() > rnd:  # a later round started meanwhile: this reply is stale, change nothing
            return upload, metrics, info
        store.save_reply(rnd, version, {"upload": upload, "metrics": metrics, "info": info, "personal": personal})
        failpoint("client.replied", round=rnd, client=ctx.client_id)
        if personal:
            store.save_personal(personal)
    return upload, metrics, info


def evaluate(ctx: ClientContext, store: ClientStore, payload: Tensors, meta: dict) -> dict:
    """Personalised evaluation: synced global + this client's own personal state, on its own validation split."""
    from fedlora.task.train import evaluate as eval_model

    global_state = sync(ctx, store, payload, meta)
    _load_workspace(ctx, store, global_state)
    out = eval_model(ctx.runner, ctx.val, pad_id=ctx.pad_id)
    return {"accuracy": float(out["accuracy"]), "loss": float(out["loss"]), "num_examples": int(out["n"])}


def ledger_summary(ledger, noise: str) -> dict:
    return {
        "epsilon": ledger.epsilon(),
        "steps": ledger.steps,
        "participations": ledger.participations,
        "noise": noise,
        "target_epsilon": ledger.target_epsilon,
        "delta": ledger.delta,
        "noise_multiplier": ledger.noise_multiplier,
        "sample_rate": ledger.sample_rate,
        "accountant": ledger.accountant,
    }
