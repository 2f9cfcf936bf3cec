"""The deployment files: the Kubernetes manifests' core kinds pass the Kubernetes schemas (kubernetes-validate,
strict), the compose file passes the compose spec (check-jsonschema), and both expose only the Fleet API port.
Not checked here (no container daemon on these machines): building the image, running the stacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S_VERSION = "1.30"  # a current Kubernetes; the manifests use GA kinds only


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("name", ["coordinator.yaml", "device.yaml"])
def test_kubernetes_manifests_validate_strictly(name):
    docs = _docs(DEPLOY / "k8s" / name)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any schema error


def test_the_coordinator_exposes_only_the_fleet_port():
    docs = {d["kind"]: d for d in _docs(DEPLOY / "k8s" / "coordinator.yaml")}
    assert [p["port"] for p in docs["Service"]["spec"]["ports"]] == [9092]
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert [p["containerPort"] for c in pod["containers"] for p in c["ports"]] == [9092]
    assert [p["port"] for rule in docs["NetworkPolicy"]["spec"]["ingress"] for p in rule["ports"]] == [9092]
    assert docs["Deployment"]["spec"]["replicas"] == 1


def test_the_device_keeps_its_key_in_a_secret_and_its_data_on_its_own_volume():
    docs = _docs(DEPLOY / "k8s" / "device.yaml")
    dep = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in dep["volumes"]}
    assert "secret" in vols["key"] and vols["data"]["persistentVolumeClaim"]["readOnly"]
    pvcs = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    claims = {vols[v]["persistentVolumeClaim"]["claimName"] for v in ("data", "state")}
    assert len(claims) == 2 and claims <= pvcs


def test_the_raycluster_resource_parses_with_the_fields_kuberay_requires():
    (doc,) = _docs(DEPLOY / "k8s" / "raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert "headGroupSpec" in doc["spec"] and doc["spec"]["workerGroupSpecs"]


def test_compose_file_passes_the_compose_spec_and_publishes_only_the_fleet_port():
    r = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                        str(DEPLOY / "compose.yaml")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    assert {n for n, s in services.items() if s.get("ports")} == {"coordinator"}
    assert services["coordinator"]["ports"] == ["9092:9092"]
    devices = [s for n, s in services.items() if n.startswith("device-")]
    assert len(devices) == 3
    data = [next(v for v in s["volumes"] if v.endswith(":/data:ro")) for s in devices]
    assert len(set(data)) == 3  # separate data volumes


def test_the_image_installs_from_the_lock():
    """Every pip install in the image uses the lock (or installs the data packages with --no-deps)."""
    import re

    installs = re.findall(r"pip install ([^\\&\n]*)", (DEPLOY / "Dockerfile").read_text())
    assert installs and all("-c constraints.txt" in i or "--no-deps" in i for i in installs), installs
