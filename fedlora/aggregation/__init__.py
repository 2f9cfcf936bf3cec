"""Server-side aggregation strategies: pure maths on named adapter tensors, registered by name."""

from fedlora.aggregation import fedavg, fedsa, fedsvd, ffa  # noqa: F401  (registration)
from fedlora.aggregation.base import (
    ClientUpdate,
    Strategy,
    Tensors,
    available,
    create,
    get_class,
    kind_of,
    layer_of,
    lora_pairs,
    register,
)

__all__ = [
    "ClientUpdate",
    "Strategy",
    "Tensors",
    "available",
    "create",
    "get_class",
    "kind_of",
    "layer_of",
    "lora_pairs",
    "register",
]
