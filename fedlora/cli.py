"""The ``fedlora`` command.

    fedlora run [hydra overrides...] [-m]   run a federation (or a sweep with -m); --help lists the groups
    fedlora resume <run_dir>                 continue a run that stopped, from its last completed round
    fedlora ls [--runs-root D] [--format F]  the runs under a runs root: status, progress, accuracy, ε
    fedlora show <run_dir> [--format F]      one run: its row, key settings and per-round history
    fedlora ui [--port P] [--runs-root D]    the MLflow UI over the run store, on 127.0.0.1
    fedlora completion bash                  shell completion: eval "$(fedlora completion bash)"
    fedlora serve [hydra overrides...]       a federation of real devices (Flower SuperLink, TLS, enrolled only)
    fedlora enroll KEY.pub --name ID         admit a device (--list, --revoke ID)
    fedlora client --server H:P --ca CA ...  on a device: join as an authenticated SuperNode (--init-key first)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedlora.config import CONFIG_DIR, FedConfig
from fedlora.schema import ConfigError


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedlora")
    except PackageNotFoundError:  # pragma: no cover - a source tree without install
        return "unknown"


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


def check_overrides(overrides: list[str], multirun: bool, *, simulated: bool = True) -> list[FedConfig]:
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
        prepare(cfg, simulated=simulated)
        if not simulated and cfg.privacy.enabled and cfg.privacy.noise != "csprng":
            raise ConfigError("privacy.noise", "seeded-insecure noise is refused in deployment (the server would "
                                               "know the devices' noise): use privacy.noise=csprng")
    from fedlora.lifecycle import check_reachable, check_run_dir_free

    for o in overrides:  # a run directory the user names must not hold a run already (checked before Hydra
        if o.startswith("hydra.run.dir="):  # writes anything into it)
            check_run_dir_free(Path(o.split("=", 1)[1]).resolve())
    for cfg in {c.runtime for c in cfgs}:
        if cfg.kind == "ray_cluster":
            check_reachable(cfg.address, cfg.connect_timeout_s)
    return cfgs


def run_help(overrides: list[str], prog: str = "fedlora run") -> str:
    """``fedlora run --help``: the groups and their options (the selected one starred), then every key with its
    value under ``overrides`` (the defaults when none) and its doc."""
    import json

    from fedlora.config import compose, describe_keys, group_options

    choices: dict = {}
    cfg = FedConfig.from_dict(compose(list(overrides), choices=choices))
    lines = [f"usage: {prog} [group=option ...] [key=value ...]      (-m: a sweep over comma-separated values)",
             "", "config groups (group=option; * = selected):"]
    for group, options in group_options().items():
        picked = choices.get(group)
        lines.append(f"  {group:9} " + ", ".join(o + ("*" if o == picked else "") for o in options))
    lines += ["", "keys (key=value; the value shown is what this command line gives):"]
    rows = [(k, json.dumps(v, default=list) if not isinstance(v, str) else v, d) for k, v, d in describe_keys(cfg)]
    width = min(max(len(f"{k} = {v}") for k, v, _ in rows), 56)
    for k, v, d in rows:
        lines.append(f"  {f'{k} = {v}':{width}}  {d}")
    lines += ["", f"`{prog} --help group=option ...` shows the values under those choices; Hydra's own flags: "
                  f"{prog} --hydra-help."]
    return "\n".join(lines)


def _hydra_run(argv: list[str], *, serve: bool = False) -> None:
    import hydra
    from hydra._internal.utils import get_args_parser
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    args = get_args_parser().parse_args(argv)
    if args.help:
        try:
            print(run_help(args.overrides, "fedlora serve" if serve else "fedlora run"))
        except ConfigError as e:
            _fail(f"invalid config: {e}")
        except Exception as e:  # noqa: BLE001 - Hydra's composition errors
            _fail(f"invalid config: {e}")
        sys.exit(0)
    points = 1
    if not (args.help or args.hydra_help or args.cfg or args.info or args.shell_completion):
        try:
            if serve and args.multirun:
                _fail("fedlora serve runs one federation: no -m")
            points = len(check_overrides(args.overrides, args.multirun, simulated=not serve))
        except ConfigError as e:
            _fail(f"invalid config: {e}")
        except Exception as e:  # noqa: BLE001 - Hydra's composition errors (unknown group, key, bad syntax)
            _fail(f"invalid config: {e}" + (f"\n{e.__cause__}" if e.__cause__ else ""))

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
    def main(dcfg: DictConfig) -> None:
        from fedlora.env import console_logging
        from fedlora.lifecycle import claim_run_dir, run_federation

        echo = console_logging().info
        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir).resolve()
        try:
            cfg = FedConfig.from_dict(_plain(dcfg))
            claim_run_dir(run_dir)
        except ConfigError as e:
            _fail(f"invalid config: {e}")
        echo(f"run dir: {run_dir}")
        parent = None
        if hc.mode is not None and hc.mode.name == "MULTIRUN":
            from fedlora.coordinator.tracking import sweep_parent

            parent = sweep_parent(cfg, Path(hc.sweep.dir).resolve())
        try:
            if serve:
                from fedlora.serve import serve_federation

                summary = serve_federation(cfg, run_dir, echo=echo)
            else:
                summary = run_federation(cfg, run_dir, parent_run_id=parent, echo=echo,
                                         concurrent=concurrent_points(hc, points))
        except ConfigError as e:
            _fail(f"invalid config: {e}")
        _report(summary, run_dir, echo)

    sys.argv = ["fedlora serve" if serve else "fedlora run", *argv]
    main()


def concurrent_points(hc, points: int) -> int:
    """How many of a sweep's ``points`` run at once: 1 under Hydra's basic launcher (one after another), up to
    ``hydra.launcher.n_jobs`` under a parallel one (``hydra/launcher=joblib``: each point in its own process)."""
    if hc.mode is None or hc.mode.name != "MULTIRUN":
        return 1
    n_jobs = hc.launcher.get("n_jobs") if hasattr(hc.launcher, "get") else None
    if n_jobs is None:
        return 1
    import joblib

    return max(1, min(points, joblib.effective_n_jobs(int(n_jobs))))


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a hard dependency
    _HydraCallback = object


class SweepEnd(_HydraCallback):
    """Hydra callback (``hydra.callbacks.sweep_end`` in config.yaml): when a multirun ends, its MLflow parent run
    gets the comparison table and figure and a final status."""

    def on_multirun_end(self, config, **kwargs) -> None:
        from fedlora.coordinator.tracking import finish_sweep

        try:
            finish_sweep(FedConfig.from_dict(_plain(config)), Path(config.hydra.sweep.dir).resolve())
        except Exception as e:  # noqa: BLE001 - the federations are done; say why the parent could not close
            print(f"fedlora: could not close the sweep's MLflow parent run: {e}", file=sys.stderr)


def _serve(argv: list[str]) -> None:
    _hydra_run(argv, serve=True)


def _enroll(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="fedlora enroll", description="admit a device to the federation `fedlora "
                                "serve` hosts (its public key, under a name that becomes its client id)")
    p.add_argument("public_key", nargs="?", type=Path, help="the device's key.pub (from fedlora client --init-key)")
    p.add_argument("--name", help="the device's client id (letters, digits, _ . -)")
    p.add_argument("--bits", type=int, default=32, help="its device class: storage/transfer bitwidth "
                                                         "(32, 16, 8, 4, 2; default 32)")
    p.add_argument("--list", action="store_true", help="list enrolled devices")
    p.add_argument("--revoke", metavar="NAME", help="cut a device off (its key can never come back)")
    p.add_argument("--runs-root", default="runs", help="the serve's runs_root (default: runs)")
    p.add_argument("--state-dir", help="the serve's deploy.state_dir, if set")
    a = p.parse_args(argv)
    from fedlora import serve

    state = Path(a.state_dir or Path(a.runs_root) / "deploy").resolve()
    try:
        if a.list:
            for name, e in sorted(serve.list_enrolled(state).items()):
                flag = "revoked" if e.get("revoked") else ("online" if e["online"] else "offline")
                print(f"{name:<24} node {e['node_id']:<20} {e['bits']:>2}-bit  {flag}")
            return
        if a.revoke:
            serve.revoke(state, a.revoke)
            print(f"revoked {a.revoke}: it is cut off and cannot rejoin with that key")
            return
        if not a.public_key or not a.name:
            _fail("give the device's public key file and --name (or --list / --revoke NAME)")
        e = serve.enroll(state, a.public_key, a.name, a.bits)
        print(f"enrolled {a.name} as node {e['node_id']} ({a.bits}-bit)")
    except (ConfigError, FileNotFoundError) as e:
        _fail(str(e))
    except RuntimeError as e:
        _fail(f"the SuperLink refused: {e}")


def _client(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="fedlora client", description="on a device: join a federation as an "
                                "authenticated SuperNode (or --init-key: make this device's key pair)")
    p.add_argument("--init-key", action="store_true", help="make the device's key pair and print the .pub to send "
                                                           "to the coordinator's operator")
    p.add_argument("--state-dir", type=Path, default=Path("fedlora-device"),
                   help="the device's own state: key, ledger, held adapter, cache (default: ./fedlora-device)")
    p.add_argument("--key", type=Path, help="private key (default: <state-dir>/node.key)")
    p.add_argument("--server", help="the coordinator's Fleet API, host:port")
    p.add_argument("--ca", type=Path, help="the CA certificate the coordinator's operator gave you")
    p.add_argument("--data", type=Path, help="this device's data: csv/tsv/json/jsonl/parquet with text and label")
    p.add_argument("--name", help="the name this device was enrolled under")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--retry-s", type=float, default=180.0, help="keep retrying a refused activation this long (a "
                                                                "restart right after a crash is refused ~1 min)")
    a = p.parse_args(argv)
    from fedlora.env import apply_offline_env

    apply_offline_env()
    if a.init_key:
        from fedlora.clients.device import init_key

        pub = init_key(a.state_dir, a.key)
        print(pub.read_text().strip())
        print(f"public key: {pub} (send it to the coordinator's operator; keep {pub.with_suffix('')} private)",
              file=sys.stderr)
        return
    missing = [f"--{k.replace('_', '-')}" for k in ("server", "ca", "data", "name") if not getattr(a, k)]
    if missing:
        _fail(f"missing {', '.join(missing)} (fedlora client --help)")
    for path, flag in ((a.ca, "--ca"), (a.data, "--data")):
        if not path.is_file():
            _fail(f"{flag} {path}: no such file")
    from fedlora.clients.device import run_device

    try:
        sys.exit(run_device(name=a.name, server=a.server, ca=a.ca, data=a.data, state_dir=a.state_dir, key=a.key,
                            text_column=a.text_column, label_column=a.label_column, val_fraction=a.val_fraction,
                            retry_s=a.retry_s))
    except FileNotFoundError as e:
        _fail(str(e))


def _resume(argv: list[str]) -> None:
    from fedlora.lifecycle import load_run_config, run_federation

    p = argparse.ArgumentParser(prog="fedlora resume", description="continue a stopped run from its last round")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="resumable keys only, e.g. rounds=12 round_timeout_s=900 "
                                                "tracking.uri=sqlite:////new/mlflow.db runtime.num_cpus=4")
    a = p.parse_args(argv)
    from fedlora.env import console_logging

    echo = console_logging().info
    run_dir = Path(a.run_dir).resolve()
    try:
        cfg = load_run_config(run_dir, a.overrides)
        summary = run_federation(cfg, run_dir, echo=echo)
    except (FileNotFoundError, ConfigError) as e:
        _fail(str(e))
    _report(summary, run_dir, echo)


def _ui(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="fedlora ui", description="the MLflow UI over a run store (default: the local "
                                                                "one under --runs-root, on 127.0.0.1)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--runs-root", default="runs", help="the runs_root of your federations (default: runs)")
    p.add_argument("--tracking-uri", help="the tracking.uri your runs used, if not the local store (a sqlite:/// "
                                          "file, a database URI, or a folder)")
    a = p.parse_args(argv)
    root = Path(a.runs_root).resolve()
    store, artifacts = a.tracking_uri, None
    if store is None:
        db = root / "mlflow.db"
        if not db.exists():
            _fail(f"no MLflow store at {db}: run a federation first (fedlora run), or pass --runs-root or "
                  "--tracking-uri")
        store, artifacts = f"sqlite:///{db}", root / "mlartifacts"
    elif store.startswith("http"):
        _fail(f"--tracking-uri {store} is an MLflow server already: open it in the browser")
    import socket

    with socket.socket() as probe:  # mlflow server would start and exit 0 on a busy port: refuse first
        try:
            probe.bind((a.host, a.port))
        except OSError as e:
            _fail(f"port {a.port} on {a.host} is in use or not available ({e.strerror}): pass another one with "
                  "--port")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", a.host, "--port", str(a.port), "--workers", "1",
           "--backend-store-uri", store]
    if artifacts is not None:
        cmd += ["--artifacts-destination", str(artifacts)]
    print(f"MLflow UI on http://{a.host}:{a.port} (store {store}); Ctrl-C stops it", flush=True)
    for name, url in experiment_urls(store, f"http://{a.host}:{a.port}"):
        print(f"  experiment {name}: {url}", flush=True)
    os.execvpe(cmd[0], cmd, env)


def experiment_urls(store: str, base: str) -> list[tuple[str, str]]:
    """(name, URL) of each experiment in ``store`` that holds runs, opening on its runs in MLflow's classic
    training view: MLflow 3.17's UI opens every experiment in its GenAI view (traces) unless the URL says
    ``workflowType=machine_learning`` (it reads that before the browser's remembered choice)."""
    from fedlora.env import quiet_logs

    quiet_logs()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    return [(e.name, f"{base}/#/experiments/{e.experiment_id}/runs?workflowType=machine_learning")
            for e in client.search_experiments() if client.search_runs([e.experiment_id], max_results=1)]


def _ls(argv: list[str]) -> None:
    import json

    from fedlora.runs import describe, find_runs, table

    p = argparse.ArgumentParser(prog="fedlora ls", description="the federations under a runs root (like `flwr ls`)")
    p.add_argument("--runs-root", default="runs", help="the runs_root of your federations (default: runs)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    a = p.parse_args(argv)
    root = Path(a.runs_root).resolve()
    if not root.is_dir():
        _fail(f"no runs root at {root}: pass --runs-root (the runs_root your federations used)")
    rows = [describe(r) for r in find_runs(root)]
    if a.format == "json":
        print(json.dumps(rows, indent=2))
        return
    print(table([{**r, "run": str(Path(r["run"]).relative_to(root))} for r in rows]))


def _show(argv: list[str]) -> None:
    import json

    from fedlora.runs import history_table, show, table

    p = argparse.ArgumentParser(prog="fedlora show", description="one run: status, key settings, per-round history")
    p.add_argument("run_dir")
    p.add_argument("--format", choices=("table", "json"), default="table")
    a = p.parse_args(argv)
    try:
        run = show(Path(a.run_dir).resolve())
    except FileNotFoundError as e:
        _fail(str(e))
    if a.format == "json":
        print(json.dumps(run, indent=2))
        return
    cfg = run["config"]
    print(table([run]))
    settings = {"model": (cfg.get("model") or {}).get("name_or_path"), "data": (cfg.get("data") or {}).get("name"),
                "clients": (cfg.get("clients") or {}).get("num"),
                "per_round": (cfg.get("clients") or {}).get("per_round"),
                "privacy": "dp" if (cfg.get("privacy") or {}).get("enabled") else "none",
                "epsilon_target": (cfg.get("privacy") or {}).get("epsilon"), "delta": run.get("delta"),
                "seed": cfg.get("seed"), "mlflow_run": run.get("mlflow_run_id")}
    print("\n" + "  ".join(f"{k}={v}" for k, v in settings.items() if v is not None))
    if run["history"]:
        print("\n" + history_table(run["history"]))


BASH_COMPLETION = r"""# fedlora bash completion: eval "$(fedlora completion bash)" (e.g. in ~/.bashrc)
_fedlora() {
    local words=($COMP_LINE) cur=""
    [[ "$COMP_LINE" == *" " ]] || cur="${words[-1]}"
    if [[ ${#words[@]} -eq 1 || ( ${#words[@]} -eq 2 && -n "$cur" ) ]]; then
        COMPREPLY=($(compgen -W "%(commands)s" -- "$cur"))
        return
    fi
    case "${words[1]}" in
        run|serve)  # Hydra's own completion of groups, options and keys, asked without the command word
            local line="${COMP_LINE/ ${words[1]}/}"
            local choices
            choices=$(COMP_LINE="$line" COMP_POINT=$(( COMP_POINT - ${#words[1]} - 1 )) \
                      "${words[0]}" "${words[1]}" -sc query=bash 2>/dev/null)
            COMPREPLY=($(compgen -o nospace -o default -W "$choices" -- "$cur"))
            if [[ "$cur" == *=* && "$COMP_WORDBREAKS" == *=* ]]; then  # bash completes only the part after '='
                local prefix="${cur%%=*}="
                COMPREPLY=("${COMPREPLY[@]#"$prefix"}")
            fi
            ;;
        resume|show) COMPREPLY=($(compgen -d -- "$cur")) ;;
        *) COMPREPLY=($(compgen -f -- "$cur")) ;;
    esac
}
complete -o nospace -o default -F _fedlora fedlora
"""


def _completion(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="fedlora completion", description="print a shell completion script")
    p.add_argument("shell", choices=("bash",))
    p.parse_args(argv)
    print(BASH_COMPLETION % {"commands": " ".join(COMMANDS)}, end="")


COMMANDS = {"run": _hydra_run, "resume": _resume, "ls": _ls, "show": _show, "ui": _ui, "serve": _serve,
            "enroll": _enroll, "client": _client, "completion": _completion}


def main(argv: list[str] | None = None) -> None:
    from fedlora.env import apply_offline_env

    apply_offline_env()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        print(f"fedlora {_version()}")
        return
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fedlora <command> [args...]\n\ncommands:\n" + __doc__.split("\n\n", 1)[1].rstrip()
              + "\n\n`fedlora <command> --help` for each command's options; `fedlora --version`.")
        sys.exit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        import difflib

        near = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        _fail(f"unknown command {argv[0]!r}" + (f"; did you mean {near[0]!r}?" if near else "")
              + f" (commands: {', '.join(COMMANDS)})")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
