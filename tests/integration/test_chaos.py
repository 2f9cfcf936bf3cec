"""A chaos federation through Flower + Ray: of the sampled clients, 30% never reply, 10% crash, 10% have their actor
killed and 10% straggle past the round timeout (seeded). Every round completes with the exact failed / dropped
counts the draws predict, dead actors come back, and the process exits although hung clients never return."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY

pytestmark = pytest.mark.integration


def test_chaos_federation_completes_every_round_with_the_predicted_counts(tmp_path):
    from fedlora.config import FaultsConfig

    overrides = [o for o in TINY if not o.startswith(("clients.num", "clients.per_round", "rounds="))]
    # one actor per sampled client (clients.cpus=0.2: 10 actors on 2 cores), as every real device is its own: a hung
    # client then holds only its own actor, never another client's turn
    chaos = ["clients.cpus=0.2", "faults=chaos", "faults.kill=0.1", "faults.seed=3", "faults.straggle_s=80",
             "round_timeout_s=50"]
    r = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "run", *overrides, "clients.num=8", "clients.per_round=5", "rounds=3",
         *chaos, f"runs_root={tmp_path}"],
        capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    run_dir = Path(r.stdout.strip().splitlines()[-1][len("run dir: "):])
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["rounds_completed"] == 3
    faults = FaultsConfig(drop=0.3, crash=0.1, kill=0.1, straggle=0.1, straggle_s=80, seed=3)
    seen = set()
    for h in s["history"]:
        drawn = {cid: faults.draw(h["round"], cid) for cid in h["sampled_clients"]}
        seen |= {f for f in drawn.values() if f}
        assert h["dropped"] == sum(f in ("drop", "straggle") for f in drawn.values()), (h, drawn)
        assert h["failed"] == sum(f in ("crash", "kill") for f in drawn.values()), (h, drawn)
        assert h["reported"] == sum(f is None for f in drawn.values()) >= 1, (h, drawn)
    assert {"drop", "crash", "kill"} <= seen, seen  # the run exercised the faults (and a killed actor came back)
