"""FedAvg-LoRA (FedIT): clients train A and B; the server averages each factor on its own."""

from __future__ import annotations

from fedlora.aggregation.base import HEAD, LORA_A, LORA_B, ClientUpdate, Strategy, Tensors, apply_mean_delta, register


@register("fedavg")
class FedAvgLoRA(Strategy):
    """Average A and B separately. Inexact: mean(B)·mean(A) ≠ mean(B·A)."""

    trains = (LORA_A, LORA_B, HEAD)
    shares = (LORA_A, LORA_B, HEAD)

    def aggregate(self, global_state: Tensors, updates: list[ClientUpdate]) -> Tensors:
        return apply_mean_delta(self, global_state, updates)
