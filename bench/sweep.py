"""A sweep one point after another (Hydra's basic launcher) against the same sweep with its points at once
(Hydra's joblib launcher, ``hydra/launcher=joblib hydra.launcher.n_jobs=N``): wall time of the whole
``fedlora run -m``, both in this one run, and the ratio. Each point is a whole federation through Flower on its own
embedded Ray (tiny model, no DP, MLflow on); under joblib each point's client actors are its share of its Ray's
CPUs (``lifecycle.sized_actor_pool``), so both modes train on the same number of actors in total.

    .venv/bin/python bench/sweep.py [--points 4] [--jobs 2] [--rounds 2]

Run it alone (it uses both cores). Both sweeps must give the same accuracies (checked: the points are the same
federations). Last line: a JSON object with ``sequential_s``, ``parallel_s`` and ``speedup``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STRATEGIES = ["fedavg", "ffa", "fedsvd", "fedsa", "fedavg", "ffa", "fedsvd", "fedsa"]


def sweep(root: Path, points: int, rounds: int, launcher: list[str]) -> tuple[float, dict[str, float]]:
    seeds = ",".join(str(s) for s in range(max(1, (points + 3) // 4)))
    strategies = ",".join(sorted(set(STRATEGIES[:points])))
    cmd = [str(Path(sys.executable).parent / "fedlora"), "run", "-m", "model=tiny_bert", "data.max_examples=600",
           "clients.num=4", "clients.per_round=2", "clients.local_steps=3", "clients.batch_size=16",
           "clients.sample_rate=null", "privacy=none", f"rounds={rounds}", f"runs_root={root}",
           f"strategy={strategies}", f"seed={seeds}", *launcher]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"sweep failed ({' '.join(launcher) or 'basic'}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    acc = {p.parent.name.split("-", 1)[1]: json.loads(p.read_text())["global_accuracy"]
           for p in root.glob("sweep-*/*/summary.json")}
    return wall, acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=4, help="sweep points (strategies x seeds)")
    ap.add_argument("--jobs", type=int, default=2, help="hydra.launcher.n_jobs of the parallel sweep")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fl-sweep-") as tmp:
        seq_s, seq_acc = sweep(Path(tmp) / "basic", a.points, a.rounds, [])
        print(f"basic launcher (one point after another): {seq_s:.1f} s for {len(seq_acc)} points", flush=True)
        par_s, par_acc = sweep(Path(tmp) / "joblib", a.points, a.rounds,
                               ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={a.jobs}"])
        print(f"joblib launcher, n_jobs={a.jobs}: {par_s:.1f} s for {len(par_acc)} points", flush=True)
    if seq_acc != par_acc:
        sys.exit(f"the two sweeps disagree: {seq_acc} vs {par_acc}")
    out = {"points": len(seq_acc), "jobs": a.jobs, "rounds": a.rounds, "sequential_s": round(seq_s, 1),
           "parallel_s": round(par_s, 1), "speedup": round(seq_s / par_s, 2)}
    print(f"speed-up {out['speedup']}x (same accuracies in both)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
