"""The frozen-prefix activation cache: when LoRA lives only in layers >= k (``model.lora_layers``), the embeddings
and layers < k are a fixed map applied record by record, so their output is computed once per record and every
training step and evaluation starts from it.

DP-neutral: the cached map is data-independent (public pretrained weights, eval mode, no dropout) and applied to
each record alone, so DP-SGD on (cache → trainable suffix) is DP-SGD on the same per-record inputs; per-sample
gradients are those of the full model with dropout off in the frozen layers (``tests/task/test_cache.py``).

A cache entry holds one client's (or the server's test split's) records, keyed by a digest of the frozen
prefix's weights, k, and every record's token ids (so model, data, tokenizer, max_length and k are all in the
key: change any and the entry is rebuilt, never reused). Entries live on disk (a simulated client's under the
runs root, a device's in its state folder, so a fresh ClientApp process per message finds them) and in a
per-process memory LRU bounded by ``FEDLORA_CACHE_MAX_MB`` (default 4096).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from fedlora.atomic_io import atomic_torch_save
from fedlora.task.model import classify, model_device

_MEMORY: OrderedDict[str, list[torch.Tensor]] = OrderedDict()


def cache_start(spec, model, *, trains_lora: bool) -> int:
    """How many bottom layers are a frozen map to cache (0: no cache): below the lowest LoRA layer, or — when
    only the head trains (a linear probe) — the whole encoder."""
    if not spec.cache:
        return 0
    if not trains_lora:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return int(base.config.num_hidden_layers)
    return spec.frozen_prefix


def _encoder(model):
    """The BERT encoder under a PEFT sequence classifier (the cache is built for BERT-family models)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    enc = getattr(base, "bert", None)
    if enc is None or not hasattr(enc, "encoder") or not hasattr(enc, "_create_attention_masks"):
        raise ValueError(f"model.cache: the frozen-prefix cache is built for BERT-family encoders, not "
                         f"{type(base).__name__}; set model.cache=false")
    return base, enc


def _mask(enc, hidden: torch.Tensor, attention_mask: torch.Tensor):
    return enc._create_attention_masks(attention_mask=attention_mask, encoder_attention_mask=None,
                                       embedding_output=hidden, encoder_hidden_states=None, past_key_values=None)[0]


def prefix_digest(model, start: int) -> str:
    """A digest of the frozen prefix's weights (embeddings and layers < ``start``), cached per model object."""
    digests = model.__dict__.setdefault("_fedlora_prefix_digests", {})
    if start not in digests:
        _, enc = _encoder(model)
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{type(enc).__name__}:{start}".encode())
        modules = [("embeddings", enc.embeddings)] + [(f"layer.{i}", enc.encoder.layer[i]) for i in range(start)]
        for name, m in modules:
            for pname, p in sorted(m.state_dict().items()):
                h.update(f"{name}.{pname}".encode())
                h.update(p.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
        digests[start] = h.hexdigest()
    return digests[start]


@torch.inference_mode()
def run_prefix(model, start: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden states entering layer ``start`` (embeddings, then layers < ``start``), in eval mode."""
    _, enc = _encoder(model)
    hidden = enc.embeddings(input_ids=input_ids)
    mask = _mask(enc, hidden, attention_mask)
    for layer in enc.encoder.layer[:start]:
        hidden = layer(hidden, mask, None, encoder_attention_mask=None, past_key_values=None)
    return hidden


class CachedSuffix(nn.Module):
    """The model from layer ``start`` on (LoRA layers, pooling, head), fed cached hidden states: the runner for
    training and evaluation on cached records (``hidden`` [B, T, H], ``attention_mask`` [B, T])."""

    def __init__(self, model, start: int, pooling: str) -> None:
        super().__init__()
        self.peft = model
        self.start = start
        self.pooling = pooling

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        base, enc = _encoder(self.peft)
        mask = _mask(enc, hidden, attention_mask)
        for layer in enc.encoder.layer[self.start:]:
            hidden = layer(hidden, mask, None, encoder_attention_mask=None, past_key_values=None)
        return SimpleNamespace(logits=classify(base, hidden, attention_mask, self.pooling))


def _remember(key: str, hidden: list[torch.Tensor]) -> None:
    limit = int(os.environ.get("FEDLORA_CACHE_MAX_MB", "4096")) * 2**20
    _MEMORY[key] = hidden
    _MEMORY.move_to_end(key)
    while len(_MEMORY) > 1 and sum(sum(t.numel() * 4 for t in v) for v in _MEMORY.values()) > limit:
        _MEMORY.popitem(last=False)


def cached_records(model, start: int, records: list[dict], *, cache_dir: str | os.PathLike | None,
                   pad_id: int, batch_size: int = 128) -> list[dict]:
    """``records`` ({"input_ids", "labels"}) as {"hidden": [T, H], "labels"}: from memory, from disk, or computed
    (eval mode, length-sorted batches) and stored."""
    digest = prefix_digest(model, start)
    h = hashlib.blake2b(digest_size=16)
    h.update(digest.encode())
    h.update(model_device(model).type.encode())  # CUDA kernels round differently: entries are per device type
    for r in records:
        h.update(len(r["input_ids"]).to_bytes(4, "little"))
        h.update(torch.as_tensor(r["input_ids"], dtype=torch.int64).numpy().tobytes())
    key = f"{digest}-k{start}-{h.hexdigest()}"
    hidden = _MEMORY.get(key)
    path = Path(cache_dir) / f"{key}.pt" if cache_dir is not None else None
    if hidden is None and path is not None and path.exists():
        blob = torch.load(path, weights_only=True)
        hidden = list(torch.split(blob["hidden"], blob["lengths"].tolist()))
    if hidden is None:
        hidden = _compute(model, start, records, pad_id=pad_id, batch_size=batch_size)
        if path is not None:
            lengths = torch.tensor([t.shape[0] for t in hidden])
            atomic_torch_save(path, {"hidden": torch.cat(hidden) if hidden else torch.zeros(0), "lengths": lengths})
    _remember(key, hidden)
    return [{"hidden": t, "labels": r["labels"]} for t, r in zip(hidden, records)]


def _compute(model, start: int, records: list[dict], *, pad_id: int, batch_size: int) -> list[torch.Tensor]:
    was_training = model.training
    device = model_device(model)
    model.eval()
    out: list[torch.Tensor | None] = [None] * len(records)
    order = sorted(range(len(records)), key=lambda i: len(records[i]["input_ids"]))
    try:
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            n = max(len(records[j]["input_ids"]) for j in idx)
            ids = torch.full((len(idx), n), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), n), dtype=torch.long)
            for row, j in enumerate(idx):
                k = len(records[j]["input_ids"])
                ids[row, :k] = torch.as_tensor(records[j]["input_ids"])
                mask[row, :k] = 1
            hidden = run_prefix(model, start, ids.to(device), mask.to(device)).to("cpu")
            for row, j in enumerate(idx):
                out[j] = hidden[row, : len(records[j]["input_ids"])].clone()  # records stay on CPU
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]
