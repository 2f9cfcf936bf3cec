"""The MLflow store: runs that start together on a fresh store do not race on its schema migration."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.federation

CHILD = """
import sys
from fedlora.coordinator.tracking import mlflow_client
c = mlflow_client(sys.argv[1])
c.create_experiment(sys.argv[2])
print("ok")
"""


def test_concurrent_starts_on_a_fresh_sqlite_store_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, uri, f"exp-{i}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    from mlflow.tracking import MlflowClient

    names = {e.name for e in MlflowClient(tracking_uri=uri).search_experiments()}
    assert {f"exp-{i}" for i in range(4)} <= names
