"""The coordinator: the federation's state and round logic, hosted as a Ray actor.

It owns the global adapter, the strategy (and its state), the clients' versions, the privacy-ledger mirror,
checkpoints, ``summary.json`` and tracking. Flower's ServerApp (``server_app.py``) is a thin shell that asks
it what to send, carries the messages, and hands back what came back. Nothing here imports Flower, so the
same object serves simulation and deployment, and tests can drive it directly.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from fedlora.aggregation.base import ClientUpdate, Tensors
from fedlora.clients import worker
from fedlora.clients.state import atomic_torch_save, atomic_write_json
from fedlora.coordinator.tracking import make_tracker
from fedlora.coordinator.validation import UpdateRejected, validate_update

log = logging.getLogger("fedlora.coordinator")

CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"


def _make_strategy(cfg: dict):
    strategy = worker.make_strategy(cfg)
    from fedlora.config import fleet_mix

    mix = fleet_mix(cfg)
    if set(mix) != {32}:
        from fedlora.aggregation.bitwidth import BitwidthAggregator

        strategy = BitwidthAggregator(strategy, method=cfg["clients"]["bitwidth_method"], seed=cfg["seed"])
    return strategy


class Coordinator:
    def __init__(self, cfg: dict, run_dir: str, parent_run_id: str | None = None) -> None:
        from fedlora.clients.data import DataSpec, global_split, tokenize
        from fedlora.clients.model import ModelSpec, adapter_state, build_model, load_tokenizer

        from fedlora.coordinator.run import quiet_logs

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        quiet_logs()
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(int(cfg["runtime"].get("num_cpus") or 2))
        self.strategy = _make_strategy(cfg)
        mspec = ModelSpec.from_dict({**cfg["model"], "seed": cfg["seed"], "num_labels": cfg["num_labels"]})
        self.model = build_model(mspec)
        tok = load_tokenizer(mspec)
        self.pad_id = tok.pad_token_id or 0
        _, test = global_split(DataSpec.from_dict({**cfg["data"], "seed": cfg["seed"]}))
        self.test = tokenize(list(test), tok, mspec.max_length)
        init = adapter_state(self.model)
        self.init_adapter = init
        self.expected = {k: v.shape for k, v in init.items() if self.strategy.shares_key(k)}

        # federation state (all of it goes into the checkpoint)
        self.global_state: Tensors = self.strategy.init_global(init)
        self.version = 0  # number of aggregations applied to the global state
        self.round = 0  # rounds completed
        self.client_versions: dict[str, int | None] = {}
        self.ledgers: dict[str, dict] = {}
        self.exhausted: dict[str, str] = {}
        self.history: list[dict] = []
        self.totals = {"bytes_up": 0, "bytes_down": 0, "wall_time_s": 0.0, "rejected": 0, "failed": 0}
        run_id = None
        ckpt = self.run_dir / CHECKPOINT
        if ckpt.exists():
            run_id = self._load_checkpoint(ckpt)
        self.tracker = make_tracker(cfg, self.run_dir, run_id, parent_run_id)
        self.nodes: dict[int, dict] = {}
        self._plan: dict[str, Any] | None = None

    # ---- checkpoint ------------------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        atomic_torch_save(
            self.run_dir / CHECKPOINT,
            {
                "global_state": self.global_state,
                "strategy": self.strategy.state_dict(),
                "version": self.version,
                "round": self.round,
                "client_versions": self.client_versions,
                "ledgers": self.ledgers,
                "exhausted": self.exhausted,
                "history": self.history,
                "totals": self.totals,
                "run_id": getattr(self.tracker, "run_id", None),
            },
        )

    def _load_checkpoint(self, path: Path) -> str | None:
        ck = torch.load(path, weights_only=False)
        self.global_state = ck["global_state"]
        self.strategy.load_state_dict(ck["strategy"])
        for k in ("version", "round", "client_versions", "ledgers", "exhausted", "history", "totals"):
            setattr(self, k, ck[k])
        log.info("resumed from %s after round %d", path, self.round)
        return ck["run_id"]

    # ---- nodes -----------------------------------------------------------------------------------
    def spec(self) -> str:
        return json.dumps({**self.cfg, "state_root": str(self.run_dir / "clients")})

    def register(self, hellos: dict[int, dict]) -> int:
        """Record which client each node is (from the ``query`` handshake) and what global version it holds."""
        for node_id, h in hellos.items():
            cid = str(h["client_id"])
            self.nodes[int(node_id)] = dict(h)
            held = int(h.get("held_version", -1))
            # the client's own store is authoritative for what it holds
            self.client_versions[cid] = held if held >= 0 else None
        return len(self.nodes)

    def done(self) -> bool:
        return self.round >= int(self.cfg["rounds"])

    # ---- one round -------------------------------------------------------------------------------
    def plan_round(self) -> list[dict]:
        """Sample this round's clients and build each one's downlink. Empty list: nothing left to run."""
        if self.done():
            return []
        rnd = self.round + 1
        eligible = sorted(
            (nid for nid, h in self.nodes.items() if h["client_id"] not in self.exhausted),
            key=lambda nid: self.nodes[nid]["client_id"],
        )
        k = min(int(self.cfg["clients"]["per_round"]), len(eligible))
        rng = random.Random(int(self.cfg["seed"]) * 100_003 + rnd)
        chosen = sorted(rng.sample(eligible, k), key=lambda nid: self.nodes[nid]["client_id"]) if k else []
        plans = [self._downlink(nid, rnd, "train") for nid in chosen]
        self._plan = {"round": rnd, "t0": time.perf_counter(), "sampled": len(plans), "sent": {p["node_id"]: p for p in plans}}
        return plans

    def _downlink(self, node_id: int, rnd: int, kind: str) -> dict:
        info = self.nodes[node_id]
        cid = info["client_id"]
        held = self.client_versions.get(cid)
        tensors, sync_meta = self.strategy.downlink(self.global_state, held)
        bits = int(info.get("bits", 32))
        if bits != 32:
            from fedlora.aggregation.quant import encode_tensors

            tensors = encode_tensors(tensors, bits)
        meta = {"round": rnd, "version": self.version, "base_version": held, "sync": sync_meta, "kind": kind}
        return {
            "node_id": node_id,
            "client_id": cid,
            "meta": json.dumps(meta),
            "tensors": tensors,
            "bytes": worker.payload_bytes(tensors),
        }

    def finish_round(self, replies: list[dict]) -> dict:
        """Validate, aggregate, evaluate, record. ``replies``: one dict per reply received, with ``node_id``,
        ``error`` (str or None), ``update`` (tensors), ``metrics`` and ``info``."""
        plan = self._plan
        if plan is None:
            raise RuntimeError("finish_round called without plan_round")
        rnd = plan["round"]
        t_agg0 = time.perf_counter()
        updates: list[ClientUpdate] = []
        client_rows: dict[str, dict] = {}
        failed = rejected = declined = 0
        bytes_up = 0
        bytes_down = sum(p["bytes"] for p in plan["sent"].values())
        answered = set()
        for r in replies:
            nid = int(r["node_id"])
            sent = plan["sent"].get(nid)
            if sent is None:
                log.warning("round %d: reply from node %s that was not sampled; ignored", rnd, nid)
                continue
            answered.add(nid)
            cid = sent["client_id"]
            if r.get("error"):
                failed += 1
                log.warning("round %d: %s failed: %s", rnd, cid, r["error"])
                self.client_versions[cid] = None  # unknown what it holds now: next time, a full payload
                continue
            self.client_versions[cid] = self.version  # it synced to the version we sent
            info, metrics = r.get("info", {}), r.get("metrics", {})
            if info.get("ledger"):
                self.ledgers[cid] = json.loads(info["ledger"])
            if "can_run_next" in info and not int(info["can_run_next"]):
                self.exhausted.setdefault(cid, "privacy budget: next round would pass the target ε")
            if info.get("declined"):
                declined += 1
                self.exhausted[cid] = str(info["declined"])
                log.info("round %d: %s declined: %s", rnd, cid, info["declined"])
                continue
            up = r.get("update", {})
            bytes_up += worker.payload_bytes(up)
            try:
                deltas = self._decode_upload(cid, up, int(info.get("bits", 32)))
                norm = validate_update(
                    cid, deltas, self.expected,
                    max_norm=float(self.cfg["clients"]["max_update_norm"]),
                    num_examples=metrics.get("num_examples"),
                )
            except UpdateRejected as e:
                rejected += 1
                log.warning("round %d: %s", rnd, e)
                continue
            updates.append(ClientUpdate(cid, deltas, int(metrics["num_examples"]), {"bits": int(info.get("bits", 32))}))
            client_rows[cid] = {"loss": float(metrics.get("loss", math.nan)), "client_s": float(metrics.get("client_s", 0.0)),
                                "update_norm": norm}
        dropped = len(plan["sent"]) - len(answered)
        if updates:
            self.global_state = self.strategy.aggregate(self.global_state, updates)
            self.version += 1
        agg_s = time.perf_counter() - t_agg0
        self.round = rnd
        self._plan = None
        row = {
            "round": rnd,
            "sampled": plan["sampled"],
            "reported": len(updates),
            "failed": failed,
            "dropped": dropped,
            "rejected": rejected,
            "declined": declined,
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "aggregate_s": agg_s,
            "client_compute_s": max((c["client_s"] for c in client_rows.values()), default=0.0),
            "client_loss_mean": _mean([c["loss"] for c in client_rows.values()]),
            "client_loss_min": min((c["loss"] for c in client_rows.values()), default=None),
            "client_loss_max": max((c["loss"] for c in client_rows.values()), default=None),
            "clients": client_rows,
            "_t0": plan["t0"],
        }
        stats = getattr(self.strategy, "last_stats", None)
        if stats:
            row["strategy_stats"] = {k: v for k, v in stats.items() if isinstance(v, (int, float, str))}
        self._pending = row
        min_reports = int(self.cfg["clients"]["min_reports"])
        if len(updates) < min_reports and not self._all_exhausted():
            log.error("round %d: %d reports < clients.min_reports=%d", rnd, len(updates), min_reports)
        return {"round": rnd, "evaluate_clients": self._wants_client_eval(rnd)}

    def _decode_upload(self, cid: str, up: Tensors, bits: int) -> Tensors:
        if bits == 32:
            return up
        from fedlora.aggregation.quant import decode_tensors

        try:
            return decode_tensors(up, bits, dict(self.expected))
        except (ValueError, KeyError) as e:
            raise UpdateRejected(cid, f"malformed {bits}-bit payload: {e}") from e

    def _all_exhausted(self) -> bool:
        return bool(self.nodes) and all(h["client_id"] in self.exhausted for h in self.nodes.values())

    def _eval_round(self, rnd: int) -> bool:
        """Evaluate every ``eval_every`` rounds and after the last round — the planned last one, or an earlier
        one after which no client can train any more (every privacy budget spent), so a run that ends early
        still reports its final model."""
        every = int(self.cfg.get("eval_every", 1))
        return rnd == int(self.cfg["rounds"]) or (every > 0 and rnd % every == 0) or self._all_exhausted()

    def _wants_client_eval(self, rnd: int) -> bool:
        return (not self.strategy.has_global_model) and self._eval_round(rnd)

    def plan_evaluate(self) -> list[dict]:
        """Personalised evaluation messages (strategies without a global model): every known client."""
        rnd = self.round
        return [self._downlink(nid, rnd, "evaluate") for nid in sorted(self.nodes, key=lambda n: self.nodes[n]["client_id"])]

    def finish_evaluate(self, replies: list[dict]) -> None:
        accs, ns = [], []
        for r in replies:
            if r.get("error"):
                continue
            nid = int(r["node_id"])
            self.client_versions[self.nodes[nid]["client_id"]] = self.version
            accs.append(float(r["metrics"]["accuracy"]))
            ns.append(int(r["metrics"]["num_examples"]))
        row = self._pending
        row["personalized_accuracy"] = sum(a * n for a, n in zip(accs, ns)) / sum(ns) if ns else None
        row["personalized_accuracy_unweighted"] = _mean(accs)
        row["personalized_clients"] = len(accs)
        ref = self.evaluate_reference_global()
        if ref is not None:
            row["reference_global_accuracy"], row["reference_global_loss"] = ref["accuracy"], ref["loss"]
            row["reference_global_label"] = ref["label"]

    def evaluate_reference_global(self) -> dict | None:
        """Personalised strategies (FedSA-LoRA): the *reference* global model — global A plus the data-weighted
        mean of the clients' personal B and head — on the server's test split.

        Only in simulation, where the simulated clients' stores lie in this run directory: it is an evaluation
        oracle read from disk, never a message (B does not leave a client). None when no store is readable
        (deployment: the state is on the devices)."""
        if not hasattr(self.strategy, "reference_global"):
            return None
        from fedlora.aggregation.fedsa import REFERENCE_LABEL
        from fedlora.clients.state import ClientStore

        personal, weights = [], []
        for h in sorted(self.nodes.values(), key=lambda h: h["client_id"]):
            p = ClientStore(self.run_dir / "clients", h["client_id"]).load_personal()
            if p:
                personal.append(p)
                weights.append(float(h["n_train"]))
        if not personal:
            return None
        out = self._evaluate_state(self.strategy.reference_global(self.global_state, personal, weights))
        return {**out, "label": REFERENCE_LABEL, "clients": len(personal)}

    def end_round(self) -> str:
        """Global evaluation, tracking, checkpoint and summary for the round just finished; a progress line."""
        row = self._pending
        rnd = row["round"]
        t_eval0 = time.perf_counter()
        if self.strategy.has_global_model and self._eval_round(rnd):
            ev = self.evaluate_global()
            row["global_accuracy"], row["global_loss"] = ev["accuracy"], ev["loss"]
            low = sorted({int(h.get("bits", 32)) for h in self.nodes.values()} - {32}, reverse=True)
            if low:  # what each low-bit device class holds: the global adapter re-quantised to its bitwidth
                row["global_accuracy_by_bits"] = {b: self.evaluate_global(bits=b)["accuracy"] for b in low}
        row["eval_s"] = time.perf_counter() - t_eval0
        eps = {cid: float(l["epsilon"]) for cid, l in self.ledgers.items()}
        row["epsilon_max"] = max(eps.values(), default=0.0)
        row["epsilon_per_client"] = eps
        row["round_s"] = time.perf_counter() - row.pop("_t0")
        row["overhead_s"] = max(0.0, row["round_s"] - row["client_compute_s"] - row["aggregate_s"] - row["eval_s"])
        self.totals["bytes_up"] += row["bytes_up"]
        self.totals["bytes_down"] += row["bytes_down"]
        self.totals["wall_time_s"] += row["round_s"]
        self.totals["rejected"] += row["rejected"]
        self.totals["failed"] += row["failed"]
        self.history.append(row)
        self._pending = None
        self._save_checkpoint()
        self.tracker.log_round(rnd, self._round_metrics(row))
        self._write_summary()
        return self._progress_line(row)

    def _round_metrics(self, row: dict) -> dict[str, float]:
        m: dict[str, Any] = {}
        for k in ("global_accuracy", "global_loss", "personalized_accuracy", "personalized_accuracy_unweighted",
                  "reference_global_accuracy", "reference_global_loss"):
            if row.get(k) is not None:
                m[k.replace("global_", "global/").replace("personalized_", "personalized/")] = row[k]
        for k in ("sampled", "reported", "failed", "dropped", "rejected", "declined"):
            m[f"clients/{k}"] = row[k]
        for k in ("client_loss_mean", "client_loss_min", "client_loss_max"):
            if row.get(k) is not None:
                m[k.replace("client_loss_", "client_loss/")] = row[k]
        m["bytes/up"], m["bytes/down"] = row["bytes_up"], row["bytes_down"]
        for k in ("round_s", "client_compute_s", "aggregate_s", "eval_s", "overhead_s"):
            m[f"time/{k}"] = row[k]
        for b, acc in (row.get("global_accuracy_by_bits") or {}).items():
            m[f"global/accuracy_{b}bit"] = acc
        m["epsilon/max"] = row["epsilon_max"]
        for cid, e in row["epsilon_per_client"].items():
            m[f"client/{cid}/epsilon"] = e
        for cid, c in row["clients"].items():
            m[f"client/{cid}/loss"] = c["loss"]
        for k, v in (row.get("strategy_stats") or {}).items():
            if isinstance(v, (int, float)):
                m[f"strategy/{k}"] = v
        return m

    def _progress_line(self, row: dict) -> str:
        parts = [f"round {row['round']}/{self.cfg['rounds']}"]
        if row.get("global_accuracy") is not None:
            parts.append(f"global acc {row['global_accuracy']:.4f} loss {row['global_loss']:.4f}")
        if row.get("personalized_accuracy") is not None:
            parts.append(f"personalised acc {row['personalized_accuracy']:.4f}")
        if row.get("reference_global_accuracy") is not None:
            parts.append(f"reference-global acc {row['reference_global_accuracy']:.4f}")
        parts.append(f"clients {row['reported']}/{row['sampled']} reported")
        for k in ("failed", "rejected", "declined", "dropped"):
            if row[k]:
                parts.append(f"{row[k]} {k}")
        if self.cfg["privacy"].get("enabled"):
            parts.append(f"ε max {row['epsilon_max']:.2f}")
        parts.append(f"↑{_mb(row['bytes_up'])} ↓{_mb(row['bytes_down'])}")
        parts.append(f"{row['round_s']:.1f}s")
        return " | ".join(parts)

    # ---- evaluation and export -------------------------------------------------------------------
    def _load_global(self) -> None:
        from fedlora.clients.model import load_adapter_state

        load_adapter_state(self.model, {**self.init_adapter, **self.global_state})

    def _evaluate_state(self, state: Tensors) -> dict:
        """The model with adapter ``state`` (over the seeded init) on the server's test split."""
        from fedlora.clients.model import load_adapter_state
        from fedlora.clients.trainer import evaluate

        load_adapter_state(self.model, {**self.init_adapter, **state})
        return evaluate(self.model, self.test, pad_id=self.pad_id)

    def evaluate_global(self, bits: int = 32) -> dict:
        """The global model on the server's test split; ``bits`` < 32: as a client of that bitwidth holds it."""
        state = self.global_state
        if bits != 32:
            from fedlora.aggregation.quant import fake_quantize

            state = {k: fake_quantize(v, bits) for k, v in state.items()}
        return self._evaluate_state(state)

    def summary(self) -> dict:
        last_global = next((h["global_accuracy"] for h in reversed(self.history) if h.get("global_accuracy") is not None), None)
        last_pers = next((h["personalized_accuracy"] for h in reversed(self.history) if h.get("personalized_accuracy") is not None), None)
        eps = {cid: float(l["epsilon"]) for cid, l in self.ledgers.items()}
        return {
            "strategy": self.cfg["strategy"]["name"],
            "rounds_completed": self.round,
            "rounds_planned": int(self.cfg["rounds"]),
            "global_accuracy": last_global if self.strategy.has_global_model else None,
            "personalized_accuracy": last_pers,
            "reference_global_accuracy": next((h["reference_global_accuracy"] for h in reversed(self.history)
                                               if h.get("reference_global_accuracy") is not None), None),
            "history": [{k: v for k, v in h.items() if k != "clients"} for h in self.history],
            "epsilon_max": max(eps.values(), default=0.0),
            "epsilon_per_client": eps,
            "delta": float(self.cfg["privacy"]["delta"]) if self.cfg["privacy"].get("enabled") else None,
            "privacy": {"enabled": bool(self.cfg["privacy"].get("enabled")), "ledgers": self.ledgers,
                        "exhausted": self.exhausted},
            "bytes_up": self.totals["bytes_up"],
            "bytes_down": self.totals["bytes_down"],
            "wall_time_s": self.totals["wall_time_s"],
            "rejected_updates": self.totals["rejected"],
            "failed_clients": self.totals["failed"],
            "run_dir": str(self.run_dir),
            "mlflow": {"tracking_uri": self.tracker.uri, "run_id": self.tracker.run_id},
        }

    def _write_summary(self) -> dict:
        s = self.summary()
        atomic_write_json(self.run_dir / SUMMARY, s)
        return s

    def finish(self, status: str = "FINISHED") -> dict:
        """Export the final adapter (PEFT format), the privacy report; close the MLflow run."""
        if self.round > 0 and status == "FINISHED":
            self._load_global()
            adapter_dir = self.run_dir / "adapter"
            self.model.save_pretrained(str(adapter_dir))
            self.tracker.log_artifact(adapter_dir, "adapter")
            report = self.run_dir / "privacy_report.json"
            atomic_write_json(report, self.summary()["privacy"])
            self.tracker.log_artifact(report)
            cfg_file = self.run_dir / "config.yaml"
            if cfg_file.exists():
                self.tracker.log_artifact(cfg_file)
        s = self._write_summary()
        self.tracker.log_artifact(self.run_dir / SUMMARY)
        self.tracker.finish(status)
        return s


def _mean(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}MB" if n >= 1e5 else f"{n / 1e3:.1f}kB"
