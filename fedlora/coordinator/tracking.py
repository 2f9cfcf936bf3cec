"""The tracking observer: MLflow (one run per federation, step = round) or nothing. Only the coordinator talks
to MLflow; clients report through Flower messages."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

from fedlora.atomic_io import atomic_write_json
from fedlora.config import FedConfig
from fedlora.coordinator.observers import RoundObserver
from fedlora.coordinator.records import RoundRecord

log = logging.getLogger("fedlora.tracking")

#: the MLflow run of a run directory, written when the MLflow run is created (before any checkpoint)
RUN_ID_FILE = "mlflow_run.json"
#: MLflow 3 opens an experiment without this tag on its GenAI view; fedlora runs are classic training runs
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


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


def mlflow_client(uri: str):
    """An MlflowClient whose store exists: a new local sqlite store is created (and migrated) under a file lock, so
    runs starting together do not race on MLflow's schema migration ("duplicate column name")."""
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    from filelock import FileLock

    db = Path(uri[len("sqlite:///"):]).resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".init.lock", timeout=300):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # touches the store: creation and migrations happen here
    return client


def _experiment_id(client, cfg: FedConfig) -> str:
    """The configured experiment, created on first use (local stores keep artifacts beside the db)."""
    name = cfg.tracking.experiment
    exp = client.get_experiment_by_name(name)
    if exp:
        if exp.tags.get(EXPERIMENT_KIND[0]) is None:  # an experiment made before fedlora set its kind
            client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    local = tracking_uri(cfg).startswith("sqlite")
    art = (Path(cfg.runs_root).resolve() / "mlartifacts").as_uri() if local else None
    return client.create_experiment(name, artifact_location=art, tags=dict([EXPERIMENT_KIND]))


def user_overrides(run_dir: Path) -> list[str]:
    """The Hydra overrides the user typed for this run (Hydra's own record, ``.hydra/overrides.yaml``)."""
    f = run_dir / ".hydra" / "overrides.yaml"
    if not f.exists():
        return []
    import yaml

    return [str(o) for o in (yaml.safe_load(f.read_text()) or [])]


def swept_overrides(run_dir: Path, overrides: list[str]) -> list[str]:
    """Of a sweep point's overrides, those of the keys the sweep varies (read from Hydra's ``multirun.yaml`` in the
    sweep dir, parsed with Hydra's own override grammar)."""
    f = run_dir.parent / "multirun.yaml"
    if not f.exists():
        return overrides
    import yaml
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = (yaml.safe_load(f.read_text()).get("hydra") or {}).get("overrides", {}).get("task") or []
    parser = OverridesParser.create()
    swept = {o.get_key_element() for o in parser.parse_overrides(task) if o.is_sweep_override()}
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept]


def run_tags(cfg: FedConfig, run_dir: Path, parent_run_id: str | None) -> dict[str, str]:
    """The tags ``mlflow.start_run`` would set (user, source, git commit) plus fedlora's own: the run dir, the
    strategy, the privacy setting, and the overrides (also the run's description)."""
    from mlflow.tracking.context.registry import resolve_tags

    overrides = user_overrides(run_dir)
    privacy = f"dp eps={cfg.privacy.epsilon:g} noise={cfg.privacy.noise}" if cfg.privacy.enabled else "none"
    name = (run_dir.name if not parent_run_id
            else f"{run_dir.name} {' '.join(swept_overrides(run_dir, overrides))}".strip()[:240])
    note = (f"fedlora federation: {cfg.strategy.name} on {cfg.data.name} ({cfg.model.name_or_path}), "
            f"{cfg.clients.num} clients, {cfg.rounds} rounds, privacy {privacy}.\n\n"
            f"`fedlora run {' '.join(overrides)}`".rstrip())
    tags = {"mlflow.runName": name, "fedlora.run_dir": str(run_dir), "strategy": cfg.strategy.name,
            "fedlora.privacy": privacy, "fedlora.overrides": " ".join(overrides)[:5000], "mlflow.note.content": note}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    out = resolve_tags(tags)
    # this code runs in a Ray worker: the source is the fedlora command and the checkout fedlora runs from
    out["mlflow.source.name"], out["mlflow.source.type"] = "fedlora run", "LOCAL"
    from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url

    here = str(Path(__file__).resolve())
    for key, value in (("mlflow.source.git.commit", get_git_commit(here)),
                       ("mlflow.source.git.branch", get_git_branch(here)),
                       ("mlflow.source.git.repoURL", get_git_repo_url(here))):
        if value:
            out[key] = value
    return out


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
    m["epsilon/max"] = r.epsilon_max  # None (not logged) without DP
    for k, v in (r.strategy_stats or {}).items():
        if isinstance(v, (int, float)):
            m[f"strategy/{k}"] = v
    return m


CLIENT_TABLE = "clients.json"  # one row per client and round: the per-client series, as a table


def client_rows(record: RoundRecord) -> dict[str, list]:
    """This round's per-client rows (every client with a report or an ε), columns as lists for log_table."""
    ids = sorted(set(record.clients) | set(record.epsilon_per_client))
    rows = {"round": [], "client": [], "loss": [], "update_norm": [], "client_s": [], "handler_s": [], "epsilon": []}
    for cid in ids:
        c = record.clients.get(cid)
        rows["round"].append(record.round)
        rows["client"].append(cid)
        rows["loss"].append(None if c is None else c.loss)
        rows["update_norm"].append(None if c is None else c.update_norm)
        rows["client_s"].append(None if c is None else c.client_s)
        rows["handler_s"].append(None if c is None else c.handler_s)
        rows["epsilon"].append(record.epsilon_per_client.get(cid))
    return rows


def history_figure(history: list[dict]):
    """Accuracy, ε and bytes per round: one figure for the run page."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rounds = [h["round"] for h in history]
    fig = Figure(figsize=(10, 3.2), layout="constrained")
    ax = fig.subplots(1, 3)
    for key, label in (("global_accuracy", "global"), ("personalized_accuracy", "personalised")):
        pts = [(r, h[key]) for r, h in zip(rounds, history, strict=True) if h.get(key) is not None]
        if pts:
            ax[0].plot(*zip(*pts, strict=True), marker="o", label=label)
    ax[0].set(title="accuracy", xlabel="round")
    ax[0].legend(loc="lower right")
    eps = [(r, h["epsilon_max"]) for r, h in zip(rounds, history, strict=True) if h.get("epsilon_max") is not None]
    if eps:
        ax[1].plot(*zip(*eps, strict=True), marker="o", color="tab:red")
    ax[1].set(title="ε max (no DP: none)" if not eps else "ε max over clients", xlabel="round")
    ax[2].bar([r - 0.2 for r in rounds], [h["bytes_up"] / 1e6 for h in history], width=0.4, label="up")
    ax[2].bar([r + 0.2 for r in rounds], [h["bytes_down"] / 1e6 for h in history], width=0.4, label="down")
    ax[2].set(title="MB moved", xlabel="round")
    ax[2].legend()
    return fig


class NullTracker(RoundObserver):
    uri: str | None = None
    run_id: str | None = None

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def backfill(self, history: list[RoundRecord]) -> None:
        pass

    def log_datasets(self, data, *, test, pool=None) -> None:
        pass

    def log_model(self, adapter_dir: Path, *, cfg_dict: dict, labels: list[str], examples: list[str]) -> None:
        pass


class MLflowTracker(NullTracker):
    """One MLflow run per federation; resuming reuses the same run id."""

    def __init__(self, cfg: FedConfig, run_dir: Path, run_id: str | None = None, parent_run_id: str | None = None):
        import mlflow

        self.uri = tracking_uri(cfg)
        self.run_dir = run_dir
        Path(cfg.runs_root).mkdir(parents=True, exist_ok=True)
        self.client = mlflow_client(self.uri)
        exp_id = _experiment_id(self.client, cfg)
        marker = run_dir / RUN_ID_FILE
        if run_id is None and marker.exists():  # a run that died before its first checkpoint: same MLflow run
            run_id = json.loads(marker.read_text())["run_id"]
        if run_id is None:
            run = self.client.create_run(exp_id, tags=run_tags(cfg, run_dir, parent_run_id))
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
        self.system = None
        try:  # MLflow's own system metrics (CPU, memory, disk, network; GPU when present) of the coordinator's host
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.system = SystemMetricsMonitor(self.run_id, sampling_interval=10, resume_logging=run_id is not None,
                                               tracking_uri=self.uri)
            self.system.start()
        except Exception:  # noqa: BLE001 - system metrics never fail a federation
            log.exception("system metrics are off")

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
        rows = client_rows(record)
        if rows["client"]:
            import warnings

            with warnings.catch_warnings():  # pandas' dtype notice from inside MLflow's log_table
                warnings.simplefilter("ignore")
                self.client.log_table(self.run_id, rows, CLIENT_TABLE)  # appends to the run's table

    def log_datasets(self, data, *, test, pool=None) -> None:
        """The run's inputs (``mlflow.log_input``): the server's test split, and in simulation the federated pool
        the clients' partitions were cut from — as MLflow datasets (name, digest, schema, profile; no rows)."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        name = data.name if data.name not in ("local", "hf") else Path(str(data.path)).name
        inputs = []
        for context, part in (("test", test), ("train", pool)):
            if part is None:
                continue
            try:
                with warnings.catch_warnings():  # MLflow's hint that integer columns cannot hold missing values
                    warnings.simplefilter("ignore", UserWarning)
                    ds = mlflow.data.from_pandas(part.to_pandas(), name=f"{name}-{context}", targets="label")
                inputs.append(DatasetInput(ds._to_mlflow_entity(), [InputTag("mlflow.data.context", context)]))
            except Exception:  # noqa: BLE001 - a dataset record never fails a federation
                log.exception("could not log the %s dataset", context)
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)

    def log_model(self, adapter_dir: Path, *, cfg_dict: dict, labels: list[str], examples: list[str]) -> None:
        """The adapter as the run's MLflow model (``coordinator.mlmodel``)."""
        from fedlora.coordinator.mlmodel import log_model

        try:
            uri = log_model(self.uri, self.run_id, adapter_dir, cfg_dict=cfg_dict, labels=labels, examples=examples)
            log.debug("logged model %s", uri)
        except Exception:  # noqa: BLE001 - the adapter files are logged already; say why the model is not
            log.exception("could not log the adapter as an MLflow model")

    def log_artifact(self, path, artifact_path=None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def on_finish(self, summary: dict, status: str) -> None:
        if self.system is not None:
            self.system.finish()
            self.system = None
        if (self.run_dir / "summary.json").exists():
            self.log_artifact(self.run_dir / "summary.json")
        if summary.get("history"):
            try:
                self.client.log_figure(self.run_id, history_figure(summary["history"]), "figures/rounds.png")
            except Exception:  # noqa: BLE001 - a figure never fails a finished federation
                log.exception("could not log the rounds figure")
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
    Path(cfg.runs_root).mkdir(parents=True, exist_ok=True)
    client = mlflow_client(uri)
    exp_id = _experiment_id(client, cfg)
    found = client.search_runs([exp_id], filter_string=f"tags.`fedlora.sweep_dir` = '{sweep_dir}'", max_results=1)
    if found:
        return found[0].info.run_id
    tags = {"mlflow.runName": f"sweep {sweep_dir.name}", "fedlora.sweep_dir": str(sweep_dir)}
    run = client.create_run(exp_id, tags=tags)
    return run.info.run_id


def finish_sweep(cfg: FedConfig, sweep_dir: Path) -> str | None:
    """End a multirun's parent run: a comparison table and figure across its points, and a status (FINISHED when
    every point finished, FAILED otherwise)."""
    uri = tracking_uri(cfg)
    if uri is None:
        return None
    client = mlflow_client(uri)
    exp_id = _experiment_id(client, cfg)
    found = client.search_runs([exp_id], filter_string=f"tags.`fedlora.sweep_dir` = '{sweep_dir}'", max_results=1)
    if not found:
        return None
    parent = found[0].info.run_id
    children = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
                                  max_results=10_000, order_by=["attributes.start_time ASC"])
    table = {"run": [], "overrides": [], "status": [], "global_accuracy": [], "epsilon_max": []}
    for c in children:
        table["run"].append(c.info.run_name)
        table["overrides"].append(c.data.tags.get("fedlora.overrides", ""))
        table["status"].append(c.info.status)
        table["global_accuracy"].append(c.data.metrics.get("global/accuracy"))
        table["epsilon_max"].append(c.data.metrics.get("epsilon/max"))
    import warnings

    with warnings.catch_warnings():  # pandas' dtype notice from inside MLflow's log_table
        warnings.simplefilter("ignore")
        client.log_table(parent, table, "sweep_comparison.json")
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        fig = Figure(figsize=(9, max(3.0, 0.5 * len(children) + 1.5)))
        ax = fig.subplots()
        fig.subplots_adjust(left=0.45, right=0.97, bottom=0.15)
        ax.barh(table["overrides"] or ["-"], [a or 0.0 for a in table["global_accuracy"]] or [0.0])
        ax.set(xlabel="global accuracy (last round)", title=f"sweep {sweep_dir.name}")
        client.log_figure(parent, fig, "figures/sweep_accuracy.png")
    except Exception:  # noqa: BLE001 - the figure is a view of the table
        log.exception("could not log the sweep figure")
    ok = children and all(c.info.status == "FINISHED" for c in children)
    client.set_terminated(parent, status="FINISHED" if ok else "FAILED")
    return parent
