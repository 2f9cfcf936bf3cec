"""A federation's lifecycle: validate, place the coordinator on Ray, run Flower's simulation engine, report."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from fedlora.config import validate, validate_against_data

log = logging.getLogger("fedlora.run")

#: set in this process and passed to every Ray worker (simulated clients, the coordinator actor)
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
}


def apply_offline_env() -> None:
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)


class _DropDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage()


def quiet_logs() -> None:
    """Keep the console to our progress lines: libraries speak only on warnings (and Flower's
    run_simulation deprecation notice, which we know about, not at all)."""
    for name in ("alembic", "mlflow", "flwr", "ray", "datasets", "transformers", "peft", "opacus"):
        logging.getLogger(name).setLevel(logging.WARNING)
    flwr_log = logging.getLogger("flwr")
    for h in [*flwr_log.handlers, *logging.getLogger().handlers]:
        h.addFilter(_DropDeprecation())
    flwr_log.addFilter(_DropDeprecation())


def prepare(cfg: dict) -> dict:
    """Every check that needs the data (privacy vs client sizes, batch vs client sizes); returns the config
    completed with derived values. Raises ``ConfigError`` naming the key before any federation work."""
    from fedlora.clients.data import DataSpec, num_labels, partition_sizes

    validate(cfg)
    dspec = DataSpec.from_dict({**cfg["data"], "seed": cfg["seed"]})
    sizes = partition_sizes(dspec, int(cfg["clients"]["num"]))
    validate_against_data(cfg, sizes)
    return {**cfg, "num_labels": num_labels(dspec), "client_train_sizes": sizes}


def _ray_init(cfg: dict) -> None:
    import ray

    rt = cfg["runtime"]
    runtime_env = {"env_vars": {**OFFLINE_ENV, "FEDLORA_TORCH_THREADS": str(rt.get("torch_threads") or 1)}}
    if ray.is_initialized():
        return
    if rt["kind"] == "local":
        ray.init(
            address="local",
            num_cpus=int(rt["num_cpus"]),
            object_store_memory=int(rt["object_store_mb"]) * 1024 * 1024,
            _memory=int(rt["memory_mb"]) * 1024 * 1024,
            include_dashboard=False,
            runtime_env=runtime_env,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
    else:
        ray.init(address=rt["address"], runtime_env=runtime_env, logging_level=logging.WARNING)


def run_federation(cfg: dict, run_dir: str | os.PathLike, *, parent_run_id: str | None = None, echo=print) -> dict:
    """Run (or resume, when ``run_dir`` holds a checkpoint) one federation; return its summary."""
    apply_offline_env()
    quiet_logs()  # before importing Flower: it imports alembic, which logs its plugins at INFO on import
    import ray
    from flwr.simulation import run_simulation

    from fedlora.clients.app import app as client_app
    from fedlora.coordinator.core import Coordinator
    from fedlora.coordinator.server_app import make_server_app

    quiet_logs()  # again: importing Flower set its own logger to DEBUG
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = prepare(cfg) if "client_train_sizes" not in cfg else cfg
    (run_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    _write_yaml(cfg, run_dir / "config.yaml")

    _ray_init(cfg)
    actor_cls = ray.remote(num_cpus=0, max_restarts=0)(Coordinator)
    coord = actor_cls.options(name=f"coordinator-{run_dir.name}", namespace="fedlora").remote(cfg, str(run_dir), parent_run_id)
    outcome: dict = {}
    server_app = make_server_app(coord, num_nodes=int(cfg["clients"]["num"]), timeout_s=float(cfg["round_timeout_s"]), outcome=outcome)
    backend_config = {"client_resources": {"num_cpus": float(cfg["clients"]["cpus"]), "num_gpus": 0.0}, "init_args": {}}
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=int(cfg["clients"]["num"]),
            backend_name="ray",
            backend_config=backend_config,
        )
    finally:
        if ray.is_initialized():
            ray.shutdown()
    if "error" in outcome:
        raise RuntimeError(f"federation failed: {outcome['error']}") from outcome["error"]
    if "summary" not in outcome:
        raise RuntimeError(f"federation ended without a result; see the log above and {run_dir}")
    return outcome["summary"]


def _write_yaml(cfg: dict, path: Path) -> None:
    from omegaconf import OmegaConf

    path.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))


def load_run_config(run_dir: str | os.PathLike) -> dict:
    p = Path(run_dir) / "config.json"
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: is {run_dir} a fedlora run directory?")
    return json.loads(p.read_text())


def run_inprocess(cfg: dict, run_dir: str | os.PathLike, *, echo=print) -> dict:
    """The same coordinator and client code, driven in one process without Flower or Ray transport.

    For benchmarks and sweeps that compare aggregation methods many times on a 2-core box; the product path
    (``fedlora run``) always goes through Flower on Ray.
    """
    from fedlora.clients import worker
    from fedlora.clients.state import ClientStore
    from fedlora.coordinator.core import Coordinator

    apply_offline_env()
    quiet_logs()
    cfg = prepare(cfg) if "client_train_sizes" not in cfg else cfg
    coord = Coordinator(cfg, str(run_dir))
    spec = json.loads(coord.spec())
    ctxs = {i: worker.context(spec, i) for i in range(int(cfg["clients"]["num"]))}
    stores = {i: ClientStore(spec["state_root"], c.client_id) for i, c in ctxs.items()}
    coord.register({i: worker.hello(ctxs[i], stores[i]) for i in ctxs})

    def deliver(plans, fn):
        out = []
        for p in plans:
            i = p["node_id"]
            try:
                res = fn(ctxs[i], stores[i], p["tensors"], json.loads(p["meta"]))
            except Exception as e:  # noqa: BLE001 - a failing client costs its contribution, as in Flower
                out.append({"node_id": i, "error": f"{type(e).__name__}: {e}"})
                continue
            out.append({"node_id": i, "error": None, **res})
        return out

    def train(ctx, store, payload, meta):
        up, metrics, info = worker.train(ctx, store, payload, meta)
        return {"update": up, "metrics": metrics, "info": info}

    while plans := coord.plan_round():
        nxt = coord.finish_round(deliver(plans, train))
        if nxt["evaluate_clients"]:
            coord.finish_evaluate(deliver(coord.plan_evaluate(), lambda *a: {"metrics": worker.evaluate(*a)}))
        echo(coord.end_round())
    return coord.finish()
