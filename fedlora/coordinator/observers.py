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

    def on_progress(self, kind: str, done: int, total: int, elapsed_s: float, rnd: int | None = None) -> None:
        """Within a round (driver side): ``done`` of ``total`` clients answered the ``kind`` messages so far."""

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
    """Phase lines with the elapsed time, one line per round, and live progress within a round: on a terminal a
    status line rewritten in place; otherwise (a file, a pipe, CI) a plain line at most every ``every_s`` seconds,
    through ``echo`` (the ``fedlora.console`` logger in ``fedlora run``, so the run's log file has them)."""

    def __init__(self, *, rounds: int, privacy: bool, echo: Callable[[str], None] = print,
                 tty: bool | None = None, every_s: float = 30.0) -> None:
        import sys
        import time

        self.rounds, self.privacy, self.echo = rounds, privacy, echo
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.every_s = every_s
        self.t0 = time.monotonic()
        self.round = 0  # rounds reported so far (the one in progress is round + 1)
        self._last = 0.0
        self._live = False

    def _clear(self) -> None:
        if self._live:
            import sys

            sys.stdout.write("\r\033[K")
            sys.stdout.flush()
            self._live = False

    def on_start(self, message: str) -> None:
        import time

        self._clear()
        self.echo(f"{message} (+{time.monotonic() - self.t0:.0f}s)")

    def on_progress(self, kind: str, done: int, total: int, elapsed_s: float, rnd: int | None = None) -> None:
        import sys
        import time

        what = "training" if kind == "train" else "evaluating"
        rnd = self.round + 1 if rnd is None else rnd  # a resumed run starts past round 1
        line = f"round {rnd}/{self.rounds}: {what}, {done}/{total} clients answered, {elapsed_s:.0f}s"
        if self.tty:
            sys.stdout.write("\r\033[K" + line)
            sys.stdout.flush()
            self._live = True
        elif time.monotonic() - self._last >= self.every_s and elapsed_s >= self.every_s:
            self._last = time.monotonic()
            self.echo(line)

    def on_round(self, record: RoundRecord, coord: Any = None) -> None:
        self._clear()
        self.round = record.round
        self.echo(progress_line(record, rounds=self.rounds, privacy=self.privacy))
