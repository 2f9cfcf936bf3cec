"""Shared fixtures: offline switches, one torch thread, and the real Hydra config tree composed in-process."""

from __future__ import annotations

import os

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}.items():
    os.environ.setdefault(_k, _v)

import pytest
import torch

from fedlora.config import compose  # noqa: F401  (tests import it from here)

torch.set_num_threads(1)

#: a federation small enough for tests: tiny BERT, a 600-record slice of rt-polarity, 4 clients
TINY = [
    "model=tiny_bert",
    "data.max_examples=600",
    "clients.num=4",
    "clients.per_round=2",
    "clients.local_steps=3",
    "clients.batch_size=16",
    "rounds=2",
    "privacy=none",
    "tracking=none",
]


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*extra: str) -> dict:
        return compose([*TINY, f"runs_root={tmp_path / 'runs'}", *extra])

    return make
