"""A real deployment on this machine (loopback): `fedlora serve` + enrolled `fedlora client` devices, each with its
own data file, TLS and SuperNode authentication on, two rounds under DP. Refusals (an unenrolled key, a revoked key,
a device without the CA, a device with bad data), the control API behind the fleet port, and a device killed
mid-round that rejoins with its ledger intact."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import stop_group

pytestmark = pytest.mark.integration

FEDLORA = [sys.executable, "-m", "fedlora.cli"]
SERVE = ["model=tiny_bert", "data.max_examples=600", "privacy=dp", "privacy.epsilon=50", "rounds=5", "clients.num=3",
         "clients.per_round=3", "clients.min_reports=1", "clients.local_steps=2", "clients.batch_size=8",
         "clients.sample_rate=null", "strategy.optimizer=adam", "strategy.lr=0.01",
         "tracking=mlflow", "deploy.host=127.0.0.1", "deploy.port=0", "deploy.min_available=3",
         "round_timeout_s=90", "runtime.connect_timeout_s=120"]


def _data(path: Path, labels: tuple[str, str], n: int = 60, seed: int = 0) -> Path:
    import random

    r = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            w.writerow([f"review {i} " + " ".join(r.choice(["good", "bad", "fine", "dull", "great"])
                                                  for _ in range(6)), labels[i % 2]])
    return path


def _start(args, log: Path, env=None) -> subprocess.Popen:
    return subprocess.Popen([*FEDLORA, *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, **(env or {})})


def _wait_for(pattern: str, log: Path, timeout: float, proc: subprocess.Popen | None = None) -> re.Match:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        m = re.search(pattern, log.read_text() if log.exists() else "")
        if m:
            return m
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"{pattern!r} not in {log} within {timeout}s:\n{log.read_text()[-3000:]}")


def _enroll(runs: Path, device: Path, name: str, bits: int = 32) -> None:
    subprocess.run([*FEDLORA, "client", "--init-key", "--state-dir", str(device)], check=True, capture_output=True,
                   timeout=120)
    r = subprocess.run([*FEDLORA, "enroll", str(device / "node.key.pub"), "--name", name, "--bits", str(bits),
                        "--runs-root", str(runs)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    runs = root / "runs"
    serve_log = root / "serve.log"
    serve = _start(["serve", *SERVE, f"runs_root={runs}"], serve_log)
    procs = [serve]
    try:
        port = int(_wait_for(r"fleet API on 127\.0\.0\.1:(\d+)", serve_log, 240, serve).group(1))
        ca = runs / "deploy" / "tls" / "ca.crt"
        devices = {}
        for name, labels, bits in (("dev-a", ("positive", "negative"), 32), ("dev-b", ("negative", "positive"), 8),
                                   ("dev-bad", ("joy", "anger"), 32)):
            d = root / name
            _enroll(runs, d, name, bits)
            devices[name] = (d, _data(root / f"{name}.csv", labels, seed=len(devices)))
        out = {"root": root, "runs": runs, "port": port, "ca": ca, "serve": serve, "serve_log": serve_log,
               "devices": devices}
        # refusals, while the SuperLink runs: an unenrolled key, a revoked key, no CA
        stranger = root / "stranger"
        subprocess.run([*FEDLORA, "client", "--init-key", "--state-dir", str(stranger)], check=True,
                       capture_output=True, timeout=120)
        _enroll(runs, root / "revoked", "dev-revoked")
        r = subprocess.run([*FEDLORA, "enroll", "--revoke", "dev-revoked", "--runs-root", str(runs)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        from fedlora.pki import make_server_tls

        other_ca = make_server_tls(root / "other-tls", [])["ca"]
        refused = {}
        for label, state, ca_file in (("unenrolled", stranger, ca), ("revoked", root / "revoked", ca),
                                      ("wrong CA", devices["dev-a"][0].parent / "wrong-ca-dev", other_ca)):
            if label == "wrong CA":
                subprocess.run([*FEDLORA, "client", "--init-key", "--state-dir", str(state)], check=True,
                               capture_output=True, timeout=120)
            log = root / f"refused-{label.replace(' ', '-')}.log"
            p = _start(["client", "--server", f"127.0.0.1:{port}", "--ca", str(ca_file), "--data",
                        str(devices["dev-a"][1]), "--name", "stranger", "--state-dir", str(state), "--retry-s", "0"],
                       log)
            procs.append(p)
            try:
                refused[label] = p.wait(120)
            except subprocess.TimeoutExpired:
                refused[label] = None
                stop_group(p)
        out["refused"] = refused
        out["control"] = _probe_control(port, ca)
        clients = {}
        for name, (d, data) in devices.items():
            log = root / f"{name}.log"
            clients[name] = _start(["client", "--server", f"127.0.0.1:{port}", "--ca", str(ca), "--data", str(data),
                                    "--name", name, "--state-dir", str(d)], log)
            procs.append(clients[name])
        out["clients"] = clients
        # dev-b is killed mid-round 1 (after its privacy charge for the round), then restarted: it rejoins
        ledger_b = devices["dev-b"][0] / "dev-b" / "ledger.json"
        t0 = time.monotonic()
        while not ledger_b.exists() and time.monotonic() - t0 < 300 and serve.poll() is None:
            time.sleep(0.2)
        assert ledger_b.exists(), serve_log.read_text()[-3000:]
        os.killpg(clients["dev-b"].pid, signal.SIGKILL)
        out["b_charged_before_kill"] = json.loads(ledger_b.read_text())["steps"]
        time.sleep(2)
        d, data = devices["dev-b"]
        clients["dev-b"] = _start(["client", "--server", f"127.0.0.1:{port}", "--ca", str(ca), "--data", str(data),
                                   "--name", "dev-b", "--state-dir", str(d)], root / "dev-b-restarted.log")
        procs.append(clients["dev-b"])
        # it is refused until its crashed session lapses (~1 min), retries, rejoins and trains again
        _wait_for(r"Receiving: train message", root / "dev-b-restarted.log", 400, clients["dev-b"])
        out["serve_rc"] = serve.wait(900)
        yield out
    finally:
        for p in procs:
            stop_group(p)


def test_a_deployed_federation_runs_under_dp_with_the_enrolled_names(deployment):
    d = deployment
    log = d["serve_log"].read_text()
    assert d["serve_rc"] == 0, log[-4000:]
    run_dir = Path(log.strip().splitlines()[-1][len("run dir: "):])
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["rounds_completed"] == 5 and s["global_accuracy"] is not None
    assert set(s["epsilon_per_client"]) == {"dev-a", "dev-b"}  # the enrolled names; dev-bad was left out
    assert all(0 < e <= 50 for e in s["epsilon_per_client"].values())
    assert "round 5/5" in log
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=s["mlflow"]["tracking_uri"])
    hist = client.get_metric_history(s["mlflow"]["run_id"], "clients/sampled")
    assert sorted(m.step for m in hist) == [1, 2, 3, 4, 5]
    assert (run_dir / "adapter" / "adapter_config.json").exists()


def test_refused_devices_fail_clearly_and_the_federation_goes_on(deployment):
    d = deployment
    assert d["refused"]["unenrolled"] not in (None, 0)
    assert d["refused"]["revoked"] not in (None, 0)
    assert d["refused"]["wrong CA"] not in (None, 0)
    bad = (d["root"] / "dev-bad.log").read_text()
    assert "not in the federation's label set" in bad and "joy" in bad


def _probe_control(port: int, ca: Path) -> dict:
    """What the devices' port answers: the Control/Runtime APIs and /docs must not be there; /health must."""
    ctx = ssl.create_default_context(cafile=str(ca))
    out = {}
    for method, path in (("POST", "/v1/control/start-run"), ("POST", "/v1/control/register-supernode"),
                         ("GET", "/docs"), ("POST", "/v1/runtime/acquire-task"), ("GET", "/v1/fleet/get-run"),
                         ("GET", "/health")):
        req = urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=b"" if method == "POST" else None,
                                     method=method)
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
                out[f"{method} {path}"] = r.status
        except urllib.error.HTTPError as e:
            out[f"{method} {path}"] = e.code
    return out


def test_the_control_api_is_not_reachable_through_the_fleet_port(deployment):
    control = deployment["control"]
    assert control.pop("GET /health") == 200
    assert set(control.values()) == {404}, control


def test_a_device_killed_mid_round_rejoins_with_its_privacy_intact(deployment):
    d = deployment
    ledger = json.loads((d["devices"]["dev-b"][0] / "dev-b" / "ledger.json").read_text())
    rounds = [c["round"] for c in ledger["charges"]]
    assert rounds[0] == 1 and len(rounds) >= 2 and rounds[-1] > 1, rounds  # charged in round 1, and again later
    assert ledger["steps"] > d["b_charged_before_kill"] > 0  # its ε continued from where it was, never reset
