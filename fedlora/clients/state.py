"""Client-owned state on disk, keyed by client identity: held global adapter, personal tensors, privacy ledger,
and the replies of the rounds it trained.

Flower's deployment runs a fresh ClientApp process per round and a coordinator may restart, so nothing a
client must remember may live only in memory. Every write is atomic (``fedlora.atomic_io``); read-modify-write
of the ledger happens under the client's lock, so two processes serving the same client (a straggler that wakes
up after the federation moved on) cannot lose each other's charges.

Fail closed: a client that was ever charged privacy (``identity.json`` says so) and whose ledger is missing or
unreadable refuses to train — its spent budget cannot be reconstructed, and starting again at ε = 0 would make
every ε printed afterwards false.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fedlora.aggregation.base import Tensors
from fedlora.atomic_io import atomic_torch_save, atomic_write_json

_SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
#: how long a process waits for a client's lock before giving up on that message
LOCK_TIMEOUT_S = 60.0


class LedgerUnavailable(RuntimeError):
    """The client's privacy ledger is missing or unreadable although the client has spent privacy before."""


class ClientStore:
    """One client's persistent state under ``root/<client_id>/``."""

    def __init__(self, root: str | os.PathLike, client_id: str) -> None:
        if not _SAFE.match(client_id):
            raise ValueError(f"client id {client_id!r} must match {_SAFE.pattern}")
        self.client_id = client_id
        self.dir = Path(root) / client_id

    @contextlib.contextmanager
    def lock(self, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        """Exclusive lock on this client's state (an flock: released by the kernel if the holder dies)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a+") as f:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{self.client_id}: state lock {self.dir / '.lock'} held by another "
                                           f"process for more than {timeout_s:.0f}s") from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # held global adapter (what the client synced to last) and the aggregation version it belongs to
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

    # the privacy ledger and the marker that this identity has spent privacy
    @property
    def ledger_path(self) -> Path:
        return self.dir / "ledger.json"

    def has_spent_privacy(self) -> bool:
        return (self.dir / "identity.json").exists()

    def load_ledger(self) -> dict | None:
        """The ledger's state, None for a client that never spent privacy; ``LedgerUnavailable`` (naming the file
        and the recovery) when it is missing or unreadable although the client has spent privacy."""
        p = self.ledger_path
        recovery = ("the privacy it spent cannot be reconstructed, so this client refuses to train: restore "
                    f"{p.name} from a backup of {self.dir}, or retire this client identity (a new client id and "
                    "state folder start a new budget)")
        if not p.exists():
            if self.has_spent_privacy():
                raise LedgerUnavailable(f"{self.client_id}: privacy ledger {p} is missing although this client "
                                        f"has spent privacy before ({self.dir / 'identity.json'}); {recovery}")
            return None
        try:
            state = json.loads(p.read_text())
            if not isinstance(state, dict):
                raise ValueError(f"expected a JSON object, got {type(state).__name__}")
            return state
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise LedgerUnavailable(f"{self.client_id}: privacy ledger {p} is unreadable ({type(e).__name__}: "
                                    f"{e}); {recovery}") from None

    def save_ledger(self, state: dict) -> None:
        if not self.has_spent_privacy():
            atomic_write_json(self.dir / "identity.json", {"client_id": self.client_id, "privacy_ledger": True,
                                                           "created": time.time()})
        atomic_write_json(self.ledger_path, state)

    # the newest round this client started (a reply of an older round that finishes later is stale)
    def mark_started(self, rnd: int) -> None:
        if int(rnd) > self.started_round():
            atomic_write_json(self.dir / "progress.json", {"started_round": int(rnd)})

    def started_round(self) -> int:
        p = self.dir / "progress.json"
        return int(json.loads(p.read_text())["started_round"]) if p.exists() else 0

    # the reply of each (round, version) this client trained: replayed, not retrained, if the round is asked again
    def _reply_path(self, rnd: int, version: int) -> Path:
        return self.dir / "replies" / f"round-{int(rnd)}-v{int(version)}.pt"

    def load_reply(self, rnd: int, version: int) -> dict[str, Any] | None:
        p = self._reply_path(rnd, version)
        return torch.load(p, weights_only=True) if p.exists() else None

    def save_reply(self, rnd: int, version: int, reply: dict[str, Any]) -> None:
        atomic_torch_save(self._reply_path(rnd, version), reply)
        for old in (self.dir / "replies").glob("round-*.pt"):  # keep the newest few: a resume re-asks one round
            try:
                if int(old.name.split("-")[1]) < int(rnd) - 2:
                    old.unlink()
            except (ValueError, IndexError, FileNotFoundError):
                pass


def attempt_identity() -> dict[str, Any]:
    """Who is training: this process (pid, host and start time, so a reused pid is not mistaken for it)."""
    import socket

    import psutil

    return {"pid": os.getpid(), "host": socket.gethostname(), "started": psutil.Process().create_time()}


def attempt_alive(attempt: dict[str, Any]) -> bool:
    """Whether the process of ``attempt`` may still be running (and so may still reply). Unknown hosts count as
    alive: only a process seen dead on this host lets its charge be reused."""
    import socket

    import psutil

    if attempt.get("host") != socket.gethostname():
        return True
    try:
        return psutil.Process(int(attempt["pid"])).create_time() == attempt.get("started")
    except (psutil.NoSuchProcess, KeyError, ValueError, TypeError):
        return False
    except psutil.Error:
        return True
