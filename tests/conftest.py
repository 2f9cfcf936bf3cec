"""Shared fixtures: offline switches, one torch thread, and the real Hydra config tree composed in-process."""

from __future__ import annotations

from fedlora.env import apply_offline_env

apply_offline_env()

import pytest  # noqa: E402
import torch  # noqa: E402

from fedlora.config import FedConfig, compose  # noqa: E402

torch.set_num_threads(1)

#: a federation small enough for tests: tiny BERT, a 600-record slice of rt-polarity, 4 clients
TINY = [
    "model=tiny_bert",
    "data.max_examples=600",
    "clients.num=4",
    "clients.per_round=2",
    "clients.local_steps=3",
    "clients.batch_size=16",
    "clients.sample_rate=null",
    "strategy.optimizer=adam",
    "strategy.lr=0.01",
    "rounds=2",
    "privacy=none",
    "tracking=none",
]


def config(*overrides: str) -> FedConfig:
    """The typed config for ``overrides``, composed exactly as ``fedlora run`` composes it."""
    return FedConfig.from_dict(compose(list(overrides)))


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*extra: str) -> FedConfig:
        return config(*TINY, f"runs_root={tmp_path / 'runs'}", *extra)

    return make


def stop_group(proc, grace_s: float = 30.0) -> None:
    """Stop a child started with ``start_new_session=True`` and everything in its process group: SIGTERM, then
    SIGKILL after ``grace_s`` (never by name: other Ray or Flower instances on the machine are not ours)."""
    import os
    import signal
    import subprocess

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
