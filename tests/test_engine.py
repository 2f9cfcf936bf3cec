"""How fedlora drives Flower's simulation engine: how many sweep points run at once (from Hydra's launcher config),
each point's share of the cluster's client actors (Flower's own pool-size rule, on a real Ray instance), and the
ClientApp loader shipped with every message."""

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


def test_the_client_app_travels_by_reference_and_is_built_once_per_process(tiny_cfg, tmp_path):
    """What Flower ships to a client actor with every message: a few hundred bytes naming the site, not the
    ClientApp's closures pickled by value; loading it again in the same process gives the same ClientApp."""
    import ray.cloudpickle as cloudpickle
    from flwr.clientapp import ClientApp
    from flwr.server.superlink.fleet.vce import vce_api

    from fedlora.clients.app import SimulationApp
    from fedlora.lifecycle import scalable_simulation, simulated_site, write_shared_token

    cfg = tiny_cfg()
    site = simulated_site(cfg, tmp_path, write_shared_token(tmp_path / "clients"))
    app_fn = SimulationApp(site)
    app = app_fn()
    assert isinstance(app, ClientApp)
    shipped = cloudpickle.dumps(app_fn)
    assert len(shipped) < 2000 and b"make_client_app" not in shipped  # by reference: no code inside
    assert cloudpickle.loads(shipped)() is app
    other = simulated_site(tiny_cfg("seed=1"), tmp_path, site.shared_token)
    assert SimulationApp(other)() is not app  # another federation's clients: another app
    # inside the simulation block Flower's run loop receives this app_fn in place of its own closure
    seen = []
    flower_run_api = vce_api.run_api
    try:
        vce_api.run_api = lambda fn, *a, **k: seen.append(fn)
        with scalable_simulation({}, app_fn):
            vce_api.run_api(lambda: app, "backend", "nodes")
        vce_api.run_api(flower_fn := (lambda: app))
    finally:
        vce_api.run_api = flower_run_api
    assert seen == [app_fn, flower_fn]
