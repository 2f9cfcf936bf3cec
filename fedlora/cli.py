"""The ``fedlora`` command.

    fedlora run [hydra overrides...] [-m]   run a federation (or a sweep with -m); --help lists the groups
    fedlora resume <run_dir>                 continue a run that stopped, from its last completed round
    fedlora ui [--port P] [--runs-root D]    the MLflow UI over the run store, on 127.0.0.1
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedlora.config import CONFIG_DIR, FedConfig
from fedlora.schema import ConfigError


def _fail(msg: str) -> None:
    print(f"fedlora: error: {msg}", file=sys.stderr)
    sys.exit(2)


def _report(summary: dict, run_dir: Path, echo=print) -> None:
    echo("")
    echo(f"strategy {summary['strategy']}: {summary['rounds_completed']}/{summary['rounds_planned']} rounds "
         f"in {summary['wall_time_s']:.0f}s")
    accs = [h.get("global_accuracy") for h in summary["history"]]
    if any(a is not None for a in accs):
        echo("global accuracy per round: " + " ".join("-" if a is None else f"{a:.3f}" for a in accs))
    pers = [h.get("personalized_accuracy") for h in summary["history"]]
    if any(a is not None for a in pers):
        echo("personalised accuracy per round: " + " ".join("-" if a is None else f"{a:.3f}" for a in pers))
    if summary.get("delta") is not None:
        echo(f"privacy: ε max {summary['epsilon_max']:.3f} at δ={summary['delta']:g} (per-client in summary.json)")
    echo(f"bytes up {summary['bytes_up']:,} / down {summary['bytes_down']:,}")
    ml = summary.get("mlflow") or {}
    if ml.get("run_id"):
        echo(f"mlflow run {ml['run_id']} in {ml['tracking_uri']}")
        echo(f"open the UI: fedlora ui --runs-root {run_dir.parent}")
    echo(f"run dir: {run_dir}")


def _plain(cfg) -> dict:
    """A composed config (with or without its ``hydra`` node) as the plain dict ``FedConfig`` reads."""
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(cfg, resolve=False)
    d.pop("hydra", None)
    return OmegaConf.to_container(OmegaConf.create(d), resolve=True)


def check_overrides(overrides: list[str], multirun: bool) -> list[FedConfig]:
    """Compose every job the command line describes (each sweep point with ``-m``) and validate it against its
    data, before Hydra creates any directory. Raises ``ConfigError`` (or Hydra's own error) on the first bad one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fedlora.lifecycle import prepare

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3", job_name="fedlora"):
        if not multirun:
            composed = [compose(config_name="config", overrides=list(overrides))]
        else:
            from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
            from hydra.core.override_parser.overrides_parser import OverridesParser
            from hydra.types import RunMode

            h = GlobalHydra.instance().hydra
            master = h.compose_config(config_name="config", overrides=list(overrides), run_mode=RunMode.MULTIRUN,
                                      from_shell=True)
            params = [f"{k}={v}" for k, v in (master.hydra.sweeper.params or {}).items()]
            parsed = OverridesParser.create(config_loader=h.config_loader).parse_overrides(
                params + list(master.hydra.overrides.task))
            jobs = BasicSweeper.split_arguments(parsed, None)[0]
            composed = [h.config_loader.load_sweep_config(master, list(j)) for j in jobs]
    cfgs = [FedConfig.from_dict(_plain(c)) for c in composed]
    for cfg in cfgs:
        prepare(cfg)
    for o in overrides:  # a run directory the user names must not hold a run already (checked before Hydra
        if o.startswith("hydra.run.dir="):  # writes anything into it)
            from fedlora.lifecycle import check_run_dir_free

            check_run_dir_free(Path(o.split("=", 1)[1]).resolve())
    return cfgs


def _hydra_run(argv: list[str]) -> None:
    import hydra
    from hydra._internal.utils import get_args_parser
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    args = get_args_parser().parse_args(argv)
    if not (args.help or args.hydra_help or args.cfg or args.info or args.shell_completion):
        try:
            check_overrides(args.overrides, args.multirun)
        except ConfigError as e:
            _fail(f"invalid config: {e}")
        except Exception as e:  # noqa: BLE001 - Hydra's composition errors (unknown group, key, bad syntax)
            _fail(f"invalid config: {e}" + (f"\n{e.__cause__}" if e.__cause__ else ""))

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
    def main(dcfg: DictConfig) -> None:
        from fedlora.lifecycle import claim_run_dir, run_federation

        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir).resolve()
        try:
            cfg = FedConfig.from_dict(_plain(dcfg))
            claim_run_dir(run_dir)
        except ConfigError as e:
            _fail(f"invalid config: {e}")
        print(f"run dir: {run_dir}")
        parent = None
        if hc.mode is not None and hc.mode.name == "MULTIRUN":
            from fedlora.coordinator.tracking import sweep_parent

            parent = sweep_parent(cfg, Path(hc.sweep.dir).resolve())
        summary = run_federation(cfg, run_dir, parent_run_id=parent)
        _report(summary, run_dir)

    sys.argv = ["fedlora run", *argv]
    main()


def _resume(argv: list[str]) -> None:
    from fedlora.lifecycle import load_run_config, run_federation

    p = argparse.ArgumentParser(prog="fedlora resume", description="continue a stopped run from its last round")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="resumable keys only, e.g. rounds=12 round_timeout_s=900 "
                                                "tracking.uri=sqlite:////new/mlflow.db runtime.num_cpus=4")
    a = p.parse_args(argv)
    run_dir = Path(a.run_dir).resolve()
    try:
        cfg = load_run_config(run_dir, a.overrides)
    except (FileNotFoundError, ConfigError) as e:
        _fail(str(e))
    summary = run_federation(cfg, run_dir)
    _report(summary, run_dir)


def _ui(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="fedlora ui", description="MLflow UI over the local run store (127.0.0.1)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--runs-root", default="runs", help="the runs_root of your federations (default: runs)")
    a = p.parse_args(argv)
    root = Path(a.runs_root).resolve()
    db = root / "mlflow.db"
    if not db.exists():
        _fail(f"no MLflow store at {db}: run a federation first (fedlora run) or pass --runs-root")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(a.port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", str(root / "mlartifacts"),
    ]
    print(f"MLflow UI on http://127.0.0.1:{a.port} (store {db}); Ctrl-C stops it", flush=True)
    os.execvpe(cmd[0], cmd, env)


COMMANDS = {"run": _hydra_run, "resume": _resume, "ui": _ui}


def main(argv: list[str] | None = None) -> None:
    from fedlora.env import apply_offline_env

    apply_offline_env()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
