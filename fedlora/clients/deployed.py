"""The ClientApp a real device's SuperNode runs (``[tool.flwr.app.components] clientapp``).

A SuperNode starts a fresh ``flwr-clientapp`` process for every message (Flower 1.41 has no long-lived
ClientApp), and importing torch and building the model would cost ~30 s each time. So this module imports only
Flower and NumPy and hands each message to the device's long-lived worker (``fedlora client``, which keeps the
model, the tokenised data and the cache in memory and runs ``clients.worker``) over a local socket in the
device's state folder, authenticated with the key beside it; the reply comes back the same way.
node_config: ``worker`` (the socket), ``state-dir``.
"""

from __future__ import annotations

import json
from multiprocessing.connection import Client
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _ask(context: Context, request: dict) -> dict:
    node = context.node_config
    key = (Path(str(node["state-dir"])) / "worker.key").read_bytes()
    with Client(str(node["worker"]), family="AF_UNIX", authkey=key) as conn:
        conn.send(request)
        reply = conn.recv()
    if reply.get("error"):
        raise RuntimeError(reply["error"])
    return reply


def _forward(kind: str, msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    rec = msg.content.array_records.get("global")
    request = {
        "kind": kind,
        "spec": str(cfg["spec"]),
        "meta": json.loads(str(cfg["meta"])) if "meta" in cfg else {},
        "payload": {k: a.numpy() for k, a in rec.items()} if rec is not None else {},
    }
    reply = _ask(context, request)
    content = {"info": ConfigRecord(reply["info"])}
    if reply.get("metrics") is not None:
        content["metrics"] = MetricRecord(reply["metrics"])
    if reply.get("update") is not None:
        content["update"] = ArrayRecord(array_dict={k: Array(v) for k, v in reply["update"].items()})
    return Message(RecordDict(content), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return _forward("query", msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _forward("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _forward("evaluate", msg, context)
