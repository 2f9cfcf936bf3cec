"""``fedlora ls`` and ``fedlora show``: the federations under a runs root, read from their run directories
(``fedlora-run.json``, ``config.json``, ``summary.json`` — written after every round — and the checkpoint), so
they work with tracking off, while a run is going, and without an MLflow server.

A run's status: ``running`` (its driver process is alive), ``finished`` (every planned round done), ``stopped``
(it has a checkpoint: ``fedlora resume`` continues it) or ``failed`` (it died before its first checkpoint)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

#: written by the process driving a run while it runs (``fedlora run`` / ``resume``), removed when it ends
DRIVER_PID = "driver.pid"
MARKERS = ("fedlora-run.json", "config.json")
COLUMNS = ("run", "status", "strategy", "rounds", "accuracy", "epsilon_max", "started")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _checkpoint_round(path: Path, default: int) -> int:
    """The last completed round of a stopped run is its checkpoint's (what `fedlora resume` continues from): a run
    killed between its checkpoint and its summary has a summary one round behind."""
    try:
        import torch

        return int(torch.load(path, map_location="cpu", weights_only=False)["round"])
    except Exception:  # noqa: BLE001 - an unreadable checkpoint: `fedlora resume` names it; ls shows the summary's
        return default


def find_runs(root: Path) -> list[Path]:
    """Run directories under ``root`` (a run, or a sweep's points one level down), oldest first."""
    found = {p.parent for m in MARKERS for p in list(root.glob(f"*/{m}")) + list(root.glob(f"*/*/{m}"))}
    return sorted(found, key=lambda p: (p.stat().st_mtime if p.exists() else 0, str(p)))


def describe(run_dir: Path) -> dict:
    """One run's row: identity, status, progress and its headline figures (None where not known)."""
    cfg = _json(run_dir / "config.json") or {}
    summary = _json(run_dir / "summary.json") or {}
    marker = _json(run_dir / "fedlora-run.json") or {}
    planned = summary.get("rounds_planned", cfg.get("rounds"))
    done = summary.get("rounds_completed", 0)
    pid_file = run_dir / DRIVER_PID
    try:
        driver = int(pid_file.read_text()) if pid_file.exists() else None
    except ValueError:
        driver = None
    if driver is not None and _alive(driver):
        status = "running"
    elif planned is not None and done >= planned and summary:
        status = "finished"
    elif (run_dir / "checkpoint.pt").exists():
        status = "stopped"
        done = _checkpoint_round(run_dir / "checkpoint.pt", done)
    else:
        status = "failed"
    started = marker.get("started")
    return {
        "run": str(run_dir), "status": status,
        "strategy": summary.get("strategy") or (cfg.get("strategy") or {}).get("name"),
        "rounds_completed": done, "rounds_planned": planned,
        "accuracy": summary.get("global_accuracy"), "epsilon_max": summary.get("epsilon_max"),
        "delta": summary.get("delta"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else None,
        "mlflow_run_id": (summary.get("mlflow") or {}).get("run_id"),
    }


def show(run_dir: Path) -> dict:
    """One run in full: its row, its config and its per-round history."""
    if not any((run_dir / m).exists() for m in MARKERS):
        raise FileNotFoundError(f"{run_dir} is not a fedlora run directory (no {' or '.join(MARKERS)}); list the "
                                "runs with `fedlora ls --runs-root <dir>`")
    summary = _json(run_dir / "summary.json") or {}
    return {**describe(run_dir), "config": _json(run_dir / "config.json") or {},
            "history": summary.get("history", [])}


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def table(rows: list[dict]) -> str:
    """Rows as a plain aligned table (the run column relative to the common root)."""
    if not rows:
        return "no runs"
    cells = [[_cell(r["run"]), r["status"], _cell(r["strategy"]),
              f"{r['rounds_completed']}/{_cell(r['rounds_planned'])}", _cell(r["accuracy"]),
              _cell(r["epsilon_max"]), _cell(r["started"])] for r in rows]
    widths = [max(len(c[i]) for c in [list(COLUMNS), *cells]) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in [list(COLUMNS), *cells])


def history_table(history: list[dict]) -> str:
    cols = ("round", "global_accuracy", "global_loss", "reported", "sampled", "epsilon_max", "bytes_up",
            "bytes_down", "round_s")
    cells = [[_cell(h.get(c)) for c in cols] for h in history]
    widths = [max(len(x[i]) for x in [list(cols), *cells]) for i in range(len(cols))]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [list(cols), *cells])
