"""``fedlora serve`` and ``fedlora enroll``: a federation of real devices (Flower SuperNodes).

``serve`` hosts the Coordinator as a named actor on Ray (embedded local Ray, or ``runtime.address``), starts and
owns a Flower SuperLink on 127.0.0.1 — TLS on, SuperNode authentication on, a persistent database (enrollments
and reconnects survive a restart) — and exposes only Flower's Fleet API to the devices, through a TLS proxy
(``fleet_proxy``) on ``deploy.host:deploy.port``: the SuperLink's Control and Runtime APIs and Ray stay on
loopback. It waits for ``deploy.min_available`` enrolled devices, submits the run (``flwr run``) whose ServerApp
(``coordinator.deployed``) drives the one round loop, prints each round, and ends with the same report as
``fedlora run`` (summary.json, MLflow run, PEFT adapter).

``enroll`` registers a device's public key under a name — its client id everywhere, the identity the
coordinator trusts — with an optional device class (bitwidth); lists; revokes (the device is cut off and cannot
come back with that key).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fedlora.atomic_io import atomic_write_json
from fedlora.config import FedConfig
from fedlora.env import OFFLINE_ENV
from fedlora.schema import ConfigError

log = logging.getLogger("fedlora.serve")

CONNECTION = "fedlora"
NAMESPACE = "fedlora"


def state_dir(cfg: FedConfig) -> Path:
    return Path(cfg.deploy.state_dir or Path(cfg.runs_root) / "deploy").resolve()


def _bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else name


def flwr_env(home: Path) -> dict[str, str]:
    return {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(home), "NO_PROXY": "127.0.0.1,localhost",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def flwr(home: Path, *args: str, timeout: float = 120) -> dict:
    """A `flwr` CLI call with ``--format json`` against this deployment's SuperLink; its JSON, or an error."""
    r = subprocess.run([_bin("flwr"), *args, "--format", "json"], env=flwr_env(home), capture_output=True,
                       text=True, timeout=timeout)
    try:
        out = json.loads(r.stdout)
    except ValueError:
        raise RuntimeError(f"flwr {' '.join(args)} failed (rc {r.returncode}): {r.stdout[-800:]} "
                           f"{r.stderr[-800:]}") from None
    if not out.get("success", False):  # flwr prints {"success": false} and exits 0 on errors in JSON mode
        raise RuntimeError(f"flwr {' '.join(args)}: {out.get('error-message', out)}")
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tls(cfg: FedConfig, state: Path) -> dict[str, Path]:
    d = cfg.deploy
    if d.tls_cert or d.tls_key or d.tls_ca:
        paths = {"cert": d.tls_cert, "key": d.tls_key, "ca": d.tls_ca}
        missing = [k for k, v in paths.items() if not v or not Path(v).is_file()]
        if missing:
            raise ConfigError(f"deploy.tls_{missing[0]}", "give deploy.tls_cert, deploy.tls_key and deploy.tls_ca "
                                                          "together (existing files), or none to generate them")
        return {k: Path(v).resolve() for k, v in paths.items()}
    from fedlora.pki import make_server_tls

    return make_server_tls(state / "tls", list(d.names))


def _wait_health(port: int, ca: Path, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the SuperLink exited (rc {proc.returncode}); see its log")
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=ctx, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the SuperLink did not answer /health within {timeout_s:.0f}s")


APP_PYPROJECT = """[project]
name = "fedlora-deployment"
version = "1.0.0"

[tool.flwr.app]
publisher = "fedlora"

[tool.flwr.app.components]
serverapp = "fedlora.coordinator.deployed:app"
clientapp = "fedlora.clients.deployed:app"

[tool.flwr.app.config]
{config}
"""


def _write_app(state: Path) -> Path:
    from fedlora.coordinator.deployed import RUN_CONFIG

    app = state / "app"
    app.mkdir(parents=True, exist_ok=True)
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in RUN_CONFIG.items())
    (app / "pyproject.toml").write_text(APP_PYPROJECT.format(config=lines))
    return app


def _write_connection(home: Path, port: int, ca: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                      f'address = "127.0.0.1:{port}"\nroot-certificates = "{ca}"\n')


def read_enrollments(state: Path) -> dict:
    p = state / "enrollments.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _online(home: Path, enrolled: dict) -> list[str]:
    nodes = flwr(home, "supernode", "ls", CONNECTION).get("nodes", [])
    online = {int(n["node-id"]) for n in nodes if n.get("status") == "online"}
    return sorted(name for name, e in enrolled.items() if not e.get("revoked") and int(e["node_id"]) in online)


def serve_federation(cfg: FedConfig, run_dir: Path, *, echo=print) -> dict:
    """Run one federation of enrolled devices; returns its summary (as ``fedlora run``'s)."""
    import ray

    from fedlora.coordinator.observers import ConsoleObserver
    from fedlora.coordinator.records import RoundRecord
    from fedlora.fleet_proxy import FleetProxy
    from fedlora.lifecycle import (
        _announce,
        _ray_init,
        _write_config,
        activation_cache_dir,
        place_coordinator,
        prepare,
    )

    if cfg.privacy.enabled and cfg.privacy.noise != "csprng":
        raise ConfigError("privacy.noise", "seeded-insecure noise is refused in deployment: the server would know "
                                           "the devices' noise; use privacy.noise=csprng")
    labels = prepare(cfg, simulated=False)
    _announce(cfg, echo)
    state = state_dir(cfg)
    state.mkdir(parents=True, exist_ok=True)
    tls = _tls(cfg, state)
    home = state / "flwr-home"
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_config(cfg, run_dir)
    _ray_init(cfg)
    name = f"coordinator-{run_dir.name}"
    coord = place_coordinator(ray, name, namespace=NAMESPACE).remote(
        cfg, labels, str(run_dir), None, cache_dir=str(activation_cache_dir(cfg)))
    ray.get(coord.spec.remote())  # built (model, test split) before devices are asked anything
    link_port = _free_port()
    link_log = open(state / "superlink.log", "ab")
    link = subprocess.Popen(
        [_bin("flower-superlink"), "--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]),
         "--ssl-keyfile", str(tls["key"]), "--enable-supernode-auth", "--database", str(state / "superlink.db"),
         "--host", "127.0.0.1", "--port", str(link_port), "--disable-runtime-dependency-installation"],
        env=flwr_env(home), stdout=link_log, stderr=subprocess.STDOUT, start_new_session=True)
    proxy = None
    try:
        _wait_health(link_port, tls["ca"], link)
        _write_connection(home, link_port, tls["ca"])
        proxy = FleetProxy(cfg.deploy.host, cfg.deploy.port, link_port, cert=str(tls["cert"]), key=str(tls["key"]),
                           ca=str(tls["ca"])).start()
        atomic_write_json(state / "deploy.json", {"link_port": link_port, "fleet": f"{cfg.deploy.host}:{proxy.port}",
                                                  "flwr_home": str(home), "ca": str(tls["ca"]), "run_dir": str(run_dir),
                                                  "pid": os.getpid()})
        echo(f"fleet API on {cfg.deploy.host}:{proxy.port} (TLS, CA {tls['ca']}); enroll devices with "
             f"`fedlora enroll <key.pub> --name <id> --runs-root {cfg.runs_root}`")
        need = cfg.deploy.min_available or cfg.clients.num
        shown = None
        t0 = time.monotonic()
        while len(online := _online(home, read_enrollments(state))) < need:
            if shown != online:
                echo(f"waiting for devices: {len(online)}/{need} enrolled and online ({', '.join(online) or '-'})")
                shown = online
            if cfg.deploy.wait_timeout_s and time.monotonic() - t0 > cfg.deploy.wait_timeout_s:
                raise RuntimeError(f"only {len(online)} of deploy.min_available={need} enrolled devices came online "
                                   f"within deploy.wait_timeout_s={cfg.deploy.wait_timeout_s:g}s")
            time.sleep(2)
        echo(f"{len(online)} devices online: {', '.join(online)}")
        gcs = ray.get_runtime_context().gcs_address
        run_config = {"coordinator": name, "namespace": NAMESPACE, "ray-address": gcs,
                      "enrollments": str(state / "enrollments.json"), "log-file": str(run_dir / "serverapp.log"),
                      "num-nodes": need, "round-timeout-s": float(cfg.round_timeout_s),
                      "connect-timeout-s": float(cfg.runtime.connect_timeout_s)}
        rc = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        run_id = flwr(home, "run", str(_write_app(state)), CONNECTION, "--run-config", rc)["run-id"]
        echo(f"run {run_id} submitted")
        console = ConsoleObserver(rounds=cfg.rounds, privacy=cfg.privacy.enabled, echo=echo)
        seen = 0
        while True:
            history = ray.get(coord.history_records.remote(seen))
            for h in history:
                console.on_round(RoundRecord.from_dict(h))
            seen += len(history)
            status = flwr(home, "ls", CONNECTION, "--run-id", str(run_id))["runs"][0]["status"]
            if status.startswith("finished"):
                break
            time.sleep(2)
        for h in ray.get(coord.history_records.remote(seen)):
            console.on_round(RoundRecord.from_dict(h))
        summary_path = run_dir / "summary.json"
        if status != "finished:completed" or not summary_path.exists():
            tail = (run_dir / "serverapp.log").read_text()[-3000:] if (run_dir / "serverapp.log").exists() else ""
            raise RuntimeError(f"the run ended {status}; the ServerApp's log ({run_dir / 'serverapp.log'}):\n{tail}")
        return json.loads(summary_path.read_text())
    finally:
        if proxy is not None:
            proxy.stop()
        if link.poll() is None:
            os.killpg(link.pid, signal.SIGTERM)  # the SuperLink and the SuperExec it started (its session)
            try:
                link.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(link.pid, signal.SIGKILL)
        link_log.close()
        if ray.is_initialized():
            ray.shutdown()


# ---- enroll -----------------------------------------------------------------------------------------------
def _deployment(state: Path) -> tuple[Path, dict]:
    info = state / "deploy.json"
    if not info.exists():
        raise ConfigError("--runs-root", f"no deployment at {state}: start `fedlora serve` first (enrolling talks to "
                                         "its SuperLink)")
    return Path(json.loads(info.read_text())["flwr_home"]), json.loads(info.read_text())


def enroll(state: Path, public_key: Path, name: str, bits: int = 32) -> dict:
    """Register ``public_key`` as device ``name`` (its client id) of bitwidth ``bits``."""
    import re

    from fedlora.aggregation.quant import check_bits
    from fedlora.pki import check_public_key

    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", name):
        raise ConfigError("--name", f"{name!r}: 1-128 of letters, digits, '_', '.', '-'")
    try:
        check_bits(bits, key="--bits")
        check_public_key(public_key)
    except ValueError as e:
        raise ConfigError("--bits" if "bits" in str(e) else "public key", str(e)) from None
    enrolled = read_enrollments(state)
    if name in enrolled and not enrolled[name].get("revoked"):
        raise ConfigError("--name", f"{name!r} is enrolled already (revoke it first: fedlora enroll --revoke {name})")
    home, _ = _deployment(state)
    out = flwr(home, "supernode", "register", str(public_key), CONNECTION, "--name", name)
    enrolled[name] = {"node_id": int(out["node-id"]), "bits": int(bits), "public_key": check_public_key(public_key),
                      "enrolled": time.time()}
    atomic_write_json(state / "enrollments.json", enrolled)
    return enrolled[name]


def revoke(state: Path, name: str) -> dict:
    enrolled = read_enrollments(state)
    if name not in enrolled:
        raise ConfigError("--revoke", f"{name!r} is not enrolled (enrolled: {sorted(enrolled)})")
    home, _ = _deployment(state)
    flwr(home, "supernode", "unregister", str(enrolled[name]["node_id"]), CONNECTION)
    enrolled[name]["revoked"] = time.time()
    atomic_write_json(state / "enrollments.json", enrolled)
    return enrolled[name]


def list_enrolled(state: Path) -> dict:
    enrolled = read_enrollments(state)
    try:
        home, _ = _deployment(state)
        online = set(_online(home, enrolled))
    except (ConfigError, RuntimeError):
        online = set()
    return {n: {**e, "online": n in online} for n, e in enrolled.items()}
