"""Linear probe: only the classification head trains (on the frozen encoder's features) and is averaged. The bar a
LoRA strategy must clear under DP: the same features, the same privacy budget, no adapter."""

from __future__ import annotations

from fedlora.aggregation.base import HEAD, ClientUpdate, Strategy, Tensors, apply_mean_delta, register


@register("probe")
class LinearProbe(Strategy):
    """FedAvg of the head; every LoRA factor stays at its (B = 0) initialisation, so the model is the frozen
    encoder plus a trained head."""

    trains = (HEAD,)
    shares = (HEAD,)

    def aggregate(self, global_state: Tensors, updates: list[ClientUpdate]) -> Tensors:
        return apply_mean_delta(self, global_state, updates)
