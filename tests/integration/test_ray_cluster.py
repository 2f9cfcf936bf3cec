"""A real two-node Ray cluster on this machine: `ray start --head` and a second `ray start --address ...` with its
own resources, both started and stopped by this test by PID (never `ray stop`: it ends every Ray instance on the
machine). The same DP federation runs three ways — embedded (its own local Ray), attached to the cluster
(`runtime=ray_cluster runtime.address=...`) and submitted as a Ray Job (`ray job submit -- fedlora run ...`) — and
must give the same rounds, ledgers and adapter; on the cluster the client actors must run on both nodes and the
coordinator on the driver's node (`placement.json`)."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import stop_group

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
FED = ["model=tiny_bert", "data.max_examples=400", "clients.num=4", "clients.per_round=4", "rounds=2",
       "clients.local_steps=2", "clients.batch_size=16", "clients.sample_rate=null", "model.max_length=32",
       "strategy.optimizer=adam", "strategy.lr=0.01", "privacy=dp", "privacy.epsilon=50",
       "privacy.noise=seeded-insecure", "tracking=none", "clients.cpus=1"]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_node(args: list[str], log: Path) -> subprocess.Popen:
    """One `ray start --block` node in its own session: SIGTERM to its group stops exactly this node."""
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus",
                             "1", "--object-store-memory", str(200 * 2**20), *args],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, env=ENV)


def _alive_nodes(address: str) -> int:
    r = subprocess.run([sys.executable, "-c", "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR');"
                        "print(sum(n['Alive'] for n in ray.nodes()))", address],
                       capture_output=True, text=True, timeout=120, env=ENV)
    return int(r.stdout.strip() or 0) if r.returncode == 0 else 0


@pytest.fixture(scope="module")
def cluster():
    tmp = Path(tempfile.mkdtemp(prefix="fl-ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    gcs, dash = _port(), _port()
    base = random.Random().randrange(20000, 30000, 200)
    head = _ray_node(["--head", "--port", str(gcs), "--temp-dir", str(tmp / "ray"), "--include-dashboard", "true",
                      "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                      "--dashboard-agent-listen-port", str(_port()),
                      "--min-worker-port", str(base), "--max-worker-port", str(base + 99)], tmp / "head.log")
    nodes = [head]
    try:
        address = f"127.0.0.1:{gcs}"
        t0 = time.monotonic()
        while _alive_nodes(address) < 1:
            assert head.poll() is None and time.monotonic() - t0 < 180, (tmp / "head.log").read_text()[-3000:]
            time.sleep(2)
        nodes.append(_ray_node(["--address", address, "--resources", '{"second_node": 1}',
                                "--dashboard-agent-listen-port", str(_port()),
                                "--min-worker-port", str(base + 100), "--max-worker-port", str(base + 199)],
                               tmp / "worker.log"))
        while _alive_nodes(address) < 2:
            assert nodes[1].poll() is None and time.monotonic() - t0 < 240, (tmp / "worker.log").read_text()[-3000:]
            time.sleep(2)
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dash}", "tmp": tmp}
    finally:
        for p in reversed(nodes):
            stop_group(p, grace_s=60)


def _fedlora(run_dir: Path, *extra: str, job: str | None = None) -> subprocess.CompletedProcess:
    args = ["run", *FED, f"runs_root={run_dir.parent}", f"hydra.run.dir={run_dir}", *extra]
    if job is None:
        cmd = [sys.executable, "-m", "fedlora.cli", *args]
    else:  # the job's driver runs on the head node, with RAY_ADDRESS pointing at the cluster
        cmd = [str(BIN / "ray"), "job", "submit", "--address", job, "--", str(BIN / "fedlora"), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _result(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    keep = ("round", "global_accuracy", "global_loss", "epsilon_per_client", "bytes_up", "bytes_down", "reported",
            "client_loss_mean")
    return {"history": [{k: h[k] for k in keep} for h in s["history"]],
            "adapter": (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()}


def test_cluster_and_job_runs_equal_the_embedded_run_with_clients_on_both_nodes(cluster):
    runs = cluster["tmp"] / "runs"
    _fedlora(runs / "embedded", "runtime.num_cpus=2")
    attached = _fedlora(runs / "attached", "runtime=ray_cluster", f"runtime.address={cluster['address']}")
    job = _fedlora(runs / "job", "runtime=ray_cluster", "runtime.address=auto", job=cluster["dashboard"])

    embedded = _result(runs / "embedded")
    assert len(embedded["history"]) == 2 and embedded["history"][-1]["reported"] == 4
    assert all(v > 0 for v in embedded["history"][-1]["epsilon_per_client"].values())
    for name, out in (("attached", attached), ("job", job)):
        got = _result(runs / name)
        assert got["history"] == embedded["history"], name
        assert got["adapter"] == embedded["adapter"], name
        placement = json.loads((runs / name / "placement.json").read_text())
        assert len(placement["cluster_nodes"]) == 2
        assert set(placement["client_actor_nodes"]) == set(placement["cluster_nodes"]), placement  # both nodes
        assert placement["coordinator_node"] == placement["driver_node"], placement
        assert "client actors on 2 of 2 Ray nodes" in out.stdout + out.stderr
    assert "succeeded" in job.stdout + job.stderr
    embedded_placement = json.loads((runs / "embedded" / "placement.json").read_text())
    assert len(embedded_placement["cluster_nodes"]) == 1  # its own Ray, not the cluster's


def test_a_parallel_sweep_on_the_cluster_splits_it_between_its_points(cluster):
    """`fedlora run -m ... hydra/launcher=joblib` attached to the cluster: two federations at once, each sized to
    its share of the cluster's two client slots (Flower alone would give each both, one of them pending: a message
    handed to it waits for the other federation to end, until the round times out)."""
    sweep = cluster["tmp"] / "sweep"
    cmd = [sys.executable, "-m", "fedlora.cli", "run", "-m", *FED, "runtime=ray_cluster",
           f"runtime.address={cluster['address']}", f"runs_root={sweep}", f"hydra.sweep.dir={sweep}",
           "round_timeout_s=120", "strategy=ffa,fedsvd", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    points = sorted(p.parent for p in sweep.glob("*/summary.json"))
    assert [p.name.split("-")[1] for p in points] == ["ffa", "fedsvd"]
    for p in points:
        s = json.loads((p / "summary.json").read_text())
        assert [h["reported"] for h in s["history"]] == [4, 4], p  # every client, every round: nothing timed out
        assert sum(json.loads((p / "placement.json").read_text())["client_actor_nodes"].values()) == 1, p
        assert "1 client actor(s) for this federation (its share of the cluster's 2 with 2 federations at once)" \
            in (p / "fedlora.log").read_text(), p
