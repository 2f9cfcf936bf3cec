"""Server-side aggregation strategies: pure maths on named adapter tensors, registered by name.

Every module of this package is imported here, so a strategy module dropped into the package registers itself
(``@register("name")``) with no other edit; strategies outside it register when ``strategy.module`` names them.
"""

import importlib
import pkgutil

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

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

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
