"""The Flower ClientApp: the same code runs in simulation (Ray actors) and on a real SuperNode.

Messages (all content in a RecordDict):
* ``query``    — content ``config`` {spec}; reply ``info`` {client_id, n_train, bits, held_version}.
* ``train``    — content ``config`` {spec, meta}, ``global`` (downlink tensors); reply ``update`` (deltas of
  the shared keys, bit-packed for low-bit clients), ``metrics``, ``info``.
* ``evaluate`` — like train without training; reply ``metrics`` (personalised accuracy on the local split).

``spec`` is the resolved federation config as JSON. The client's identity: node_config ``client-id`` when
set (real devices), else ``client-<partition-id>``. Its state directory: node_config ``state-dir`` when set,
else ``spec.state_root`` (the run directory's ``clients/`` in simulation).
"""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _setup(msg: Message, context: Context):
    from fedlora.clients import worker
    from fedlora.clients.state import ClientStore

    cfg_rec = msg.content["config"]
    cfg = json.loads(str(cfg_rec["spec"]))
    meta = json.loads(str(cfg_rec["meta"])) if "meta" in cfg_rec else {}
    node = context.node_config
    index = int(node.get("partition-id", node.get("client-index", -1)))
    if index < 0:
        raise ValueError("node_config needs 'partition-id' (simulation) or 'client-index' (device)")
    ctx = worker.context(cfg, index, node.get("client-id"))
    store = ClientStore(node.get("state-dir", cfg["state_root"]), ctx.client_id)
    return worker, ctx, store, meta


@app.query()
def query(msg: Message, context: Context) -> Message:
    worker, ctx, store, _ = _setup(msg, context)
    return Message(RecordDict({"info": ConfigRecord(worker.hello(ctx, store))}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    worker, ctx, store, meta = _setup(msg, context)
    payload = worker.from_records(msg.content.array_records.get("global"))
    upload, metrics, info = worker.train(ctx, store, payload, meta)
    content = RecordDict(
        {"update": worker.to_records(upload), "metrics": MetricRecord(metrics), "info": ConfigRecord(info)}
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    worker, ctx, store, meta = _setup(msg, context)
    payload = worker.from_records(msg.content.array_records.get("global"))
    metrics = worker.evaluate(ctx, store, payload, meta)
    return Message(
        RecordDict({"metrics": MetricRecord(metrics), "info": ConfigRecord({"client_id": ctx.client_id})}),
        reply_to=msg,
    )
