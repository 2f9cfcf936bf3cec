"""Flower's ServerApp as a thin shell: the coordinator decides, Flower's grid carries the messages."""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from fedlora import wire
from fedlora.coordinator.observers import RoundObserver
from fedlora.coordinator.records import Downlink
from fedlora.coordinator.rounds import local_view, run_rounds

log = logging.getLogger("fedlora.server")

KINDS = {"train": MessageType.TRAIN, "evaluate": MessageType.EVALUATE}


class GridTransport:
    """The round loop's transport over a Flower grid (simulation or deployment)."""

    def __init__(self, grid: Grid, *, num_nodes: int, timeout_s: float) -> None:
        self.grid = grid
        self.num_nodes = num_nodes
        self.timeout_s = timeout_s

    def _wait_for_nodes(self) -> list[int]:
        t0 = time.monotonic()
        while True:
            ids = list(self.grid.get_node_ids())
            if len(ids) >= self.num_nodes or time.monotonic() - t0 > self.timeout_s:
                return ids
            time.sleep(0.5)

    def handshake(self, spec: str) -> dict[int, dict]:
        node_ids = self._wait_for_nodes()
        if not node_ids:
            raise RuntimeError(f"no client node connected within {self.timeout_s:.0f}s")
        hello = [Message(content=wire.request(spec), dst_node_id=nid, message_type=MessageType.QUERY)
                 for nid in node_ids]
        hellos = {}
        for r in self.grid.send_and_receive(hello, timeout=self.timeout_s):
            if r.has_error():
                log.warning("node %s failed the handshake: %s", r.metadata.src_node_id, r.error.reason)
                continue
            hellos[r.metadata.src_node_id] = dict(r.content.config_records["info"])
        return hellos

    def exchange(self, kind: str, spec: str, messages: list[Downlink]) -> list[dict]:
        msgs = [Message(content=wire.request(spec, m.meta, m.tensors), dst_node_id=m.node_id,
                        message_type=KINDS[kind]) for m in messages]
        return [wire.read_reply(r) for r in self.grid.send_and_receive(msgs, timeout=self.timeout_s)]


def make_server_app(coord: Any, *, num_nodes: int, timeout_s: float, outcome: dict,
                    observers: list[RoundObserver] = ()) -> ServerApp:
    """A ServerApp bound to a coordinator (actor handle or object). ``outcome`` receives the summary or error."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            transport = GridTransport(grid, num_nodes=num_nodes, timeout_s=timeout_s)
            outcome["summary"] = run_rounds(coord, transport, observers)
        except BaseException as e:  # reported by the caller after Flower shuts down
            outcome["error"] = e
            try:
                local_view(coord).finish("FAILED")
            except Exception:  # pragma: no cover - best effort
                log.exception("could not close the run after the failure")
            raise

    return app
