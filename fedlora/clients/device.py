"""``fedlora client``: a real device joins a federation as an authenticated Flower SuperNode.

The device keeps everything of its own: its key pair (``--init-key``: ECDSA P-384, OpenSSH, 0600), its data file
(read where it lies, never sent), and its state folder (held global adapter, personal factors, privacy ledger,
the activation cache). A long-lived worker in this process holds the model and the tokenised data; the SuperNode
it starts hands it every message through ``clients.deployed`` (a thin ClientApp), so a round costs a Flower
process start, not a model load.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import zlib
from multiprocessing.connection import Listener
from pathlib import Path

import numpy as np
import torch

from fedlora.clients import worker
from fedlora.clients.site import DeviceSite
from fedlora.clients.state import ClientStore
from fedlora.env import OFFLINE_ENV
from fedlora.federation import ClientSpec
from fedlora.pki import make_node_key
from fedlora.schema import ConfigError

log = logging.getLogger("fedlora.device")


def _to_torch(arrays: dict) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def _to_numpy(tensors: dict) -> dict:
    return {k: v.detach().cpu().contiguous().numpy() for k, v in tensors.items()}


class DeviceWorker:
    """Serves the deployed ClientApp's requests on a Unix socket in the state folder (one at a time: a SuperNode
    has one message in flight), authenticated with a random key only this device's user can read."""

    def __init__(self, site: DeviceSite) -> None:
        self.site = site
        self.dir = Path(site.state_root)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket_path = self.dir / "worker.sock"
        key_path = self.dir / "worker.key"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        self.authkey = key_path.read_bytes()
        if self.socket_path.exists():
            self.socket_path.unlink()
        self.listener = Listener(str(self.socket_path), family="AF_UNIX", authkey=self.authkey)
        os.chmod(self.socket_path, 0o600)
        self.index = zlib.crc32(site.client.encode()) % 100_000  # seeds the device's local shuffling

    def handle(self, req: dict) -> dict:
        spec = ClientSpec.from_dict(json.loads(req["spec"]))
        ctx = worker.context(spec, self.site, self.index, client_id=self.site.client)
        store = ClientStore(self.site.state_root, ctx.client_id)
        kind, meta, payload = req["kind"], req.get("meta", {}), _to_torch(req.get("payload", {}))
        if kind == "query":
            return {"info": worker.hello(ctx, store)}
        if kind == "train":
            upload, metrics, info = worker.train(ctx, store, payload, meta)
            return {"info": info, "metrics": metrics, "update": _to_numpy(upload)}
        if kind == "evaluate":
            return {"info": {"client_id": ctx.client_id}, "metrics": worker.evaluate(ctx, store, payload, meta)}
        return {"error": f"unknown message kind {kind!r}"}

    def serve(self) -> None:
        while True:
            try:
                conn = self.listener.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    req = conn.recv()
                    reply = self.handle(req)
                except ConfigError as e:  # this device's data or settings: say it plainly, no traceback
                    log.error("%s", e)
                    reply = {"error": f"ConfigError: {e}"}
                except Exception as e:  # noqa: BLE001 - the error travels back as this message's error reply
                    log.exception("message failed")
                    reply = {"error": f"{type(e).__name__}: {e}"}
                try:
                    conn.send(reply)
                except OSError:
                    pass

    def start(self) -> DeviceWorker:
        threading.Thread(target=self.serve, name="fedlora-device-worker", daemon=True).start()
        return self

    def close(self) -> None:
        self.listener.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def supernode_command(*, server: str, ca: Path, key: Path, node_config: dict, port: int) -> list[str]:
    cfg = " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items())
    exe = Path(sys.executable).parent / "flower-supernode"
    return [str(exe) if exe.exists() else "flower-supernode", "--superlink", server, "--root-certificates", str(ca),
            "--auth-supernode-private-key", str(key), "--node-config", cfg, "--port", str(port)]


ACTIVATION_REFUSED = "Failed to activate SuperNode"


def _stop_children(pids: set[int]) -> None:
    """End what the SuperNode started (its SuperExec runs on, retrying a dead port, after a failed start)."""
    import psutil

    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            p.terminate()
            procs.append(p)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def _follow(proc: subprocess.Popen) -> tuple[int, bool]:
    """Pass the SuperNode's log through until the SuperNode itself exits; returns (exit code, activation refused).
    The pipe stays open while its children live, so the log is read on a thread and the process is polled; the
    children it started are remembered and ended with it. (The SuperNode stays in this process's group: stopping
    the device's group stops everything of the device.)"""
    import queue

    import psutil

    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    refused, children = False, set()
    while True:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            line = ""
        if line is None:
            break
        if line:
            sys.stdout.write(line)
            sys.stdout.flush()
            refused = refused or ACTIVATION_REFUSED in line
        if proc.poll() is not None:
            break
        try:
            children |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        except psutil.Error:
            pass
    rc = proc.wait()
    _stop_children(children)
    return rc, refused


def run_device(*, name: str, server: str, ca: Path, data: Path, state_dir: Path, key: Path | None = None,
               text_column: str = "text", label_column: str = "label", val_fraction: float = 0.1,
               retry_s: float = 180.0, echo=print) -> int:
    """Join the federation at ``server`` as ``name`` until the SuperNode exits; returns its exit code.

    A device that restarts right after a crash finds the SuperLink still holding its previous session (until that
    session's heartbeat lapses, about a minute) and is refused activation; so is a key that is not enrolled or was
    revoked — Flower gives both the same answer (code 2004). The SuperNode is started again with backoff for up to
    ``retry_s`` seconds, then the device gives up, saying why."""
    state_dir = state_dir.resolve()
    key = (key or state_dir / "node.key").resolve()
    if not key.exists():
        raise FileNotFoundError(f"{key}: no device key; make one with `fedlora client --init-key --state-dir "
                                f"{state_dir}` and enroll its .pub")
    site = DeviceSite(client=name, data_path=str(data.resolve()), state_root=str(state_dir),
                      text_column=text_column, label_column=label_column, val_fraction=val_fraction,
                      cache_dir=str(state_dir / "cache"))
    dev = DeviceWorker(site).start()
    home = state_dir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(home),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = supernode_command(server=server, ca=ca.resolve(), key=key, port=_free_port(),
                            node_config={"worker": str(dev.socket_path), "state-dir": str(state_dir)})
    echo(f"device {name}: joining {server} (data {data}, state {state_dir})")
    t0 = time.monotonic()
    attempt = 0
    try:
        while True:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            rc, refused = _follow(proc)
            if not refused or time.monotonic() - t0 >= retry_s:
                if refused:
                    echo(f"device {name}: the coordinator refused activation for {retry_s:.0f}s: this key is not "
                         "enrolled, was revoked, or its previous session is still held; check with the operator "
                         "(fedlora enroll --list)")
                return rc if rc else (1 if refused else 0)
            attempt += 1
            wait = min(5.0 * 2 ** (attempt - 1), 30.0)
            echo(f"device {name}: activation refused (attempt {attempt}); retrying in {wait:.0f}s")
            time.sleep(wait)
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()
    finally:
        dev.close()


def init_key(state_dir: Path, key: Path | None = None) -> Path:
    """Make (or keep) the device's key pair; returns the public key to send to the coordinator's operator."""
    return make_node_key((key or state_dir / "node.key").resolve())
