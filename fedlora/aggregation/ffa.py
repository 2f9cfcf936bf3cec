"""FFA-LoRA: A is drawn once from the seed and frozen everywhere; clients train B; the server averages B."""

from __future__ import annotations

from typing import Any

from fedlora.aggregation.base import HEAD, LORA_B, ClientUpdate, Strategy, Tensors, apply_mean_delta, register


@register("ffa")
class FFALoRA(Strategy):
    """Exact aggregation because A is common: Σ p_k B_k A = (Σ p_k B_k) A."""

    trains = (LORA_B, HEAD)
    shares = (LORA_B, HEAD)

    def aggregate(self, global_state: Tensors, updates: list[ClientUpdate]) -> Tensors:
        return apply_mean_delta(self, global_state, updates)

    def downlink(self, global_state: Tensors, client_round: int | None) -> tuple[Tensors, dict[str, Any]]:
        # A never changes: a client that synced once already holds it.
        if client_round is None:
            return dict(global_state), {}
        return {k: v for k, v in global_state.items() if self.shares_key(k)}, {}
