"""The typed records one round passes between the coordinator and the round loop."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fedlora.aggregation.base import Tensors


@dataclass
class Downlink:
    """One message to send: to ``node_id``, the tensors and the meta (round, version, sync, bits, kind)."""

    node_id: int
    client_id: str
    meta: dict[str, Any]
    tensors: Tensors
    bytes: int


@dataclass
class Sent:
    """What the coordinator remembers of one downlink while its reply is outstanding."""

    client_id: str
    bits: int
    bytes: int


@dataclass
class RoundPlan:
    """A round in flight: its number, when it started and who was sent what. ``messages`` is only filled on the
    way out (``header()`` drops the tensors before the plan comes back with the replies)."""

    round: int
    t0: float
    sent: dict[int, Sent]
    messages: list[Downlink] = field(default_factory=list)

    def header(self) -> RoundPlan:
        return dataclasses.replace(self, messages=[])


@dataclass
class ClientRow:
    """One accepted client update of a round."""

    loss: float
    client_s: float
    update_norm: float
    #: the client's whole handling of the message (its data and model made ready, training, its state files):
    #: client_s is the training part; None from clients that do not say
    handler_s: float | None = None


#: RoundRecord fields that only exist when they were measured this round (left out of the summary otherwise)
OPTIONAL = (
    "global_accuracy", "global_loss", "global_accuracy_by_bits", "personalized_accuracy",
    "personalized_accuracy_unweighted", "personalized_clients", "reference_global_accuracy",
    "reference_global_loss", "reference_global_label", "strategy_stats",
)


@dataclass
class RoundRecord:
    """Everything measured in one round: counts, bytes, the time split, evaluation, privacy. The summary's
    ``history`` holds ``to_dict()`` of each (without the per-client rows)."""

    round: int
    sampled: int
    reported: int = 0
    failed: int = 0
    dropped: int = 0
    rejected: int = 0
    declined: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    aggregate_s: float = 0.0
    client_compute_s: float = 0.0
    client_loss_mean: float | None = None
    client_loss_min: float | None = None
    client_loss_max: float | None = None
    eval_s: float = 0.0
    round_s: float = 0.0
    overhead_s: float = 0.0
    epsilon_max: float | None = None  # None without DP; the largest ε of every client so far
    #: ε after this round of the clients that answered it with their ledger (not of every client that ever trained:
    #: a round's record stays the size of the round, whatever the fleet); the summary has every client's latest
    epsilon_per_client: dict[str, float] = field(default_factory=dict)
    sampled_clients: list[str] = field(default_factory=list)
    clients: dict[str, ClientRow] = field(default_factory=dict)
    evaluate_clients: bool = False
    t0: float = 0.0
    global_accuracy: float | None = None
    global_loss: float | None = None
    global_accuracy_by_bits: dict[int, float] | None = None
    personalized_accuracy: float | None = None
    personalized_accuracy_unweighted: float | None = None
    personalized_clients: int | None = None
    reference_global_accuracy: float | None = None
    reference_global_loss: float | None = None
    reference_global_label: str | None = None
    strategy_stats: dict[str, Any] | None = None

    def to_dict(self, *, clients: bool = False) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("clients", "evaluate_clients", "t0"):
                continue
            v = getattr(self, f.name)
            if f.name in OPTIONAL and v is None:
                continue
            out[f.name] = v
        if clients:
            out["clients"] = {cid: dataclasses.asdict(c) for cid, c in self.clients.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundRecord:
        d = dict(d)
        rows = {cid: ClientRow(**c) for cid, c in d.pop("clients", {}).items()}
        return cls(**d, clients=rows)
