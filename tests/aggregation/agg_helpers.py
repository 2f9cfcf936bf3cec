"""Small synthetic adapter states with PEFT key names, and client updates (deltas) on them."""

from __future__ import annotations

import torch

from fedlora.aggregation import ClientUpdate

PREFIX = "base_model.model.bert.encoder.layer"
HEAD_W = "base_model.model.classifier.weight"
HEAD_B = "base_model.model.classifier.bias"


def lora_key(layer: int, module: str, factor: str) -> str:
    return f"{PREFIX}.{layer}.attention.self.{module}.lora_{factor}.weight"


def build_state(
    layers: int = 3, d: int = 12, r: int = 4, seed: int = 0, b_zero: bool = True, odd_d_in: int = 9
) -> dict:
    """query/value LoRA pairs (d × r, r × d) per layer, plus one odd-shaped pair (d × r, r × odd_d_in) so that
    shape grouping is exercised, plus a classifier head. A is Kaiming-like random, B zero (PEFT init)."""
    g = torch.Generator().manual_seed(seed)
    s: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for m in ("query", "value"):
            s[lora_key(i, m, "A")] = torch.randn(r, d, generator=g) / d**0.5
            s[lora_key(i, m, "B")] = torch.zeros(d, r) if b_zero else torch.randn(d, r, generator=g)
    s[lora_key(0, "key", "A")] = torch.randn(r, odd_d_in, generator=g) / odd_d_in**0.5
    s[lora_key(0, "key", "B")] = torch.zeros(d, r) if b_zero else torch.randn(d, r, generator=g)
    s[HEAD_W] = torch.randn(2, d, generator=g) * 0.1
    s[HEAD_B] = torch.zeros(2)
    return s


def build_updates(strategy, global_state: dict, n: int, seed: int, counts=None, scale: float = 0.1) -> list:
    """n client updates with a random delta for every key the strategy shares."""
    g = torch.Generator().manual_seed(seed)
    counts = counts or [10 * (k + 1) for k in range(n)]
    ups = []
    for k in range(n):
        shared = [key for key in global_state if strategy.shares_key(key)]
        deltas = {key: scale * torch.randn(global_state[key].shape, generator=g) for key in shared}
        ups.append(ClientUpdate(f"c{k}", deltas, counts[k]))
    return ups
