"""Device placement: the settings (`clients.device`, `clients.gpus`, `runtime.device`), what `auto` resolves to,
refusals before any work, and training/evaluation on an explicit device. This machine has no GPU: CUDA paths are
exercised by `bench/gpu.py` on one."""

from __future__ import annotations

import pytest
import torch

from fedlora.clients import worker
from fedlora.clients.site import DeviceSite
from fedlora.federation import client_spec
from fedlora.lifecycle import check_devices, prepare, simulated_site, write_shared_token
from fedlora.schema import ConfigError
from fedlora.task.model import resolve_device
from tests.conftest import TINY, config

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the CPU-only behaviour of this box")


def test_auto_is_cpu_here_and_cuda_only_for_a_client_that_holds_a_gpu(monkeypatch):
    assert resolve_device("auto", key="k") == torch.device("cpu")
    assert resolve_device("cpu", key="k") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", key="k", gpu_held=True) == torch.device("cuda")
    assert resolve_device("auto", key="k", gpu_held=False) == torch.device("cpu")  # gpus=0: no GPU reserved


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_an_explicit_cuda_device_without_a_gpu_is_refused_naming_the_key(name):
    with pytest.raises(ConfigError, match=r"clients\.device.*no CUDA GPU"):
        resolve_device(name, key="clients.device")


@pytest.mark.parametrize("overrides,key", [
    (["clients.device=gpu"], "clients.device"),
    (["clients.device=cuda:x"], "clients.device"),
    (["runtime.device=tpu"], "runtime.device"),
    (["clients.gpus=-1"], "clients.gpus"),
    (["clients.gpus=0.5", "clients.device=cpu"], "clients.gpus"),
])
def test_bad_device_settings_fail_at_config_time(overrides, key):
    with pytest.raises(ConfigError) as e:
        config(*TINY, *overrides)
    assert e.value.key == key


@pytest.mark.parametrize("overrides,key", [
    (["clients.gpus=0.25"], "clients.gpus"),
    (["clients.device=cuda"], "clients.device"),
    (["runtime.device=cuda:1"], "runtime.device"),
])
def test_gpu_requests_this_machine_cannot_meet_fail_before_ray(overrides, key):
    with pytest.raises(ConfigError) as e:
        check_devices(config(*TINY, *overrides))
    assert e.value.key == key
    check_devices(config(*TINY, "runtime=ray_cluster", "runtime.address=auto", *overrides))  # the cluster's GPUs


def test_clients_train_and_evaluate_on_the_explicit_device(tmp_path):
    cfg = config(*TINY, f"runs_root={tmp_path}", "clients.device=cpu", "runtime.device=cpu")
    spec = client_spec(cfg, prepare(cfg))
    assert spec.device == "cpu" and spec.gpus == 0.0
    site = simulated_site(cfg, tmp_path / "run")
    ctx = worker.context(spec, site, 0)
    assert {p.device for p in ctx.model.parameters()} == {torch.device("cpu")}
    assert worker.client_device(spec, site) == torch.device("cpu")


def test_auto_uses_a_gpu_a_simulated_client_reserved_or_a_real_device_has(tmp_path, monkeypatch):
    cfg = config(*TINY, f"runs_root={tmp_path}")
    spec = client_spec(cfg, prepare(cfg))
    sim = simulated_site(cfg, tmp_path / "run")
    device = DeviceSite(client="d", data_path=str(tmp_path / "d.csv"), state_root=str(tmp_path / "d"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert worker.client_device(spec, sim) == torch.device("cpu")  # clients.gpus=0: its actor holds no GPU
    assert worker.client_device(spec, device) == torch.device("cuda")
    reserved = client_spec(config(*TINY, f"runs_root={tmp_path}", "clients.gpus=0.5"), prepare(cfg))
    assert worker.client_device(reserved, sim) == torch.device("cuda")


def test_a_node_without_the_runs_storage_refuses_to_touch_client_state(tmp_path):
    cfg = config(*TINY, f"runs_root={tmp_path}")
    run = tmp_path / "run"
    site = simulated_site(cfg, run, write_shared_token(run / "clients"))
    site.check_shared()  # this process sees the token
    (run / "clients" / site.shared_token).unlink()  # as a node with its own local disk would see it
    with pytest.raises(RuntimeError, match="runs_root.*every node mounts"):
        site.check_shared()
