"""Flower's ServerApp as a thin shell: the coordinator actor decides, Flower carries the messages."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlora.clients import worker

log = logging.getLogger("fedlora.server")


def _call(coord, method: str, *args):
    """Call a coordinator method whether it is a Ray actor handle or a plain object (tests)."""
    fn = getattr(coord, method)
    if hasattr(fn, "remote"):
        import ray

        return ray.get(fn.remote(*args))
    return fn(*args)


def _messages(grid: Grid, plans: list[dict], spec: str, message_type: str) -> list[Message]:
    msgs = []
    for p in plans:
        content = RecordDict({"config": ConfigRecord({"spec": spec, "meta": p["meta"]}), "global": worker.to_records(p["tensors"])})
        msgs.append(Message(content=content, dst_node_id=p["node_id"], message_type=message_type))
    return msgs


def _reply(msg: Message) -> dict:
    node_id = msg.metadata.src_node_id
    if msg.has_error():
        return {"node_id": node_id, "error": f"{msg.error.code}: {msg.error.reason}"}
    c = msg.content
    out: dict[str, Any] = {"node_id": node_id, "error": None}
    out["update"] = worker.from_records(c.array_records.get("update"))
    out["metrics"] = dict(c.metric_records["metrics"]) if "metrics" in c.metric_records else {}
    out["info"] = dict(c.config_records["info"]) if "info" in c.config_records else {}
    return out


def wait_for_nodes(grid: Grid, n: int, timeout_s: float) -> list[int]:
    t0 = time.monotonic()
    while True:
        ids = list(grid.get_node_ids())
        if len(ids) >= n or time.monotonic() - t0 > timeout_s:
            return ids
        time.sleep(0.5)


def run_rounds(grid: Grid, coord, *, num_nodes: int, timeout_s: float, echo: Callable[[str], None] = print) -> dict:
    """The whole federation: handshake, then plan → send/receive → finish, until the coordinator is done."""
    spec = _call(coord, "spec")
    node_ids = wait_for_nodes(grid, num_nodes, timeout_s)
    if not node_ids:
        raise RuntimeError(f"no client node connected within {timeout_s:.0f}s")
    hello = [
        Message(content=RecordDict({"config": ConfigRecord({"spec": spec})}), dst_node_id=nid, message_type=MessageType.QUERY)
        for nid in node_ids
    ]
    hellos = {}
    for r in grid.send_and_receive(hello, timeout=timeout_s):
        if r.has_error():
            log.warning("node %s failed the handshake: %s", r.metadata.src_node_id, r.error.reason)
            continue
        hellos[r.metadata.src_node_id] = dict(r.content.config_records["info"])
    if not hellos:
        raise RuntimeError("every client node failed the handshake; see the client logs above")
    _call(coord, "register", hellos)
    echo(f"{len(hellos)} clients ready")
    while True:
        plans = _call(coord, "plan_round")
        if not plans:
            break
        replies = [_reply(m) for m in grid.send_and_receive(_messages(grid, plans, spec, MessageType.TRAIN), timeout=timeout_s)]
        nxt = _call(coord, "finish_round", replies)
        if nxt["evaluate_clients"]:
            eplans = _call(coord, "plan_evaluate")
            ereplies = [_reply(m) for m in grid.send_and_receive(_messages(grid, eplans, spec, MessageType.EVALUATE), timeout=timeout_s)]
            _call(coord, "finish_evaluate", ereplies)
        echo(_call(coord, "end_round"))
    return _call(coord, "finish")


def make_server_app(coord, *, num_nodes: int, timeout_s: float, outcome: dict) -> ServerApp:
    """A ServerApp bound to a coordinator (actor handle or object). ``outcome`` receives the summary or error."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["summary"] = run_rounds(grid, coord, num_nodes=num_nodes, timeout_s=timeout_s)
        except BaseException as e:  # reported by the caller after Flower shuts down
            outcome["error"] = e
            try:
                _call(coord, "finish", "FAILED")
            except Exception:  # pragma: no cover - best effort
                log.exception("could not close the run after the failure")
            raise

    return app
