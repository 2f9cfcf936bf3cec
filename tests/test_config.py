"""The typed config: bad overrides fail before any work starts, naming the real key and what is allowed."""

from __future__ import annotations

import pytest

from fedlora.config import FedConfig, check_client_sizes
from fedlora.schema import ConfigError
from tests.conftest import compose, config


def test_default_config_is_valid_and_round_trips():
    cfg = config()
    assert cfg.strategy.name == "fedsvd" and cfg.data.name == "rt_polarity"
    assert config("privacy=dp").privacy.enabled is True
    assert FedConfig.from_dict(cfg.to_dict()) == cfg
    mixed = config("clients.bitwidths={32: 0.5, 4: 0.5}")
    assert mixed.clients.mix == {32: 0.5, 4: 0.5} and mixed.clients.mixed
    assert FedConfig.from_dict(mixed.to_dict()) == mixed  # int keys survive a JSON-like round trip
    assert not cfg.clients.mixed and cfg.clients.mix == {32: 1.0}


@pytest.mark.parametrize(
    "override, key, hint",
    [
        ("rounds=0", "rounds", "> 0"),
        ("rounds=-3", "rounds", "> 0"),
        ("rounds=2.5", "rounds", "an integer"),
        ("clients.per_round=11", "clients.per_round", "<= clients.num"),
        ("clients.min_reports=11", "clients.min_reports", "<= clients.per_round"),
        ("data.alpha=0", "data.alpha", "> 0"),
        ("data.alpha=-1", "data.alpha", "> 0"),
        ("privacy.epsilon=0", "privacy.epsilon", "> 0"),
        ("privacy.delta=0", "privacy.delta", "> 0"),
        ("privacy.clip=-1", "privacy.clip", "> 0"),
        ("privacy.accountant=gdp", "privacy.accountant", "allowed values"),
        ("strategy.weighting=median", "strategy.weighting", "allowed values are ['examples', 'uniform']"),
        ("clients.bitwidths={32: 0.5, 3: 0.5}", "clients.bitwidths", "ladder"),
        ("clients.bitwidths={32: 0.5, 4: 0.6}", "clients.bitwidths", "sum to 1"),
        ("clients.bitwidth_method=fancy", "clients.bitwidth_method", "allowed values"),
        ("data.partitioner=shard", "data.partitioner", "allowed values"),
        ("clients.batch_size=0", "clients.batch_size", ">= 1"),
        ("clients.batch_size=16", "clients.batch_size", "exactly one of clients.batch_size and clients.sample_rate"),
        ("clients.sample_rate=1.5", "clients.sample_rate", "<= 1"),
        ("strategy.lr=0", "strategy.lr", "> 0"),
        ("strategy.optimizer=rmsprop", "strategy.optimizer", "allowed values"),
        ("strategy.train_head=maybe", "strategy.train_head", "true or false"),
        ("privacy.grad_sample_mode=functorch", "privacy.grad_sample_mode", "allowed values"),
        ("+strategy.params.bogus=1", "strategy.params", "unknown parameters"),
        ("strategy.params.svd_every=-1", "strategy.params", "svd_every"),
        ("+model.pooler=mean", "model.pooler", "unknown key"),
        ("model.lora_layers=[]", "model.lora_layers", "non-empty list"),
        ("model.lora_layers=[-1]", "model.lora_layers", "indices >= 0"),
        ("model.lora_layers=top", "model.lora_layers", "e.g. model.lora_layers=[4,5]"),
        ("runtime=ray_cluster runtime.address=null", "runtime.address", "needs an address"),
        ("data=local", "data.path", "needs data.path"),
    ],
)
def test_bad_values_are_refused_with_the_real_key(override, key, hint):
    overrides = override.split(" ") if override.startswith("runtime=") else [override]
    if override.startswith("privacy."):
        overrides = ["privacy=dp", *overrides]
    with pytest.raises(ConfigError) as e:
        FedConfig.from_dict(compose(overrides))
    assert e.value.key == key, str(e.value)
    assert hint in str(e.value)


def test_unknown_strategy_name_lists_allowed():
    d = compose()
    d["strategy"]["name"] = "fedprox"
    with pytest.raises(ConfigError, match=r"strategy.name: got 'fedprox'; allowed values are \[.*'fedavg'.*'ffa'"):
        FedConfig.from_dict(d)


def test_unknown_top_level_key_and_missing_group_are_named():
    d = compose()
    d["roundz"] = 3
    with pytest.raises(ConfigError) as e:
        FedConfig.from_dict(d)
    assert e.value.key == "roundz"
    d = compose()
    del d["clients"]
    with pytest.raises(ConfigError, match="clients: missing config group"):
        FedConfig.from_dict(d)


def test_privacy_checks_against_client_sizes():
    cfg = config("privacy=dp", "privacy.delta=0.03")
    with pytest.raises(ConfigError, match="privacy.delta.*smallest client has n_k=50"):
        check_client_sizes(cfg, [400, 50])
    with pytest.raises(ConfigError) as e:
        check_client_sizes(config("privacy=dp", "clients.batch_size=64", "clients.sample_rate=null"), [400, 50])
    assert e.value.key == "clients.batch_size"
    check_client_sizes(config("privacy=dp"), [400, 500])


def test_config_error_survives_pickling_with_its_key():
    """Sweeps run points in worker processes: the error must cross the process boundary intact."""
    import pickle

    e = pickle.loads(pickle.dumps(ConfigError("clients.batch_size", "exceeds the client's n=14 records")))
    assert isinstance(e, ConfigError) and e.key == "clients.batch_size"
    assert str(e) == "clients.batch_size: exceeds the client's n=14 records"
