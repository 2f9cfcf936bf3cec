"""The coordinator: the federation's state and round logic, hosted as a Ray actor.

It owns the global adapter, the strategy (and its state), the clients' versions, the privacy-ledger mirror,
checkpoints, ``summary.json`` and tracking. The round loop (``rounds.run_rounds``) asks it what to send, carries
the messages over a transport (Flower, or in-process calls) and hands back what came back. Nothing here imports
Flower or client code, so the same object serves simulation and deployment, and tests can drive it directly.

A round, as the loop drives it: ``plan_round`` → (send) → ``aggregate_round(plan, replies)`` →
``plan_evaluate(record)`` → (send) → ``close_round(record, replies)``; the plan and the record travel with
the loop, nothing of a round in flight is kept on the coordinator.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Callable

import torch

from fedlora.aggregation.base import ClientUpdate, Tensors
from fedlora.aggregation.quant import encode_tensors, fake_quantize, payload_bytes
from fedlora.config import FedConfig
from fedlora.coordinator.mlmodel import make_portable, model_card
from fedlora.coordinator.observers import CheckpointObserver, RoundObserver, SummaryObserver
from fedlora.coordinator.records import ClientRow, Downlink, RoundPlan, RoundRecord, Sent
from fedlora.coordinator.tracking import make_tracker
from fedlora.coordinator.validation import UpdateRejected, parse_eval_reply, parse_hello, parse_reply
from fedlora.env import quiet_logs
from fedlora.federation import client_spec, fleet_bits, server_strategy
from fedlora.task.cache import CachedSuffix, cache_start, cached_records
from fedlora.task.data import global_split, tokenize
from fedlora.task.model import adapter_state, build_model, load_adapter_state, load_tokenizer, resolve_device
from fedlora.task.train import evaluate

log = logging.getLogger("fedlora.coordinator")

CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"


#: config keys a resumed run may change (how long and where it runs); everything else, privacy above all, is the
#: stored run's: a resumed federation is the same federation
RESUMABLE = ("rounds", "round_timeout_s", "tracking.uri", "runtime", "faults", "deploy")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) and k != "params" and k != "bitwidths" else {key: v})
    return out


def config_changes(stored: dict, new: dict) -> list[str]:
    """The keys whose values differ between two configs, resumable ones left out."""
    a, b = _flat(stored), _flat(new)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not any(k == r or k.startswith(r + ".") for r in RESUMABLE)]


def check_resumable(stored: dict | None, new: dict, where: Path) -> None:
    """Refuse to continue a checkpoint under a config that differs in anything but ``RESUMABLE`` keys."""
    if stored is None:
        return  # a checkpoint from before configs were stored in it
    changed = config_changes(json.loads(json.dumps(stored)), json.loads(json.dumps(new)))
    if changed:
        from fedlora.schema import ConfigError

        raise ConfigError(changed[0], f"differs from the run being resumed ({where}); only {list(RESUMABLE)} may "
                                      f"change on resume (changed: {changed})")


CHECKPOINT_KEYS = ("global_state", "strategy", "version", "round", "client_versions", "ledgers", "exhausted",
                   "history", "totals", "run_id")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A run's checkpoint, or a ``ConfigError`` naming the file when it is truncated, corrupt or not ours."""
    from fedlora.schema import ConfigError

    try:
        state = torch.load(path, weights_only=False)
        missing = [k for k in CHECKPOINT_KEYS if k not in state]
    except Exception as e:  # noqa: BLE001 - whatever the unpickler says, the file is unusable: name it
        raise ConfigError("checkpoint", f"{path} is unreadable ({type(e).__name__}: {str(e)[:200]}): it was "
                                        "truncated or corrupted; restore it from a backup, or start a new run "
                                        "(fedlora run)") from None
    if missing:
        raise ConfigError("checkpoint", f"{path} is not a fedlora checkpoint (missing {missing})")
    return state


class RoundFailed(RuntimeError):
    """A round ended with fewer accepted reports than clients.min_reports: the run stops (resumable)."""


#: the Ray node the coordinator runs on, written at its start (the run's placement report reads it)
COORDINATOR_NODE = ".coordinator-node"


def _record_node(run_dir: Path) -> None:
    import ray

    if ray.is_initialized():
        (run_dir / COORDINATOR_NODE).write_text(ray.get_runtime_context().get_node_id())


class Coordinator:
    def __init__(self, cfg: FedConfig, labels: list[str], run_dir: str, parent_run_id: str | None = None, *,
                 personal_states: Callable[[str], Tensors | None] | None = None,
                 cache_dir: str | None = None) -> None:
        """``personal_states(client_id)``: in simulation, read a client's personal tensors from its state folder
        (the reference-global evaluation oracle of FedSA-LoRA); None in deployment, where they stay on devices."""
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        quiet_logs()
        self.cfg = cfg
        self.labels = list(labels)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _record_node(self.run_dir)
        torch.set_num_threads(int(cfg.runtime.num_cpus or 2))
        self.strategy = server_strategy(cfg)
        self.fleet = fleet_bits(cfg)
        self.device = resolve_device(cfg.runtime.device, key="runtime.device")
        self.model = build_model(cfg.model, num_labels=len(labels), seed=cfg.seed, device=self.device)
        tok = load_tokenizer(cfg.model)
        self.pad_id = tok.pad_token_id or 0
        pool, test = global_split(cfg.data, cfg.seed)
        self.examples = [str(t) for t in test["text"][:3]]  # the logged model's input example (server data)
        self.test = tokenize(list(test), tok, cfg.model.max_length)
        self.runner = self.model
        start = cache_start(cfg.model, self.model, trains_lora=self.strategy.trains_lora)
        if start:  # evaluate from the frozen-prefix cache too (task.cache)
            self.test = cached_records(self.model, start, self.test, cache_dir=cache_dir, pad_id=self.pad_id)
            self.runner = CachedSuffix(self.model, start, cfg.model.pooling)
        init = adapter_state(self.model)
        self.init_adapter = init
        self.expected = {k: v.shape for k, v in init.items() if self.strategy.shares_key(k)}
        self.spec_json = client_spec(cfg, labels).to_json()

        # federation state (all of it goes into the checkpoint)
        self.global_state: Tensors = self.strategy.init_global(init)
        self.version = 0  # number of aggregations applied to the global state
        self.round = 0  # rounds completed
        self.client_versions: dict[str, int | None] = {}
        self.ledgers: dict[str, dict] = {}
        self.exhausted: dict[str, str] = {}
        self.history: list[dict] = []
        self.totals = {"bytes_up": 0, "bytes_down": 0, "wall_time_s": 0.0, "rejected": 0, "failed": 0}
        self.resumes = 0  # how many times this run was continued from a checkpoint
        run_id = None
        ckpt = self.run_dir / CHECKPOINT
        if ckpt.exists():
            state = read_checkpoint(ckpt)
            check_resumable(state.get("config"), cfg.to_dict(), ckpt)
            run_id = self.load_state_dict(state)
            self.resumes += 1
            log.info("resumed from %s after round %d", ckpt, self.round)
        self.tracker = make_tracker(cfg, self.run_dir, run_id, parent_run_id)
        self.tracker.backfill([RoundRecord.from_dict(h) for h in self.history])
        if run_id is None:  # a new run: its inputs (the pool only in simulation: deployed clients keep theirs)
            self.tracker.log_datasets(cfg.data, test=test, pool=pool if personal_states is not None else None)
        self.nodes: dict[int, dict] = {}
        self.personal_states = personal_states
        self.observers: list[RoundObserver] = [
            CheckpointObserver(self.run_dir / CHECKPOINT), SummaryObserver(self.run_dir / SUMMARY), self.tracker,
        ]

    # ---- checkpoint ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "global_state": self.global_state,
            "strategy": self.strategy.state_dict(),
            "version": self.version,
            "round": self.round,
            "client_versions": self.client_versions,
            "ledgers": self.ledgers,
            "exhausted": self.exhausted,
            "history": self.history,
            "totals": self.totals,
            "resumes": self.resumes,
            "config": self.cfg.to_dict(),
            "run_id": getattr(self, "tracker", None) and self.tracker.run_id,
        }

    def load_state_dict(self, ck: dict[str, Any]) -> str | None:
        """Restore the federation state from a checkpoint; returns its MLflow run id."""
        self.global_state = ck["global_state"]
        self.strategy.load_state_dict(ck["strategy"])
        for k in ("version", "round", "client_versions", "ledgers", "exhausted", "history", "totals"):
            setattr(self, k, ck[k])
        self.resumes = int(ck.get("resumes", 0))
        return ck["run_id"]

    # ---- nodes -----------------------------------------------------------------------------------
    def spec(self) -> str:
        """The client spec every message carries (``federation.ClientSpec`` as JSON)."""
        return self.spec_json

    def register(self, hellos: dict[int, dict]) -> int:
        """Record which client each node is (from the handshake) and its bitwidth."""
        for node_id, raw in hellos.items():
            try:
                h = parse_hello(raw)
            except UpdateRejected as e:
                log.warning("node %s: handshake refused: %s", node_id, e.reason)
                continue
            cid = h["client_id"]
            index = int(h.get("index", -1))
            bits = h["enrolled_bits"] if "enrolled_bits" in h else (
                self.fleet[index] if 0 <= index < len(self.fleet) else 32)
            self.nodes[int(node_id)] = {**h, "client_id": cid, "bits": bits}
            # What a client holds is what this coordinator recorded (its checkpoint), never what the client says: a
            # version number from another federation would make a delta land on the wrong base. A client that is
            # already at the version it is sent (a round asked again after a restart) keeps what it holds.
            self.client_versions.setdefault(cid, None)
            mirrored = int(self.ledgers[cid]["steps"]) if cid in self.ledgers else None
            if mirrored is not None and h["ledger_steps"] is not None and mirrored > h["ledger_steps"]:
                self._refuse(cid, f"its privacy ledger records {h.get('ledger_steps')} DP steps, below the {mirrored} "
                                  "it reported before (reset, deleted or unreadable): not scheduled again")
        return len(self.nodes)

    def _refuse(self, cid: str, reason: str) -> None:
        """Never schedule ``cid`` again (fail closed), saying why."""
        log.error("%s: %s", cid, reason)
        self.exhausted[cid] = reason

    def done(self) -> bool:
        return self.round >= self.cfg.rounds

    def history_records(self, start: int = 0) -> list[dict]:
        """The finished rounds' records from index ``start`` on (what ``fedlora serve`` prints as they come)."""
        return self.history[start:]

    # ---- one round -------------------------------------------------------------------------------
    def plan_round(self) -> RoundPlan | None:
        """Sample this round's clients and build each one's downlink; None when nothing is left to run."""
        if self.done():
            return None
        rnd = self.round + 1
        eligible = sorted(
            (nid for nid, h in self.nodes.items() if h["client_id"] not in self.exhausted),
            key=lambda nid: self.nodes[nid]["client_id"],
        )
        k = min(self.cfg.clients.per_round, len(eligible))
        rng = random.Random(self.cfg.seed * 100_003 + rnd)
        chosen = sorted(rng.sample(eligible, k), key=lambda nid: self.nodes[nid]["client_id"]) if k else []
        if not chosen:
            return None
        messages = [self._downlink(nid, rnd, "train") for nid in chosen]
        sent = {m.node_id: Sent(m.client_id, m.meta["bits"], m.bytes) for m in messages}
        return RoundPlan(round=rnd, t0=time.perf_counter(), sent=sent, messages=messages)

    def _downlink(self, node_id: int, rnd: int, kind: str) -> Downlink:
        info = self.nodes[node_id]
        cid = info["client_id"]
        held = self.client_versions.get(cid)
        tensors, sync_meta = self.strategy.downlink(self.global_state, held)
        bits = int(info["bits"])
        if bits != 32:
            tensors = encode_tensors(tensors, bits)
        meta = {"round": rnd, "version": self.version, "base_version": held, "sync": sync_meta, "kind": kind,
                "bits": bits}
        if cid in self.ledgers:  # the DP steps it reported before: a client whose ledger holds fewer refuses
            meta["ledger_floor"] = int(self.ledgers[cid]["steps"])
        return Downlink(node_id=node_id, client_id=cid, meta=meta, tensors=tensors, bytes=payload_bytes(tensors))

    def aggregate_round(self, plan: RoundPlan, replies: list[dict]) -> RoundRecord:
        """Decode and validate every reply, mirror the ledgers, aggregate what was accepted. ``replies``: one
        dict per reply received, with ``node_id``, ``error`` (str or None), ``update``, ``metrics``, ``info``."""
        rnd = plan.round
        t_agg0 = time.perf_counter()
        record = RoundRecord(round=rnd, sampled=len(plan.sent), t0=plan.t0,
                             bytes_down=sum(s.bytes for s in plan.sent.values()),
                             sampled_clients=sorted(s.client_id for s in plan.sent.values()))
        updates: list[ClientUpdate] = []
        answered = set()
        for r in replies:
            nid = r.get("node_id") if isinstance(r, dict) else None
            sent = plan.sent.get(nid) if isinstance(nid, int) and not isinstance(nid, bool) else None
            if sent is None:
                log.warning("round %d: reply from node %s that was not sampled; ignored", rnd, nid)
                continue
            answered.add(nid)
            update = self._accept(rnd, nid, sent, r, record)
            if update is not None:
                updates.append(update)
        record.dropped = len(plan.sent) - len(answered)
        for nid in set(plan.sent) - answered:  # a dropped client may or may not have synced: full payload next time
            self.client_versions[plan.sent[nid].client_id] = None
        # declines (a spent privacy budget) are answers; fewer eligible clients than min_reports lower the bar
        if len(updates) + record.declined < min(self.cfg.clients.min_reports, record.sampled):
            raise RoundFailed(
                f"round {rnd}: {len(updates)} accepted report(s) < clients.min_reports={self.cfg.clients.min_reports} "
                f"({record.failed} failed, {record.dropped} dropped, {record.rejected} rejected, {record.declined} "
                f"declined of {record.sampled} sampled); nothing of this round was applied; the run stops and "
                f"`fedlora resume {self.run_dir}` continues from round {rnd - 1}")
        if updates:
            # in client order, not arrival order: a strategy's float sums may depend on their order, and the same
            # seed should give the same adapter bits however the actors' timing fell (embedded, on a cluster)
            updates.sort(key=lambda u: u.client_id)
            self.global_state = self.strategy.aggregate(self.global_state, updates)
            self.version += 1
        record.reported = len(updates)
        record.aggregate_s = time.perf_counter() - t_agg0
        self.round = rnd
        rows = list(record.clients.values())
        record.client_compute_s = max((c.client_s for c in rows), default=0.0)
        record.client_loss_mean = _mean([c.loss for c in rows])
        record.client_loss_min = min((c.loss for c in rows), default=None)
        record.client_loss_max = max((c.loss for c in rows), default=None)
        stats = self.strategy.last_stats
        if stats:
            record.strategy_stats = {k: v for k, v in stats.items() if isinstance(v, (int, float, str))}
        record.evaluate_clients = (not self.strategy.has_global_model) and self._eval_round(rnd)
        return record

    def _accept(self, rnd: int, nid: int, sent: Sent, r: dict, record: RoundRecord) -> ClientUpdate | None:
        """One reply: validate all of it (``validation.parse_reply``), count it, mirror its ledger, and return its
        update (None if it has none or was rejected). Nothing a client sends can raise past this point."""
        cid = sent.client_id
        if r.get("error"):
            record.failed += 1
            log.warning("round %d: %s failed: %s", rnd, cid, str(r["error"])[:500])
            self.client_versions[cid] = None  # unknown what it holds now: next time, a full payload
            return None
        try:
            rep = parse_reply(r, client_id=cid, declared_examples=int(self.nodes[nid]["n_train"]), bits=sent.bits,
                              expected=self.expected, max_norm=self.cfg.clients.max_update_norm,
                              dp=self.cfg.privacy.enabled)
        except UpdateRejected as e:
            record.rejected += 1
            log.warning("round %d: %s", rnd, e)
            self.client_versions[cid] = None
            return None
        self.client_versions[cid] = self.version  # it synced to the version we sent
        if rep.ledger is not None:
            mirrored = int(self.ledgers.get(cid, {}).get("steps", 0))
            if rep.ledger["steps"] < mirrored:
                record.rejected += 1
                self._refuse(cid, f"its privacy ledger went backwards ({rep.ledger['steps']} DP steps reported, "
                                  f"{mirrored} before): update rejected, not scheduled again")
                return None
            self.ledgers[cid] = rep.ledger
            if self.cfg.privacy.enabled:
                record.epsilon_per_client[cid] = float(rep.ledger["epsilon"])
        if rep.can_run_next is False:
            self.exhausted.setdefault(cid, "privacy budget: next round would pass the target ε")
        if rep.declined:
            record.declined += 1
            self.exhausted[cid] = rep.declined
            log.info("round %d: %s declined: %s", rnd, cid, rep.declined)
            return None
        record.bytes_up += rep.bytes_up
        record.clients[cid] = ClientRow(loss=rep.loss, client_s=rep.client_s, update_norm=rep.update_norm,
                                        handler_s=rep.handler_s)
        return ClientUpdate(cid, rep.update, rep.num_examples, {"bits": sent.bits})

    def _all_exhausted(self) -> bool:
        return bool(self.nodes) and all(h["client_id"] in self.exhausted for h in self.nodes.values())

    def _eval_round(self, rnd: int) -> bool:
        """Evaluate every ``eval_every`` rounds and after the last round — the planned last one, or an earlier
        one after which no client can train any more (every privacy budget spent), so a run that ends early
        still reports its final model."""
        every = self.cfg.eval_every
        return rnd == self.cfg.rounds or (every > 0 and rnd % every == 0) or self._all_exhausted()

    def plan_evaluate(self, record: RoundRecord) -> list[Downlink]:
        """Personalised evaluation messages (strategies without a global model): every known client."""
        if not record.evaluate_clients:
            return []
        return [self._downlink(nid, self.round, "evaluate")
                for nid in sorted(self.nodes, key=lambda n: self.nodes[n]["client_id"])]

    def _personalised(self, record: RoundRecord, replies: list[dict]) -> None:
        accs, ns = [], []
        for r in replies:
            nid = r.get("node_id") if isinstance(r, dict) else None
            if r.get("error") or nid not in self.nodes:
                continue
            node = self.nodes[nid]
            try:
                acc, n = parse_eval_reply(r, client_id=node["client_id"], declared_examples=node["n_val"])
            except UpdateRejected as e:
                log.warning("round %d: evaluation %s", record.round, e)
                continue
            self.client_versions[node["client_id"]] = self.version
            accs.append(acc)
            ns.append(n)
        record.personalized_accuracy = sum(a * n for a, n in zip(accs, ns)) / sum(ns) if ns else None
        record.personalized_accuracy_unweighted = _mean(accs)
        record.personalized_clients = len(accs)
        ref = self.evaluate_reference_global()
        if ref is not None:
            record.reference_global_accuracy, record.reference_global_loss = ref["accuracy"], ref["loss"]
            record.reference_global_label = ref["label"]

    def evaluate_reference_global(self) -> dict | None:
        """Personalised strategies (FedSA-LoRA): the *reference* global model — global A plus the data-weighted
        mean of the clients' personal B and head — on the server's test split.

        Only in simulation, where the simulated clients' stores lie in this run directory: it is an evaluation
        oracle read from disk (``personal_states``), never a message (B does not leave a client). None when no
        store is readable (deployment: the state is on the devices)."""
        if not self.strategy.has_reference_global or self.personal_states is None:
            return None
        from fedlora.aggregation.fedsa import REFERENCE_LABEL

        personal, weights = [], []
        for h in sorted(self.nodes.values(), key=lambda h: h["client_id"]):
            p = self.personal_states(h["client_id"])
            if p:
                personal.append(p)
                weights.append(float(h["n_train"]))
        if not personal:
            return None
        out = self._evaluate_state(self.strategy.reference_global(self.global_state, personal, weights))
        return {**out, "label": REFERENCE_LABEL, "clients": len(personal)}

    def close_round(self, record: RoundRecord, eval_replies: list[dict]) -> RoundRecord:
        """Evaluation, privacy figures and totals for the round; the observers (checkpoint, tracking, summary)
        record it. Returns the finished record."""
        if record.evaluate_clients:
            self._personalised(record, eval_replies)
        t_eval0 = time.perf_counter()
        if self.strategy.has_global_model and self._eval_round(record.round):
            ev = self.evaluate_global()
            record.global_accuracy, record.global_loss = ev["accuracy"], ev["loss"]
            low = sorted({int(h["bits"]) for h in self.nodes.values()} - {32}, reverse=True)
            if low:  # what each low-bit device class holds: the global adapter re-quantised to its bitwidth
                record.global_accuracy_by_bits = {b: self.evaluate_global(bits=b)["accuracy"] for b in low}
        record.eval_s = time.perf_counter() - t_eval0
        if self.cfg.privacy.enabled:  # without DP there is no ε to report (never a 0.0 nobody computed)
            record.epsilon_max = max((float(led["epsilon"]) for led in self.ledgers.values()), default=0.0)
        record.round_s = time.perf_counter() - record.t0
        record.overhead_s = max(0.0, record.round_s - record.client_compute_s - record.aggregate_s - record.eval_s)
        self.totals["bytes_up"] += record.bytes_up
        self.totals["bytes_down"] += record.bytes_down
        self.totals["wall_time_s"] += record.round_s
        self.totals["rejected"] += record.rejected
        self.totals["failed"] += record.failed
        self.history.append(record.to_dict(clients=True))
        for obs in self.observers:
            obs.on_round(record, self)
        return record

    # ---- evaluation and export -------------------------------------------------------------------
    def _evaluate_state(self, state: Tensors) -> dict:
        """The model with adapter ``state`` (over the seeded init) on the server's test split."""
        load_adapter_state(self.model, {**self.init_adapter, **state})
        return evaluate(self.runner, self.test, pad_id=self.pad_id)

    def evaluate_global(self, bits: int = 32) -> dict:
        """The global model on the server's test split; ``bits`` < 32: as a client of that bitwidth holds it."""
        state = self.global_state
        if bits != 32:
            state = {k: fake_quantize(v, bits) for k, v in state.items()}
        return self._evaluate_state(state)

    def summary(self) -> dict:
        def last(key: str):
            return next((h[key] for h in reversed(self.history) if h.get(key) is not None), None)

        eps = {cid: float(led["epsilon"]) for cid, led in self.ledgers.items()}
        dp = self.cfg.privacy.enabled
        return {
            "strategy": self.cfg.strategy.name,
            "rounds_completed": self.round,
            "rounds_planned": self.cfg.rounds,
            "global_accuracy": last("global_accuracy") if self.strategy.has_global_model else None,
            "personalized_accuracy": last("personalized_accuracy"),
            "reference_global_accuracy": last("reference_global_accuracy"),
            "history": [{k: v for k, v in h.items() if k != "clients"} for h in self.history],
            "epsilon_max": max(eps.values(), default=0.0) if dp else None,
            "epsilon_per_client": eps,
            "delta": float(self.cfg.privacy.delta) if dp else None,
            "privacy": self.privacy_report(),
            "bytes_up": self.totals["bytes_up"],
            "bytes_down": self.totals["bytes_down"],
            "wall_time_s": self.totals["wall_time_s"],
            "rejected_updates": self.totals["rejected"],
            "failed_clients": self.totals["failed"],
            "run_dir": str(self.run_dir),
            "mlflow": {"tracking_uri": self.tracker.uri, "run_id": self.tracker.run_id},
        }

    def privacy_report(self) -> dict:
        """Per client, what its ledger reported (accountant, σ, q, steps, participations, ε, δ, noise source),
        and whether the run was ever resumed. The authoritative ε is each client's own ledger; this is its mirror."""
        dp = self.cfg.privacy
        return {
            "enabled": dp.enabled,
            "noise_source": dp.noise if dp.enabled else None,
            "reproducible_noise_UNSAFE": dp.enabled and dp.noise != "csprng",
            "resumed": self.resumes > 0,
            "resumes": self.resumes,
            "authoritative": "each client's own ledger (ledger.json in its state folder) decides whether it trains; "
                             "these are the values the clients reported, mirrored by the coordinator",
            "ledgers": self.ledgers,
            "exhausted": self.exhausted,
        }

    def finish(self, status: str = "FINISHED") -> dict:
        """Export the final adapter (PEFT format), the privacy report; close the MLflow run."""
        if self.round > 0 and status == "FINISHED":
            load_adapter_state(self.model, {**self.init_adapter, **self.global_state})
            adapter = self.run_dir / "adapter"
            self.model.save_pretrained(str(adapter))
            make_portable(adapter, self.cfg.model.name_or_path)
            (adapter / "README.md").write_text(model_card(self.summary(), self.cfg.to_dict(), self.labels))
            self.tracker.log_artifact(adapter, "adapter")
            self.tracker.log_model(adapter, cfg_dict=self.cfg.to_dict(), labels=self.labels, examples=self.examples)
            report = self.run_dir / "privacy_report.json"
            from fedlora.atomic_io import atomic_write_json

            atomic_write_json(report, self.privacy_report())
            self.tracker.log_artifact(report)
            if (self.run_dir / "config.yaml").exists():
                self.tracker.log_artifact(self.run_dir / "config.yaml")
        s = self.summary()
        for obs in self.observers:
            obs.on_finish(s, status)
        return s


def _mean(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None
