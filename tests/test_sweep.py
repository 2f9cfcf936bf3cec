"""Parallel sweeps: how many points run at once (from Hydra's launcher config) and each point's share of the
cluster's client actors (Flower's own pool-size rule, on a real Ray instance)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from hydra.types import RunMode
from omegaconf import OmegaConf

from fedlora.cli import concurrent_points
from fedlora.lifecycle import sized_actor_pool


def _hydra(mode: RunMode, **launcher) -> SimpleNamespace:
    """The two fields of ``HydraConfig.get()`` that are read: the run mode and the launcher's config node."""
    return SimpleNamespace(mode=mode, launcher=OmegaConf.create(launcher))


@pytest.mark.parametrize(("mode", "launcher", "points", "want"), [
    ("RUN", {}, 1, 1),                              # a single run
    ("MULTIRUN", {"_target_": "basic"}, 6, 1),      # Hydra's basic launcher: one point after another
    ("MULTIRUN", {"n_jobs": 4}, 6, 4),              # joblib: n_jobs at once
    ("MULTIRUN", {"n_jobs": 4}, 2, 2),              # never more than the sweep has points
    ("MULTIRUN", {"n_jobs": -1}, 1000, None),       # joblib's -1: every CPU of this machine
])
def test_points_at_once_follow_the_launcher(mode, launcher, points, want):
    import joblib

    hc = _hydra(RunMode[mode], **launcher)
    expected = want if want is not None else joblib.effective_n_jobs(-1)
    assert concurrent_points(hc, points) == expected


@pytest.mark.integration
def test_each_federation_gets_its_share_of_the_actors_flower_would_place(caplog):
    import ray
    from flwr.simulation.ray_transport import ray_actor

    fits = ray_actor.pool_size_from_resources
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level=logging.WARNING)
    try:
        one_cpu = {"num_cpus": 1.0, "num_gpus": 0.0}
        assert fits(one_cpu) == 3  # Flower's rule: every CPU of the cluster, one actor each
        got = {}
        for actors, concurrent in [(None, 1), (None, 2), (None, 5), (2, 1), (7, 1), (2, 3)]:
            with caplog.at_level(logging.INFO, logger="fedlora.run"), sized_actor_pool(actors, concurrent):
                got[actors, concurrent] = ray_actor.pool_size_from_resources(one_cpu)
            assert ray_actor.pool_size_from_resources is fits  # Flower's own rule back after the federation
        assert got == {(None, 1): 3, (None, 2): 1, (None, 5): 1, (2, 1): 2, (7, 1): 3, (2, 3): 2}
        assert "clients.actors=7; 7 do not fit" in caplog.text
        assert "its share of the cluster's 3 with 2 federations at once" in caplog.text
    finally:
        ray.shutdown()
