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


RETRIES = 3  # re-sends of a message that never reached a live actor
RETRY_MIN_S = 5.0  # not when less of the round is left
PULL_S = 0.1  # how often replies are pulled (Flower's send_and_receive pulls as often)


def _transient(reply: dict) -> bool:
    """The engine could not hand the message to the client (its Ray actor was restarting): nothing ran or what ran
    released nothing, so sending it again is safe (a second privacy charge, if any, only over-counts)."""
    return bool(reply.get("error")) and "ActorUnavailableError" in reply["error"]


class GridTransport:
    """The round loop's transport over a Flower grid (simulation or deployment)."""

    def __init__(self, grid: Grid, *, num_nodes: int, timeout_s: float, connect_timeout_s: float,
                 on_abandon=None, enrolled=None, progress=None, roster=None) -> None:
        """``enrolled``: in deployment, a callable returning {enrolled name: {"bits": b, ...}}: only nodes
        registered under one of those names take part, under that name (simulation: None). ``roster``: in
        simulation, a callable returning {node id: hello} without messaging anyone (the simulated clients'
        partitions are known to the launching process): registration then costs nothing per idle client, and a
        client builds its context only when it is first sampled."""
        self.grid = grid
        self.roster = roster
        self.progress = progress  # progress(kind, done, total, elapsed_s, round) while a round's replies come in
        self.on_abandon = on_abandon
        self.enrolled = enrolled
        self.num_nodes = num_nodes
        self.timeout_s = timeout_s  # a round's messages (round_timeout_s)
        self.connect_timeout_s = connect_timeout_s  # nodes connecting and answering the handshake

    def _wait_for_nodes(self) -> list[int]:
        t0 = time.monotonic()
        while True:
            ids = list(self.grid.get_node_ids())
            if len(ids) >= self.num_nodes or time.monotonic() - t0 > self.connect_timeout_s:
                return ids
            time.sleep(0.5)

    def handshake(self, spec: str) -> dict[int, dict]:
        node_ids = self._wait_for_nodes()
        if not node_ids:
            raise RuntimeError(f"no client node connected within runtime.connect_timeout_s="
                               f"{self.connect_timeout_s:g}s")
        if self.roster is not None:
            known = self.roster()
            if hellos := {nid: known[nid] for nid in node_ids if nid in known}:
                log.info("%d simulated clients registered from their partitions, without a message (each loads "
                         "its data when first sampled)", len(hellos))
                return hellos
            log.warning("the simulation's node -> partition map is unknown: asking every node (a message each)")
        hello = [Message(content=wire.request(spec), dst_node_id=nid, message_type=MessageType.QUERY)
                 for nid in node_ids]
        hellos = {}
        for r in self.grid.send_and_receive(hello, timeout=self.connect_timeout_s):
            if r.has_error():
                log.warning("node %s failed the handshake: %s", r.metadata.src_node_id, r.error.reason)
                continue
            try:
                hellos[r.metadata.src_node_id] = dict(r.content.config_records["info"])
            except Exception as e:  # noqa: BLE001 - a malformed hello costs that node, not the federation
                log.warning("node %s: unreadable handshake reply (%s)", r.metadata.src_node_id, e)
        return self._identify(hellos) if self.enrolled is not None else hellos

    def _identify(self, hellos: dict[int, dict]) -> dict[int, dict]:
        """Keep the enrolled nodes, named by their registration (the identity Flower's node auth proves)."""
        enrolled = self.enrolled()
        names = {n.node_id: n.name for n in self.grid.get_nodes()}
        out = {}
        for nid, h in hellos.items():
            name = names.get(nid, "")
            if name not in enrolled or enrolled[name].get("revoked"):
                log.warning("node %s (registered as %r) is not an enrolled device: left out", nid, name)
                continue
            if h.get("client_id") != name:
                log.warning("node %s is enrolled as %r but claims %r: left out", nid, name, h.get("client_id"))
                continue
            out[nid] = {**h, "client_id": name, "enrolled_bits": int(enrolled[name].get("bits", 32))}
        return out

    def exchange(self, kind: str, spec: str, messages: list[Downlink]) -> list[dict]:
        deadline = time.monotonic() + self.timeout_s
        by_node = {m.node_id: m for m in messages}

        def push(ms: list[Downlink]) -> dict[str, int]:
            out = [Message(content=wire.request(spec, m.meta, m.tensors), dst_node_id=m.node_id,
                           message_type=KINDS[kind]) for m in ms]
            return dict(zip(self.grid.push_messages(out), (m.node_id for m in ms), strict=True))

        waiting = push(messages)  # message id -> node id
        attempts = dict.fromkeys(by_node, 1)
        due: list[tuple[float, int]] = []  # (when, node id): re-sends of messages that met a restarting actor
        replies = []
        while (waiting or due) and time.monotonic() < deadline:
            for r in (self.grid.pull_messages(list(waiting)) if waiting else []):
                waiting.pop(r.metadata.reply_to_message_id, None)
                reply = wire.read_reply(r)
                nid = reply["node_id"]
                if (_transient(reply) and nid in by_node and attempts[nid] <= RETRIES
                        and deadline - time.monotonic() > RETRY_MIN_S):
                    log.warning("re-sending %s to %s: its message met a restarting actor (attempt %d)", kind,
                                by_node[nid].client_id, attempts[nid] + 1)
                    due.append((time.monotonic() + 2.0 ** attempts[nid], nid))
                    attempts[nid] += 1
                else:
                    replies.append(reply)
            now = time.monotonic()
            if self.progress is not None:
                self.progress(kind, len(replies), len(messages), now - (deadline - self.timeout_s),
                              int(messages[0].meta["round"]) if messages else None)
            if ready := [nid for when, nid in due if when <= now]:
                due = [(w, n) for w, n in due if n not in ready]
                waiting.update(push([by_node[n] for n in ready]))
            if waiting or due:
                time.sleep(PULL_S)
        answered = {r["node_id"] for r in replies}
        late = {m.client_id for m in messages if m.node_id not in answered}
        if late and self.on_abandon is not None:  # past the round's timeout: abandoned, never waited for
            self.on_abandon(late)
        return replies


def make_server_app(coord: Any, *, num_nodes: int, timeout_s: float, connect_timeout_s: float, outcome: dict,
                    observers: list[RoundObserver] = (), on_done=lambda: None, on_abandon=None,
                    roster=None) -> ServerApp:
    """A ServerApp bound to a coordinator (actor handle or object). ``outcome`` receives the summary or error;
    ``on_done`` is called when the federation is over, however it ended; ``roster``: ``GridTransport``'s."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            transport = GridTransport(grid, num_nodes=num_nodes, timeout_s=timeout_s,
                                      connect_timeout_s=connect_timeout_s, on_abandon=on_abandon, roster=roster,
                                      progress=lambda *a: [o.on_progress(*a) for o in observers])
            outcome["summary"] = run_rounds(coord, transport, observers)
        except BaseException as e:  # reported by the caller after Flower shuts down
            outcome["error"] = e
            try:
                local_view(coord).finish("FAILED")
            except Exception:  # pragma: no cover - best effort
                log.exception("could not close the run after the failure")
            raise
        finally:
            on_done()

    return app
