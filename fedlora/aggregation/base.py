"""The contract every aggregation strategy implements: pure tensor maths on named adapter tensors.

No Flower, Ray or MLflow here. A strategy has two halves that live in one class:

* server half: ``init_global`` / ``aggregate`` / ``downlink`` / ``state_dict`` / ``load_state_dict``;
* client half: ``client_sync`` (rebuild the global adapter from what the client held plus the downlink
  payload) and the declarations ``trains`` / ``shares`` that decide which parameters a client trains and
  which travel.

Names are PEFT state-dict keys of the adapter, e.g.
``base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight``; a key's *kind* is
``lora_A``, ``lora_B`` or ``head`` (everything else that is trainable, e.g. the classifier).

Uploads are always **deltas**: a client sends ``X_k - X_sent`` for every key it shares, where ``X_sent``
is the global value it started the round from. ``aggregate`` receives those deltas.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

Tensors = dict[str, torch.Tensor]

LORA_A = "lora_A"
LORA_B = "lora_B"
HEAD = "head"
KINDS = (LORA_A, LORA_B, HEAD)
#: how client updates are weighted: by example counts, or equally
WEIGHTINGS = ("examples", "uniform")


def kind_of(key: str) -> str:
    """Return ``lora_A``, ``lora_B`` or ``head`` for an adapter state-dict key."""
    if ".lora_A." in key or key.endswith(".lora_A"):
        return LORA_A
    if ".lora_B." in key or key.endswith(".lora_B"):
        return LORA_B
    return HEAD


def layer_of(key: str) -> str:
    """The adapted module a LoRA key belongs to (the part before ``.lora_A`` / ``.lora_B``)."""
    for marker in (".lora_A", ".lora_B"):
        if marker in key:
            return key.split(marker, 1)[0]
    raise ValueError(f"{key!r} is not a LoRA key (no .lora_A / .lora_B in it)")


def lora_pairs(state: Tensors) -> dict[str, tuple[str, str]]:
    """Map each adapted module to its (A key, B key) pair, in a stable (sorted) order."""
    a_keys = {layer_of(k): k for k in state if kind_of(k) == LORA_A}
    b_keys = {layer_of(k): k for k in state if kind_of(k) == LORA_B}
    if set(a_keys) != set(b_keys):
        missing = sorted(set(a_keys) ^ set(b_keys))
        raise ValueError(f"LoRA state has unpaired A/B factors for modules: {missing}")
    return {layer: (a_keys[layer], b_keys[layer]) for layer in sorted(a_keys)}


@dataclass
class ClientUpdate:
    """One client's upload for one round (already validated by the coordinator)."""

    client_id: str
    deltas: Tensors
    num_examples: int
    meta: dict[str, Any] = field(default_factory=dict)


class Strategy(ABC):
    """Base class of every aggregation strategy; subclasses register with ``@register("name")``."""

    name: ClassVar[str] = ""
    #: kinds the client trains (the rest of the adapter is frozen on the client)
    trains: ClassVar[tuple[str, ...]] = ()
    #: kinds that travel (down as global state, up as deltas); trained-but-not-shared kinds are personal
    shares: ClassVar[tuple[str, ...]] = ()
    #: whether a meaningful single global model exists (False for personalised strategies)
    has_global_model: ClassVar[bool] = True
    #: whether ``reference_global`` builds a labelled reference model from the clients' personal states
    has_reference_global: ClassVar[bool] = False

    def __init__(self, *, train_head: bool = True, weighting: str = "examples", **params: Any) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"strategy.weighting={weighting!r}: allowed values are {list(WEIGHTINGS)}")
        if params:
            raise ValueError(f"strategy {self.name!r} got unknown parameters: {sorted(params)}")
        self.train_head = train_head
        self.weighting = weighting
        #: figures of the last ``aggregate`` call (numbers and strings), tracked per round
        self.last_stats: dict[str, Any] = {}

    # ---- what trains, what travels -------------------------------------------------------------
    def trains_key(self, key: str) -> bool:
        k = kind_of(key)
        if k == HEAD:
            return self.train_head and HEAD in self.trains
        return k in self.trains

    def shares_key(self, key: str) -> bool:
        k = kind_of(key)
        if k == HEAD:
            return self.train_head and HEAD in self.shares
        return k in self.shares

    def personal_key(self, key: str) -> bool:
        return self.trains_key(key) and not self.shares_key(key)

    @property
    def trains_lora(self) -> bool:
        """Whether clients train any LoRA factor (False: only the head, so the whole encoder is a frozen map)."""
        return LORA_A in self.trains or LORA_B in self.trains

    # ---- server half ---------------------------------------------------------------------------
    def init_global(self, initial: Tensors) -> Tensors:
        """Global state for round 1 from the freshly initialised adapter (PEFT init, seeded).

        Default: keep the shared keys and every frozen LoRA factor the clients need.
        """
        return {k: v.detach().clone() for k, v in initial.items() if self.shares_key(k) or not self.trains_key(k)}

    def weights(self, updates: list[ClientUpdate]) -> torch.Tensor:
        """p_k: data-size weights (default) or uniform; sums to 1."""
        if not updates:
            raise ValueError("cannot aggregate zero updates")
        if self.weighting == "uniform":
            w = torch.ones(len(updates), dtype=torch.float64)
        else:
            w = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
            if (w <= 0).any():
                raise ValueError("every update needs num_examples > 0 for data-size weighting")
        return w / w.sum()

    @abstractmethod
    def aggregate(self, global_state: Tensors, updates: list[ClientUpdate]) -> Tensors:
        """New global state from the current one and the round's (validated) client deltas."""

    def downlink(self, global_state: Tensors, client_round: int | None) -> tuple[Tensors, dict[str, Any]]:
        """What a client that last synced after round ``client_round`` (None: never) must receive.

        Returns (tensors, meta). Default: the whole global state.
        """
        return dict(global_state), {}

    def client_sync(self, held: Tensors | None, payload: Tensors, meta: dict[str, Any]) -> Tensors:
        """Client half: rebuild the full global state from what the client held and the payload."""
        out = dict(held or {})
        out.update(payload)
        return out

    def reference_global(
        self, global_state: Tensors, personal_states: list[Tensors], weights: list[float] | None = None
    ) -> Tensors:
        """Personalised strategies: a labelled reference global model from the clients' personal states."""
        raise NotImplementedError(f"strategy {self.name!r} has no reference global model")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no state but got keys {sorted(state)}")


def weighted_sum(updates: list[ClientUpdate], weights: torch.Tensor, key: str) -> torch.Tensor:
    """Σ_k p_k Δ_k for one key, accumulated in float64 and cast back to the update dtype."""
    first = updates[0].deltas[key]
    acc = torch.zeros(first.shape, dtype=torch.float64)
    for w, u in zip(weights.tolist(), updates):
        acc += w * u.deltas[key].to(torch.float64)
    return acc.to(first.dtype)


_REGISTRY: dict[str, type[Strategy]] = {}


def register(name: str):
    """Class decorator: register a strategy under ``name`` (refuses duplicates)."""

    def deco(cls: type[Strategy]) -> type[Strategy]:
        if name in _REGISTRY:
            raise ValueError(f"strategy {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


def get_class(name: str) -> type[Strategy]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}: allowed values are {available()}")
    return _REGISTRY[name]


def create(name: str, **params: Any) -> Strategy:
    """Instantiate a registered strategy by name."""
    return get_class(name)(**params)


def apply_mean_delta(strategy: Strategy, global_state: Tensors, updates: list[ClientUpdate]) -> Tensors:
    """X ← X + Σ p_k ΔX_k for every shared key (p_k: ``strategy.weights``); unshared keys pass through.

    Accumulates in fp64 (each Δ widened exactly, scaled, added in client order: the same operations per element
    as ``weighted_sum``), with two reused fp64 buffers per shape (small enough to stay in cache) instead of
    fresh tensors per client and key."""
    p = strategy.weights(updates).tolist()
    out = dict(global_state)
    bufs: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
    for key in global_state:
        if not strategy.shares_key(key):
            continue
        first = updates[0].deltas[key]
        shape = tuple(first.shape)
        if shape not in bufs:
            bufs[shape] = (torch.empty(shape, dtype=torch.float64), torch.empty(shape, dtype=torch.float64))
        acc, tmp = bufs[shape]
        acc.zero_()
        for w, u in zip(p, updates):
            tmp.copy_(u.deltas[key])  # exact widening, as .to(float64)
            tmp.mul_(w)
            acc.add_(tmp)
        out[key] = global_state[key] + acc.to(first.dtype)
    return out
