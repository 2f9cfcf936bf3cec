"""The tracking observer: MLflow (one run per federation, step = round) or nothing. Only the coordinator talks
to MLflow; clients report through Flower messages."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from fedlora.atomic_io import atomic_write_json
from fedlora.config import FedConfig
from fedlora.coordinator.observers import RoundObserver
from fedlora.coordinator.records import RoundRecord

log = logging.getLogger("fedlora.tracking")

#: the MLflow run of a run directory, written when the MLflow run is created (before any checkpoint)
RUN_ID_FILE = "mlflow_run.json"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def tracking_uri(cfg: FedConfig) -> str | None:
    if not cfg.tracking.enabled:
        return None
    if cfg.tracking.uri:
        return str(cfg.tracking.uri)
    root = Path(cfg.runs_root).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def _experiment_id(client, cfg: FedConfig) -> str:
    """The configured experiment, created on first use (local stores keep artifacts beside the db)."""
    name = cfg.tracking.experiment
    exp = client.get_experiment_by_name(name)
    if exp:
        return exp.experiment_id
    local = tracking_uri(cfg).startswith("sqlite")
    art = (Path(cfg.runs_root).resolve() / "mlartifacts").as_uri() if local else None
    return client.create_experiment(name, artifact_location=art)


def round_metrics(record: RoundRecord) -> dict[str, float]:
    """A round's MLflow metrics, by name (step = the round)."""
    r = record
    m: dict[str, Any] = {}
    for k in ("global_accuracy", "global_loss", "personalized_accuracy", "personalized_accuracy_unweighted",
              "reference_global_accuracy", "reference_global_loss"):
        if getattr(r, k) is not None:
            m[k.replace("global_", "global/").replace("personalized_", "personalized/")] = getattr(r, k)
    for k in ("sampled", "reported", "failed", "dropped", "rejected", "declined"):
        m[f"clients/{k}"] = getattr(r, k)
    for k in ("client_loss_mean", "client_loss_min", "client_loss_max"):
        if getattr(r, k) is not None:
            m[k.replace("client_loss_", "client_loss/")] = getattr(r, k)
    m["bytes/up"], m["bytes/down"] = r.bytes_up, r.bytes_down
    for k in ("round_s", "client_compute_s", "aggregate_s", "eval_s", "overhead_s"):
        m[f"time/{k}"] = getattr(r, k)
    for b, acc in (r.global_accuracy_by_bits or {}).items():
        m[f"global/accuracy_{b}bit"] = acc
    m["epsilon/max"] = r.epsilon_max
    for cid, e in r.epsilon_per_client.items():
        m[f"client/{cid}/epsilon"] = e
    for cid, c in r.clients.items():
        m[f"client/{cid}/loss"] = c.loss
    for k, v in (r.strategy_stats or {}).items():
        if isinstance(v, (int, float)):
            m[f"strategy/{k}"] = v
    return m


class NullTracker(RoundObserver):
    uri: str | None = None
    run_id: str | None = None

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def backfill(self, history: list[RoundRecord]) -> None:
        pass


class MLflowTracker(NullTracker):
    """One MLflow run per federation; resuming reuses the same run id."""

    def __init__(self, cfg: FedConfig, run_dir: Path, run_id: str | None = None, parent_run_id: str | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(cfg)
        self.run_dir = run_dir
        Path(cfg.runs_root).mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        exp_id = _experiment_id(self.client, cfg)
        marker = run_dir / RUN_ID_FILE
        if run_id is None and marker.exists():  # a run that died before its first checkpoint: same MLflow run
            run_id = json.loads(marker.read_text())["run_id"]
        if run_id is None:
            tags = {"mlflow.runName": run_dir.name, "fedlora.run_dir": str(run_dir), "strategy": cfg.strategy.name,
                    "fedlora.privacy": (f"dp eps={cfg.privacy.epsilon:g} noise={cfg.privacy.noise}"
                                        if cfg.privacy.enabled else "none")}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(exp_id, tags=tags)
            self.run_id = run.info.run_id
            atomic_write_json(marker, {"run_id": self.run_id, "tracking_uri": self.uri})
            params = {k: str(v)[:6000] for k, v in flatten(cfg.to_dict()).items()}
            items = list(params.items())
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i : i + 100]])
        else:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        self._mlflow = mlflow

    def backfill(self, history: list[RoundRecord]) -> None:
        """On resume: log the rounds the checkpoint holds and MLflow lacks (a coordinator killed between its
        checkpoint and its metric logging), so every completed round has its step."""
        logged = {m.step for m in self.client.get_metric_history(self.run_id, "clients/sampled")}
        for record in history:
            if record.round not in logged:
                self.on_round(record)

    def on_round(self, record: RoundRecord, coord: Any = None) -> None:
        ts = int(time.time() * 1000)
        ms = [
            self._mlflow.entities.Metric(k, float(v), ts, record.round)
            for k, v in round_metrics(record).items()
            if v is not None and isinstance(v, (int, float))
        ]
        for i in range(0, len(ms), 500):
            self.client.log_batch(self.run_id, metrics=ms[i : i + 500])

    def log_artifact(self, path, artifact_path=None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def on_finish(self, summary: dict, status: str) -> None:
        if (self.run_dir / "summary.json").exists():
            self.log_artifact(self.run_dir / "summary.json")
        self.client.set_terminated(self.run_id, status=status)


def make_tracker(cfg: FedConfig, run_dir: Path, run_id: str | None = None, parent_run_id: str | None = None):
    if tracking_uri(cfg) is None:
        return NullTracker()
    return MLflowTracker(cfg, run_dir, run_id, parent_run_id)


def sweep_parent(cfg: FedConfig, sweep_dir: Path) -> str | None:
    """The parent MLflow run that groups a Hydra multirun's federations (found or created by sweep dir)."""
    uri = tracking_uri(cfg)
    if uri is None:
        return None
    from mlflow.tracking import MlflowClient

    Path(cfg.runs_root).mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    exp_id = _experiment_id(client, cfg)
    found = client.search_runs([exp_id], filter_string=f"tags.`fedlora.sweep_dir` = '{sweep_dir}'", max_results=1)
    if found:
        return found[0].info.run_id
    tags = {"mlflow.runName": f"sweep {sweep_dir.name}", "fedlora.sweep_dir": str(sweep_dir)}
    run = client.create_run(exp_id, tags=tags)
    return run.info.run_id
