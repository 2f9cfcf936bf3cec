"""The task's model: LoRA placement and the config group's checks."""

from __future__ import annotations

import pytest

from fedlora.schema import ConfigError
from fedlora.task.model import ModelSpec, adapter_state, build_model


def test_lora_layers_adapts_only_the_named_layers():
    model = build_model(ModelSpec(name_or_path="tiny-bert", lora_layers=(1,)), num_labels=2, seed=0)
    keys = list(adapter_state(model))
    lora = [k for k in keys if "lora_" in k]
    assert lora and all(".layer.1." in k for k in lora)
    assert len(lora) == 4  # query and value of layer 1, A and B each
    with pytest.raises(ValueError, match=r"lora_layers=\[2\].*layers 0\.\.1"):
        build_model(ModelSpec(name_or_path="tiny-bert", lora_layers=(2,)), num_labels=2, seed=0)


def test_model_spec_refuses_bad_values_with_the_key():
    for kw, key in ((dict(lora_r=0), "model.lora_r"), (dict(target_modules="query"), "model.target_modules"),
                    (dict(lora_dropout=1.0), "model.lora_dropout"), (dict(lora_layers=(1, -2)), "model.lora_layers")):
        with pytest.raises(ConfigError) as e:
            ModelSpec(**kw)
        assert e.value.key == key
    assert ModelSpec(target_modules=["query"], lora_layers=[0]).target_modules == ("query",)
