"""FedAvg-LoRA (FedIT): clients train A and B; the server averages each factor on its own."""

from __future__ import annotations

from fedlora.aggregation.base import HEAD, LORA_A, LORA_B, ClientUpdate, Strategy, Tensors, register, weighted_sum


def apply_mean_delta(strategy: Strategy, global_state: Tensors, updates: list[ClientUpdate]) -> Tensors:
    """X ← X + Σ p_k ΔX_k for every shared key; unshared keys pass through unchanged."""
    p = strategy.weights(updates)
    out = dict(global_state)
    for key in global_state:
        if strategy.shares_key(key):
            out[key] = global_state[key] + weighted_sum(updates, p, key)
    return out


@register("fedavg")
class FedAvgLoRA(Strategy):
    """Average A and B separately. Inexact: mean(B)·mean(A) ≠ mean(B·A)."""

    trains = (LORA_A, LORA_B, HEAD)
    shares = (LORA_A, LORA_B, HEAD)

    def aggregate(self, global_state: Tensors, updates: list[ClientUpdate]) -> Tensors:
        return apply_mean_delta(self, global_state, updates)
