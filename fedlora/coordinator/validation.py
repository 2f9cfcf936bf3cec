"""Every field of a client's reply is untrusted input: ``parse_reply`` checks all of it — types, ranges,
finiteness, the update's keys, shapes, dtypes and norm — before anything reads it, and a violation rejects that
reply (with a short reason for the logs and a metric), never the round."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.aggregation.base import Tensors
from fedlora.aggregation.quant import decode_tensors, payload_bytes


class UpdateRejected(ValueError):
    """A client reply failed validation; ``reason`` is short and goes to logs and metrics."""

    def __init__(self, client_id: str, reason: str) -> None:
        super().__init__(f"update from {client_id} rejected: {reason}")
        self.client_id = client_id
        self.reason = reason


#: the ledger summary a client reports (``worker.ledger_summary``): key -> (type, minimum)
LEDGER_FIELDS = {"epsilon": (float, 0.0), "steps": (int, 0), "participations": (int, 0),
                 "target_epsilon": (float, 0.0), "delta": (float, 0.0), "noise_multiplier": (float, 0.0),
                 "sample_rate": (float, 0.0)}
LEDGER_TEXT = ("accountant", "noise")
MAX_REPLY_TEXT = 4096


@dataclass
class Reply:
    """A validated train reply. ``update`` is None for a declined round."""

    client_id: str
    num_examples: int
    loss: float
    client_s: float
    ledger: dict[str, Any] | None
    can_run_next: bool | None
    declined: str
    update: Tensors | None
    update_norm: float
    bytes_up: int
    handler_s: float | None = None


def _number(cid: str, name: str, v: Any, *, integer: bool = False, lo: float | None = None,
            hi: float | None = None, allow_nan: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UpdateRejected(cid, f"{name}={v!r:.80}: not a number")
    if integer and (not isinstance(v, int) and not (isinstance(v, float) and v.is_integer())):
        raise UpdateRejected(cid, f"{name}={v!r}: not an integer")
    if math.isnan(v):
        if allow_nan:
            return float("nan")
        raise UpdateRejected(cid, f"{name} is NaN")
    if math.isinf(v):
        raise UpdateRejected(cid, f"{name}={v}: not finite")
    if lo is not None and v < lo or hi is not None and v > hi:
        raise UpdateRejected(cid, f"{name}={v}: outside [{lo}, {hi}]")
    return int(v) if integer else float(v)


def _text(cid: str, name: str, v: Any) -> str:
    if not isinstance(v, str) or len(v) > MAX_REPLY_TEXT:
        raise UpdateRejected(cid, f"{name}: not a string of at most {MAX_REPLY_TEXT} characters")
    return v


def _ledger(cid: str, raw: Any) -> dict[str, Any]:
    try:
        d = json.loads(_text(cid, "info.ledger", raw))
    except ValueError:
        raise UpdateRejected(cid, "info.ledger: not JSON") from None
    if not isinstance(d, dict):
        raise UpdateRejected(cid, "info.ledger: not a JSON object")
    out: dict[str, Any] = {}
    for key, (kind, lo) in LEDGER_FIELDS.items():
        if key not in d:
            raise UpdateRejected(cid, f"info.ledger: missing {key!r}")
        out[key] = _number(cid, f"info.ledger.{key}", d[key], integer=kind is int, lo=lo)
    for key in LEDGER_TEXT:
        out[key] = _text(cid, f"info.ledger.{key}", d.get(key, ""))
    return out


def validate_update(
    client_id: str,
    deltas: Tensors,
    expected: dict[str, torch.Size],
    *,
    max_norm: float,
) -> float:
    """Raise ``UpdateRejected`` unless ``deltas`` has exactly the expected keys, shapes, a float32 dtype,
    finite values and a global L2 norm ≤ ``max_norm``; return the norm."""
    if not isinstance(deltas, dict):
        raise UpdateRejected(client_id, "update: not a mapping of tensors")
    missing = sorted(set(expected) - set(deltas))
    extra = sorted(map(str, set(deltas) - set(expected)))
    if missing or extra:
        raise UpdateRejected(client_id, f"wrong keys (missing {missing[:3]}, unexpected {extra[:3]})")
    sq = 0.0
    for key, shape in expected.items():
        t = deltas[key]
        if not isinstance(t, torch.Tensor):
            raise UpdateRejected(client_id, f"{key}: not a tensor")
        if t.dtype != torch.float32:
            raise UpdateRejected(client_id, f"{key}: dtype {t.dtype}, expected torch.float32")
        if tuple(t.shape) != tuple(shape):
            raise UpdateRejected(client_id, f"{key}: shape {tuple(t.shape)}, expected {tuple(shape)}")
        if not torch.isfinite(t).all():
            raise UpdateRejected(client_id, f"{key}: non-finite values")
        sq += float(t.double().pow(2).sum())
    norm = math.sqrt(sq)
    if not norm <= max_norm:
        raise UpdateRejected(client_id, f"update norm {norm:.4g} exceeds clients.max_update_norm={max_norm:g}")
    return norm


def parse_reply(raw: Any, *, client_id: str, declared_examples: int, bits: int, expected: dict[str, torch.Size],
                max_norm: float, dp: bool) -> Reply:
    """The validated train reply of ``client_id`` (to whom the coordinator sent a ``bits``-bit downlink and who
    declared ``declared_examples`` training records at the handshake), or ``UpdateRejected``."""
    cid = client_id
    if not isinstance(raw, dict):
        raise UpdateRejected(cid, "reply: not a mapping")
    info, metrics = raw.get("info"), raw.get("metrics")
    if not isinstance(info, dict) or not isinstance(metrics, dict):
        raise UpdateRejected(cid, "reply: info and metrics must be mappings")
    claimed = info.get("client_id", cid)
    if claimed != cid:
        raise UpdateRejected(cid, f"info.client_id={claimed!r:.80}: the reply claims another client")
    if info.get("bits", bits) != bits or isinstance(info.get("bits", bits), bool):
        raise UpdateRejected(cid, f"info.bits={info.get('bits')!r:.40}: the client was sent {bits}-bit payloads")
    declined = _text(cid, "info.declined", info.get("declined", ""))
    ledger = _ledger(cid, info["ledger"]) if info.get("ledger") not in (None, "") else None
    if dp and ledger is None:
        raise UpdateRejected(cid, "info.ledger: a DP client must report its ledger")
    can_run = info.get("can_run_next")
    if can_run is not None:
        can_run = bool(_number(cid, "info.can_run_next", can_run, integer=True, lo=0, hi=1))
    n = _number(cid, "metrics.num_examples", metrics.get("num_examples"), integer=True, lo=1,
                hi=max(1, declared_examples))
    loss = _number(cid, "metrics.loss", metrics.get("loss", float("nan")), lo=0, allow_nan=True)
    client_s = _number(cid, "metrics.client_s", metrics.get("client_s", 0.0), lo=0)
    handler_s = metrics.get("handler_s")
    if handler_s is not None:
        handler_s = _number(cid, "metrics.handler_s", handler_s, lo=0)
    up = raw.get("update", {})
    if declined:
        return Reply(cid, n, loss, client_s, ledger, can_run, declined, None, 0.0, 0, handler_s)
    if not isinstance(up, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in up.items()):
        raise UpdateRejected(cid, "update: not a mapping of named tensors")
    nbytes = payload_bytes(up)
    if bits != 32:
        try:
            up = decode_tensors(up, bits, dict(expected))
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            raise UpdateRejected(cid, f"malformed {bits}-bit payload: {str(e)[:200]}") from None
    norm = validate_update(cid, up, expected, max_norm=max_norm)
    return Reply(cid, n, loss, client_s, ledger, can_run, "", up, norm, nbytes, handler_s)


def parse_eval_reply(raw: Any, *, client_id: str, declared_examples: int) -> tuple[float, int]:
    """(accuracy, examples) of a validated personalised-evaluation reply."""
    metrics = raw.get("metrics") if isinstance(raw, dict) else None
    if not isinstance(metrics, dict):
        raise UpdateRejected(client_id, "reply: metrics must be a mapping")
    acc = _number(client_id, "metrics.accuracy", metrics.get("accuracy"), lo=0, hi=1)
    n = _number(client_id, "metrics.num_examples", metrics.get("num_examples"), integer=True, lo=1,
                hi=max(1, declared_examples))
    return acc, n


def parse_hello(raw: Any) -> dict[str, Any]:
    """A validated handshake reply: a client id (letters, digits, ``_.-``), its partition index, its data sizes,
    the version it says it holds and its ledger's step count (None when not told)."""
    import re

    if not isinstance(raw, dict):
        raise UpdateRejected("?", "hello: not a mapping")
    cid = raw.get("client_id")
    if not isinstance(cid, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", cid):
        raise UpdateRejected(str(cid)[:40], "hello: client_id must be 1-128 of [A-Za-z0-9_.-]")
    out: dict[str, Any] = {"client_id": cid}
    for key, lo, default in (("index", -1, -1), ("n_train", 1, None), ("n_val", 0, 0), ("held_version", -1, -1)):
        out[key] = _number(cid, f"hello.{key}", raw.get(key, default), integer=True, lo=lo)
    # None: not told (a simulated client registered from its partition, never messaged): the ledger floor the
    # coordinator sends with every train message makes the client itself refuse a ledger that went backwards
    steps = raw.get("ledger_steps")
    out["ledger_steps"] = None if steps is None else _number(cid, "hello.ledger_steps", steps, integer=True, lo=-1)
    if "enrolled_bits" in raw:  # set by the server from the enrollment record, never by the device
        from fedlora.aggregation.quant import check_bits

        try:
            out["enrolled_bits"] = check_bits(raw["enrolled_bits"], key="enrolled bits")
        except ValueError as e:
            raise UpdateRejected(cid, str(e)) from None
    return out
