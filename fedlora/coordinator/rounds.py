"""The round loop, written once: handshake, then plan → send/receive → aggregate → (evaluate) → close, until the
coordinator is done. A transport carries the messages: Flower's grid (``server_app.GridTransport``) for the
product path, direct calls for benchmarks (``lifecycle.InProcessTransport``)."""

from __future__ import annotations

from typing import Any, Protocol

from fedlora.coordinator.observers import RoundObserver
from fedlora.coordinator.records import Downlink


class Transport(Protocol):
    def handshake(self, spec: str) -> dict[int, dict]:
        """Each reachable node's hello (``client_id``, ``index``, ``n_train``, ``n_val``, ``held_version``,
        ``ledger_steps`` — None when the client was registered without being asked)."""

    def exchange(self, kind: str, spec: str, messages: list[Downlink]) -> list[dict]:
        """Send ``messages`` (kind ``train`` or ``evaluate``); the replies that came back in time, each a dict
        with ``node_id``, ``error``, ``update``, ``metrics``, ``info`` (unvalidated)."""


class _ActorProxy:
    """A Ray actor's methods called as the object's: ``proxy.plan_round()`` is ``ray.get(h.plan_round.remote())``."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def __getattr__(self, name: str):
        import ray

        method = getattr(self._handle, name)
        return lambda *a, **kw: ray.get(method.remote(*a, **kw))


def local_view(coord: Any) -> Any:
    """The coordinator as a plain object: itself, or a proxy to its Ray actor."""
    from ray.actor import ActorHandle

    return _ActorProxy(coord) if isinstance(coord, ActorHandle) else coord


def run_rounds(coord: Any, transport: Transport, observers: list[RoundObserver] = ()) -> dict:
    """The whole federation over ``transport``; ``observers`` (driver side, e.g. the console) see every round.
    Returns the coordinator's final summary."""
    coord = local_view(coord)
    spec = coord.spec()
    hellos = transport.handshake(spec)
    if not hellos:
        raise RuntimeError("no client answered the handshake; see the client logs above")
    coord.register(hellos)
    for obs in observers:
        obs.on_start(f"{len(hellos)} clients ready")
    while (plan := coord.plan_round()) is not None:
        replies = transport.exchange("train", spec, plan.messages)
        record = coord.aggregate_round(plan.header(), replies)
        evaluate = coord.plan_evaluate(record)
        eval_replies = transport.exchange("evaluate", spec, evaluate) if evaluate else []
        record = coord.close_round(record, eval_replies)
        for obs in observers:
            obs.on_round(record)
    return coord.finish()
