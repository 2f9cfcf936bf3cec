"""Client-owned state on disk, keyed by client identity: held global adapter, personal tensors, privacy ledger.

Flower's deployment runs a fresh ClientApp process per round and a coordinator may restart, so nothing a
client must remember may live only in memory. Every write is atomic (``fedlora.atomic_io``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from fedlora.aggregation.base import Tensors
from fedlora.atomic_io import atomic_torch_save, atomic_write_json

_SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class ClientStore:
    """One client's persistent state under ``root/<client_id>/``."""

    def __init__(self, root: str | os.PathLike, client_id: str) -> None:
        if not _SAFE.match(client_id):
            raise ValueError(f"client id {client_id!r} must match {_SAFE.pattern}")
        self.client_id = client_id
        self.dir = Path(root) / client_id

    # held global adapter (what the client synced to last) and the aggregation round it belongs to
    def load_held(self) -> tuple[Tensors | None, int | None]:
        p = self.dir / "held.pt"
        if not p.exists():
            return None, None
        obj = torch.load(p, weights_only=True)
        return obj["tensors"], obj["round"]

    def save_held(self, tensors: Tensors, rnd: int) -> None:
        atomic_torch_save(self.dir / "held.pt", {"tensors": tensors, "round": int(rnd)})

    # personal tensors: trained here, never uploaded (FedSA's B and head)
    def load_personal(self) -> Tensors:
        p = self.dir / "personal.pt"
        return torch.load(p, weights_only=True) if p.exists() else {}

    def save_personal(self, tensors: Tensors) -> None:
        atomic_torch_save(self.dir / "personal.pt", tensors)

    def load_ledger(self) -> dict | None:
        p = self.dir / "ledger.json"
        return json.loads(p.read_text()) if p.exists() else None

    def save_ledger(self, state: dict) -> None:
        atomic_write_json(self.dir / "ledger.json", state)
