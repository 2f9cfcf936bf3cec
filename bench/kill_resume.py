"""Kill -9 at random points, resume, compare: is a resumed federation exactly the uninterrupted one?

One reference federation runs to the end; then each trial runs the same federation in a child process that a
failpoint SIGKILLs at a random point — after the coordinator's checkpoint of a round, after a client's privacy
charge (its ledger write, before any noise is drawn), or after a client stored its reply — and resumes it in a
fresh child until it completes. Both use the reproducible-noise switch (``privacy.noise=seeded-insecure``) so the
runs can be compared bit for bit: the final global adapter, every client's ledger (history, steps, charged
rounds), the counters (rounds, versions, bytes, reports) and the MLflow steps of every round.

The federation is the coordinator, round loop and client code of ``fedlora run`` driven in-process
(``fedlora.lifecycle.run_inprocess``: one process holds coordinator and clients, so a kill is a whole-federation
crash), tiny BERT, DP, MLflow on.

    .venv/bin/python bench/kill_resume.py [--kills 10] [--seed 0] [--quick]

Prints one row per trial, then as the last line a JSON object (``all_equal``, ``trials``, ``equal``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE = ["model=tiny_bert", "data.max_examples=600", "clients.num=4", "clients.per_round=2", "clients.local_steps=3",
        "clients.batch_size=16", "clients.sample_rate=null", "strategy.optimizer=adam", "strategy.lr=0.01",
        "model.max_length=32", "strategy=fedsvd", "privacy=dp", "privacy.epsilon=50",
        "privacy.noise=seeded-insecure", "tracking=mlflow"]


def child(run_dir: str, overrides: list[str]) -> None:
    from fedlora.config import FedConfig, compose
    from fedlora.lifecycle import run_inprocess

    run_inprocess(FedConfig.from_dict(compose(overrides)), run_dir, echo=lambda *_: None)


def run_child(run_dir: Path, overrides: list[str], failpoints: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "FEDLORA_FAILPOINTS"}
    if failpoints:
        env["FEDLORA_FAILPOINTS"] = failpoints
    r = subprocess.run([sys.executable, __file__, "--child", str(run_dir), *overrides], env=env,
                       capture_output=True, text=True, timeout=900)
    if r.returncode not in (0, -9):
        raise RuntimeError(f"child failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r.returncode


def fingerprint(run_dir: Path) -> dict:
    """What must be equal between an uninterrupted and a resumed run."""
    import torch
    from mlflow.tracking import MlflowClient

    ck = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    s = json.loads((run_dir / "summary.json").read_text())
    ledgers = {}
    for f in sorted((run_dir / "clients").glob("*/ledger.json")):
        led = json.loads(f.read_text())
        ledgers[f.parent.name] = {"history": led["history"], "steps": led["steps"],
                                  "participations": led["participations"],
                                  "charged": [(c["round"], c["version"], c["steps"]) for c in led["charges"]]}
    timeless = ("round_s", "client_compute_s", "aggregate_s", "eval_s", "overhead_s", "strategy_stats")
    history = [{k: v for k, v in h.items() if k not in timeless} for h in s["history"]]
    client = MlflowClient(tracking_uri=s["mlflow"]["tracking_uri"])
    steps = {name: sorted((m.step, m.value) for m in client.get_metric_history(s["mlflow"]["run_id"], name))
             for name in ("clients/sampled", "global/accuracy", "epsilon/max", "bytes/up")}
    status = client.get_run(s["mlflow"]["run_id"]).info.status
    exp = client.get_run(s["mlflow"]["run_id"]).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`fedlora.run_dir` = '{run_dir}'")
    return {
        "global_state": {k: v.tolist() for k, v in ck["global_state"].items()},
        "version": ck["version"], "round": ck["round"], "client_versions": ck["client_versions"],
        "ledgers": ledgers, "history": history,
        "counters": {k: s[k] for k in ("rounds_completed", "bytes_up", "bytes_down", "rejected_updates",
                                       "failed_clients")},
        "mlflow_steps": steps, "mlflow_status": status,
        "mlflow_runs_of_this_run_dir": [r.info.status for r in runs],  # one, FINISHED: none left RUNNING
    }


def diff(a: dict, b: dict) -> list[str]:
    return [k for k in a if a[k] != b.get(k)]


def kill_points(reference: dict, rounds: int, rng: random.Random, n: int, must: list[str]) -> list[str]:
    """``n`` failpoints that fire: every (round, client) charged in the reference run is a candidate."""
    charged = [(r, cid) for cid, led in reference["ledgers"].items() for r, _, _ in led["charged"]]
    pool = [f"coordinator.checkpointed@{r}" for r in range(1, rounds)]
    pool += [f"client.charged@{r}#{cid}" for r, cid in charged]
    pool += [f"client.replied@{r}#{cid}" for r, cid in charged]
    picks = list(must) + [p for p in rng.sample(pool, len(pool)) if p not in must]
    return picks[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2 kills, 2 rounds (one at a client's ledger write)")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1:])
        return
    if args.quick:
        args.kills, args.rounds = 2, 2
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedlora-kill-") as d:
        root = Path(d)
        overrides = [*BASE, f"rounds={args.rounds}", f"runs_root={root / 'runs'}", f"seed={args.seed}"]
        run_child(root / "reference", overrides, None)
        reference = fingerprint(root / "reference")
        last = sorted(cid for cid, led in reference["ledgers"].items()
                      if any(r == args.rounds for r, _, _ in led["charged"]))
        must = [f"client.charged@{args.rounds}#{last[0]}"] if args.quick and last else []
        points = kill_points(reference, args.rounds, rng, args.kills, must=must)
        rows = []
        print(f"{'failpoint':<44} {'killed':>6} {'resumes':>7}  equal to the uninterrupted run")
        for i, point in enumerate(points):
            run_dir = root / f"trial-{i}"
            killed = run_child(run_dir, overrides, point) == -9
            resumes = 0
            while not (run_dir / "summary.json").exists() or \
                    json.loads((run_dir / "summary.json").read_text())["rounds_completed"] < args.rounds or \
                    not (run_dir / "adapter").exists():
                run_child(run_dir, overrides, None)
                resumes += 1
            fp = fingerprint(run_dir)
            bad = diff(reference, fp)
            rows.append({"failpoint": point, "killed": killed, "resumes": resumes, "equal": not bad, "differs": bad})
            print(f"{point:<44} {str(killed):>6} {resumes:>7}  {'yes' if not bad else 'NO: ' + ', '.join(bad)}")
    out = {"trials": len(rows), "killed": sum(r["killed"] for r in rows), "equal": sum(r["equal"] for r in rows),
           "all_equal": all(r["equal"] for r in rows), "wall_s": round(time.perf_counter() - t0, 1), "rows": rows}
    print(f"{out['equal']}/{out['trials']} resumed runs equal to the uninterrupted one ({out['killed']} killed), "
          f"{out['wall_s']:.0f}s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
