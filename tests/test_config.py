"""Bad overrides fail before any work starts, naming the key and what is allowed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedlora.config import ConfigError, validate, validate_against_data
from tests.conftest import compose


def test_default_config_is_valid():
    cfg = compose()
    validate(cfg)
    assert cfg["strategy"]["name"] == "fedsvd"
    assert cfg["privacy"]["enabled"] is False  # README, "What the default run does": why DP is opt-in here
    assert compose(["privacy=dp"])["privacy"]["enabled"] is True
    assert cfg["data"]["name"] == "rt_polarity"


@pytest.mark.parametrize(
    "override, key, hint",
    [
        ("rounds=0", "rounds", "> 0"),
        ("rounds=-3", "rounds", "> 0"),
        ("clients.per_round=11", "clients.per_round", "<= clients.num"),
        ("data.alpha=0", "data.alpha", "> 0"),
        ("data.alpha=-1", "data.alpha", "> 0"),
        ("privacy.epsilon=0", "privacy.epsilon", "> 0"),
        ("privacy.delta=0", "privacy.delta", "> 0"),
        ("privacy.clip=-1", "privacy.clip", "> 0"),
        ("privacy.accountant=gdp", "privacy.accountant", "allowed values"),
        ("strategy.weighting=median", "strategy.params", "allowed values"),
        ("clients.bitwidths={32: 0.5, 3: 0.5}", "clients.bitwidths", "ladder"),
        ("clients.bitwidths={32: 0.5, 4: 0.6}", "clients.bitwidths", "sum to 1"),
        ("data.partitioner=shard", "data.partitioner", "allowed values"),
        ("clients.batch_size=0", "clients.batch_size", ">= 1"),
        ("strategy.lr=0", "strategy.lr", "> 0"),
        ("strategy.optimizer=rmsprop", "strategy.optimizer", "allowed values"),
        ("privacy.grad_sample_mode=functorch", "privacy.grad_sample_mode", "allowed values"),
        ("+strategy.params.bogus=1", "strategy.params", "unknown parameters"),
        ("model.lora_layers=[]", "model.lora_layers", "non-empty list"),
        ("model.lora_layers=[-1]", "model.lora_layers", "indices >= 0"),
        ("model.lora_layers=top", "model.lora_layers", "e.g. model.lora_layers=[4,5]"),
    ],
)
def test_bad_values_are_refused_with_the_key(override, key, hint):
    cfg = compose(["privacy=dp", override] if override.startswith("privacy.") else [override])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert e.value.key == key
    assert hint in str(e.value)


def test_unknown_strategy_name_lists_allowed():
    cfg = compose()
    cfg["strategy"]["name"] = "fedprox"
    with pytest.raises(ConfigError, match=r"allowed values are \[.*'fedavg'.*'ffa'"):
        validate(cfg)


def test_privacy_checks_against_client_sizes():
    cfg = compose(["privacy=dp", "privacy.delta=0.03"])
    validate(cfg)
    with pytest.raises(ConfigError, match="privacy.delta.*smallest client has n_k=50"):
        validate_against_data(cfg, [400, 50])
    cfg = compose(["privacy=dp", "clients.batch_size=64"])
    with pytest.raises(ConfigError, match="clients.batch_size"):
        validate_against_data(cfg, [400, 50])
    validate_against_data(compose(["privacy=dp"]), [400, 500])


def test_cli_refuses_bad_override_before_any_work(tmp_path):
    """The real command: exits 2 with the key named, and starts nothing (no run directory content)."""
    r = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "run", "clients.per_round=50", f"runs_root={tmp_path}"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 2, r.stderr
    assert "clients.per_round" in r.stderr and "clients.num" in r.stderr
    assert not list(tmp_path.rglob("summary.json")) and not list(tmp_path.rglob("config.json"))


def test_cli_help_lists_groups():
    r = subprocess.run([sys.executable, "-m", "fedlora.cli", "run", "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0
    for group in ("strategy:", "privacy:", "data:", "model:", "clients:", "runtime:", "tracking:"):
        assert group in r.stdout
    assert "fedavg" in r.stdout and "rt_polarity" in r.stdout


def test_config_error_survives_pickling_with_its_key():
    """Sweeps run points in worker processes: the error must cross the process boundary intact."""
    import pickle

    e = pickle.loads(pickle.dumps(ConfigError("clients.batch_size", "exceeds the client's n=14 records")))
    assert isinstance(e, ConfigError) and e.key == "clients.batch_size"
    assert str(e) == "clients.batch_size: exceeds the client's n=14 records"
