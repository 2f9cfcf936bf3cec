"""Failpoints: named places where a test (or a chaos run) can make a fedlora process die, as a crash would.

Off unless ``FEDLORA_FAILPOINTS`` is set, e.g. ``FEDLORA_FAILPOINTS="coordinator.checkpointed@2=kill"``: a
comma-separated list of ``point[@round][#client]=action``; ``action`` is ``kill`` (SIGKILL this process: no
cleanup, no flush, exactly a crash), ``exit`` (``os._exit(75)``) or ``raise`` (a ``FailpointError``). The
environment reaches Ray workers (they inherit it from the raylet this process starts), so a point inside a
simulated client or the coordinator actor fires there.
"""

from __future__ import annotations

import os
import signal

ENV = "FEDLORA_FAILPOINTS"


class FailpointError(RuntimeError):
    """Raised by a failpoint whose action is ``raise``."""


def _parse(spec: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, action = item.partition("=")
        out[point.strip()] = action.strip() or "kill"
    return out


def failpoint(name: str, *, round: int | None = None, client: str | None = None) -> None:
    """Fire the failpoint ``name`` if the environment arms it (for this round / client, or for any)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    points = _parse(spec)
    candidates = [name]
    if round is not None:
        candidates.append(f"{name}@{round}")
    if client is not None:
        candidates.append(f"{name}#{client}")
        if round is not None:
            candidates.append(f"{name}@{round}#{client}")
    action = next((points[c] for c in reversed(candidates) if c in points), None)
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "exit":
        os._exit(75)
    raise FailpointError(f"failpoint {name} (round {round}, client {client}) fired")
