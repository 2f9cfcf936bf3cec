"""Round hooks that record a federation: MLflow (one run per federation, step = round) or nothing."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("fedlora.tracking")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def tracking_uri(cfg: dict) -> str | None:
    t = cfg.get("tracking", {})
    if not t.get("enabled", False):
        return None
    if t.get("uri"):
        return str(t["uri"])
    root = Path(cfg["runs_root"]).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def _experiment_id(client, cfg: dict) -> str:
    """The configured experiment, created on first use (local stores keep artifacts beside the db)."""
    name = cfg["tracking"].get("experiment", "fedlora")
    exp = client.get_experiment_by_name(name)
    if exp:
        return exp.experiment_id
    local = tracking_uri(cfg).startswith("sqlite")
    art = (Path(cfg["runs_root"]).resolve() / "mlartifacts").as_uri() if local else None
    return client.create_experiment(name, artifact_location=art)


class NullTracker:
    uri: str | None = None
    run_id: str | None = None

    def log_round(self, rnd: int, metrics: dict[str, float]) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MLflowTracker(NullTracker):
    """Only the coordinator talks to MLflow. Resuming reuses the same run id."""

    def __init__(self, cfg: dict, run_dir: Path, run_id: str | None = None, parent_run_id: str | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(cfg)
        Path(cfg["runs_root"]).mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        exp_id = _experiment_id(self.client, cfg)
        if run_id is None:
            tags = {"mlflow.runName": run_dir.name, "fedlora.run_dir": str(run_dir), "strategy": cfg["strategy"]["name"]}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(exp_id, tags=tags)
            self.run_id = run.info.run_id
            params = {k: str(v)[:6000] for k, v in flatten(cfg).items()}
            items = list(params.items())
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i : i + 100]])
        else:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        self._mlflow = mlflow

    def log_round(self, rnd: int, metrics: dict[str, float]) -> None:
        import time

        ts = int(time.time() * 1000)
        ms = [
            self._mlflow.entities.Metric(k, float(v), ts, rnd)
            for k, v in metrics.items()
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

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def make_tracker(cfg: dict, run_dir: Path, run_id: str | None = None, parent_run_id: str | None = None):
    if tracking_uri(cfg) is None:
        return NullTracker()
    return MLflowTracker(cfg, run_dir, run_id, parent_run_id)


def sweep_parent(cfg: dict, sweep_dir: Path) -> str | None:
    """The parent MLflow run that groups a Hydra multirun's federations (found or created by sweep dir)."""
    uri = tracking_uri(cfg)
    if uri is None:
        return None
    from mlflow.tracking import MlflowClient

    Path(cfg["runs_root"]).mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    exp_id = _experiment_id(client, cfg)
    found = client.search_runs([exp_id], filter_string=f"tags.`fedlora.sweep_dir` = '{sweep_dir}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, tags={"mlflow.runName": f"sweep {sweep_dir.name}", "fedlora.sweep_dir": str(sweep_dir)})
    return run.info.run_id
