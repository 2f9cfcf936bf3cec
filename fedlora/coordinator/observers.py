"""Round observers: what happens to a finished round (checkpoint, summary, tracking, console) plugs in here, so
the round loop stays a loop. Coordinator-side observers see the coordinator; console ones run in the driver."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from fedlora.atomic_io import atomic_torch_save, atomic_write_json
from fedlora.coordinator.records import RoundRecord
from fedlora.faults import failpoint


class RoundObserver:
    """No-op hooks; subclasses override what they need. ``coord`` is the coordinator (coordinator-side
    observers) or None (driver-side ones)."""

    def on_start(self, message: str) -> None:
        pass

    def on_round(self, record: RoundRecord, coord: Any = None) -> None:
        pass

    def on_finish(self, summary: dict, status: str) -> None:
        pass


class CheckpointObserver(RoundObserver):
    """The federation state after every round (``fedlora resume`` continues from it)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_round(self, record: RoundRecord, coord: Any = None) -> None:
        atomic_torch_save(self.path, coord.state_dict())
        failpoint("coordinator.checkpointed", round=record.round)


class SummaryObserver(RoundObserver):
    """``summary.json``, written atomically after every round and at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_round(self, record: RoundRecord, coord: Any = None) -> None:
        atomic_write_json(self.path, coord.summary())

    def on_finish(self, summary: dict, status: str) -> None:
        atomic_write_json(self.path, summary)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}MB" if n >= 1e5 else f"{n / 1e3:.1f}kB"


def progress_line(record: RoundRecord, *, rounds: int, privacy: bool) -> str:
    r = record
    parts = [f"round {r.round}/{rounds}"]
    if r.global_accuracy is not None:
        parts.append(f"global acc {r.global_accuracy:.4f} loss {r.global_loss:.4f}")
    if r.personalized_accuracy is not None:
        parts.append(f"personalised acc {r.personalized_accuracy:.4f}")
    if r.reference_global_accuracy is not None:
        parts.append(f"reference-global acc {r.reference_global_accuracy:.4f}")
    parts.append(f"clients {r.reported}/{r.sampled} reported")
    for k in ("failed", "rejected", "declined", "dropped"):
        if getattr(r, k):
            parts.append(f"{getattr(r, k)} {k}")
    if privacy:
        parts.append(f"ε max {r.epsilon_max:.2f}")
    parts.append(f"↑{_mb(r.bytes_up)} ↓{_mb(r.bytes_down)}")
    parts.append(f"{r.round_s:.1f}s")
    return " | ".join(parts)


class ConsoleObserver(RoundObserver):
    """One progress line per round."""

    def __init__(self, *, rounds: int, privacy: bool, echo: Callable[[str], None] = print) -> None:
        self.rounds, self.privacy, self.echo = rounds, privacy, echo

    def on_start(self, message: str) -> None:
        self.echo(message)

    def on_round(self, record: RoundRecord, coord: Any = None) -> None:
        self.echo(progress_line(record, rounds=self.rounds, privacy=self.privacy))
