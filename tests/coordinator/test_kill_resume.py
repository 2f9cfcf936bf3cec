"""Kill -9 at random points (a client's ledger write among them) and resume: the resumed federation equals the
uninterrupted one bit for bit — adapter, ledgers, counters, MLflow steps (bench/kill_resume.py at small size)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.federation

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kill_resume.py"


def test_killed_and_resumed_federations_equal_the_uninterrupted_one():
    r = subprocess.run([sys.executable, str(BENCH), "--quick", "--seed", "1"], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["trials"] == 2 and out["killed"] == 2, r.stdout
    assert any(row["failpoint"].startswith("client.charged@") for row in out["rows"])
    assert out["all_equal"], r.stdout
