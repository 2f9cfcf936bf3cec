"""The message format both sides speak: Flower records <-> named tensors and plain dicts.

A request carries ``config`` (a ConfigRecord: ``spec``, the client spec as JSON, and ``meta``, this message's
round/version/sync metadata as JSON) and, for train/evaluate, ``global`` (an ArrayRecord of downlink tensors).
A reply carries ``update`` (ArrayRecord), ``metrics`` (MetricRecord) and ``info`` (ConfigRecord). Every field of
a reply is untrusted input on the server: ``read_reply`` only unpacks it; the coordinator validates it.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

Tensors = dict[str, torch.Tensor]


def to_records(tensors: Tensors) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={k: v.contiguous() for k, v in tensors.items()})


def from_records(rec: ArrayRecord | None) -> Tensors:
    return dict(rec.to_torch_state_dict()) if rec is not None else {}


def request(spec: str, meta: dict[str, Any] | None = None, tensors: Tensors | None = None) -> RecordDict:
    cfg = {"spec": spec} if meta is None else {"spec": spec, "meta": json.dumps(meta)}
    content: dict[str, Any] = {"config": ConfigRecord(cfg)}
    if tensors is not None:
        content["global"] = to_records(tensors)
    return RecordDict(content)


def read_request(content: RecordDict) -> tuple[dict[str, Any], dict[str, Any], Tensors]:
    """(client spec, meta, downlink tensors) of a request."""
    cfg = content["config"]
    meta = json.loads(str(cfg["meta"])) if "meta" in cfg else {}
    return json.loads(str(cfg["spec"])), meta, from_records(content.array_records.get("global"))


def reply(*, info: dict[str, Any], metrics: dict[str, Any] | None = None, update: Tensors | None = None) -> RecordDict:
    content: dict[str, Any] = {"info": ConfigRecord(info)}
    if metrics is not None:
        content["metrics"] = MetricRecord(metrics)
    if update is not None:
        content["update"] = to_records(update)
    return RecordDict(content)


def read_reply(msg: Message) -> dict[str, Any]:
    """A reply message as ``{"node_id", "error", "update", "metrics", "info"}`` — unvalidated. A reply whose
    records cannot even be unpacked becomes an error entry (it costs that reply, never the round)."""
    node_id = msg.metadata.src_node_id
    if msg.has_error():
        return {"node_id": node_id, "error": f"{msg.error.code}: {msg.error.reason}"}
    c = msg.content
    try:
        return {
            "node_id": node_id,
            "error": None,
            "update": from_records(c.array_records.get("update")),
            "metrics": dict(c.metric_records["metrics"]) if "metrics" in c.metric_records else {},
            "info": dict(c.config_records["info"]) if "info" in c.config_records else {},
        }
    except Exception as e:  # noqa: BLE001 - untrusted bytes: any failure to unpack rejects the reply
        return {"node_id": node_id, "error": f"malformed reply: {type(e).__name__}: {e}"}
