"""How does the coordinator cope with many registered virtual clients? The product path (`fedlora run`: Flower's
simulation on local Ray) with clients.num = 100, 1,000, 10,000 and 100 clients sampled per round, tiny model, no
DP, a few rounds; every client holds ``--records`` records of a local CSV (rt-polarity sentences, repeated to fill
10,000 clients).

Figures per clients.num:
* ``startup_s``: from starting `fedlora run` to the console's "N clients ready" line (Ray start, model, data
  partitioning, the handshake);
* ``round_s``: median round time of rounds 2..R (round 1 pays the client actors' model loads);
* ``overhead_frac``: per round, (round time − client compute − aggregation − evaluation) / round time, median of
  rounds 2..R. Client compute is the sum of the sampled clients' own training time (``client_s`` in the run's
  summary) divided by the number of client actors that ran them in parallel (``placement.json``);
* ``engine_frac``: the same with the clients' whole handling of their message instead of their training
  (``handler_s``: the client's data loaded and tokenised on first touch, its state files, the reply built): what
  is left is Flower's link state, Ray's actor calls, the driver and the coordinator moving messages;
* ``rss_gb`` (peak, sampled every 0.5 s): the whole process tree of `fedlora run` (driver, Ray's daemons, the
  client actors, the coordinator actor), and ``coordinator_rss_gb``, the coordinator actor alone. RSS counts
  shared pages once per process, so the total over-counts (an upper bound).

    .venv/bin/python bench/scale.py [--clients 100,1000,10000] [--per-round 100] [--rounds 3] [--records 4]

Run it alone (it uses both cores). Last line: a JSON object with every figure, and ``overhead_frac_10k``,
``rss_gb_10k``, ``startup_s_10k`` when 10,000 was measured.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

READY = re.compile(r"(\d+) clients ready")


def write_corpus(path: Path, n_records: int) -> None:
    from fedlora.env import apply_offline_env
    from fedlora.task.data import DataSpec, global_split, label_names

    apply_offline_env()
    spec = DataSpec(name="rt_polarity")
    pool, _ = global_split(spec, 0)
    labels = label_names(spec, 0)
    rows = [(r["text"], labels[r["label"]]) for r in pool]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(n_records):
            w.writerow(rows[i % len(rows)])


class TreeRss:
    """Peak RSS of a process and all its descendants, and of the coordinator actor among them."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak_total = 0
        self.peak_coord = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            total = coord = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    total += rss
                    if "Coordinator" in " ".join(p.cmdline()):
                        coord = max(coord, rss)
                except psutil.Error:
                    continue
            self.peak_total = max(self.peak_total, total)
            self.peak_coord = max(self.peak_coord, coord)
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def run_point(root: Path, n: int, args) -> dict:
    corpus = root / f"corpus-{n}.csv"
    # each client's partition: `records` records; the server's test split takes data.test_fraction more
    write_corpus(corpus, int(n * args.records / 0.9) + 1)
    run_dir = root / f"run-{n}"
    cmd = [sys.executable, "-m", "fedlora.cli", "run", "model=tiny_bert", "privacy=none", "tracking=none",
           "data=local", f"data.path={corpus}", "data.partitioner=iid", "data.test_fraction=0.1",
           f"clients.num={n}", f"clients.per_round={min(n, args.per_round)}", "clients.local_steps=1",
           "clients.sample_rate=null", "clients.batch_size=2", f"rounds={args.rounds}", "eval_every=1",
           f"runs_root={root}", f"hydra.run.dir={run_dir}"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    rss = TreeRss(proc.pid)
    startup = None
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        if startup is None and READY.search(line):
            startup = time.monotonic() - t0
            print(f"  clients.num={n}: {line.strip()} at {startup:.1f}s", flush=True)
    proc.wait()
    total_s = time.monotonic() - t0
    rss.stop()
    if proc.returncode != 0:
        sys.stdout.write("".join(tail))
        raise SystemExit(f"clients.num={n}: fedlora run exited {proc.returncode}")
    from fedlora.coordinator.core import CHECKPOINT, read_checkpoint

    hist = read_checkpoint(run_dir / CHECKPOINT)["history"]  # with the per-client rows (summary.json has none)
    # client actors that ran in parallel (the run's placement report: Flower's pool, this box's CPUs / clients.cpus)
    actors = sum(json.loads((run_dir / "placement.json").read_text())["client_actor_nodes"].values()) or 1
    rounds = []
    for h in hist:
        rows = h.get("clients", {}).values()
        compute = sum(c["client_s"] for c in rows) / actors
        handling = sum(c.get("handler_s") or c["client_s"] for c in rows) / actors
        other = h["round_s"] - compute - h["aggregate_s"] - h["eval_s"]
        engine = h["round_s"] - handling - h["aggregate_s"] - h["eval_s"]
        rounds.append({"round_s": h["round_s"], "client_compute_s": compute, "client_handling_s": handling,
                       "aggregate_s": h["aggregate_s"], "eval_s": h["eval_s"], "overhead_s": other,
                       "overhead_frac": other / h["round_s"], "engine_s": engine, "engine_frac": engine / h["round_s"],
                       "reported": h["reported"]})
    steady = rounds[1:] or rounds
    return {"clients": n, "startup_s": startup, "total_s": total_s,
            "round_s": statistics.median(r["round_s"] for r in steady),
            "overhead_frac": statistics.median(r["overhead_frac"] for r in steady),
            "overhead_s": statistics.median(r["overhead_s"] for r in steady),
            # what the engine and the coordinator add per sampled client's message, on one of the actors
            "overhead_ms_per_client": 1e3 * actors * statistics.median(r["overhead_s"] / r["reported"]
                                                                      for r in steady),
            "client_compute_s": statistics.median(r["client_compute_s"] for r in steady),
            "client_handling_s": statistics.median(r["client_handling_s"] for r in steady),
            "engine_frac": statistics.median(r["engine_frac"] for r in steady),
            "engine_ms_per_client": 1e3 * actors * statistics.median(r["engine_s"] / r["reported"] for r in steady),
            "rss_gb": rss.peak_total / 2**30, "coordinator_rss_gb": rss.peak_coord / 2**30, "rounds": rounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="100,1000,10000")
    ap.add_argument("--per-round", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--records", type=int, default=4, help="records per client")
    args = ap.parse_args()
    points = []
    with tempfile.TemporaryDirectory(prefix="fedlora-scale-") as tmp:
        for n in (int(x) for x in args.clients.split(",")):
            points.append(run_point(Path(tmp), n, args))
    print(f"\n{'clients':>8} {'start s':>8} {'round s':>8} {'compute s':>10} {'overhead':>9} {'ms/client':>10} "
          f"{'handling s':>11} {'engine':>7} {'ms/client':>10} {'RSS GB':>7} {'coord GB':>9}")
    for p in points:
        print(f"{p['clients']:>8} {p['startup_s'] or float('nan'):>8.1f} {p['round_s']:>8.2f} "
              f"{p['client_compute_s']:>10.2f} {p['overhead_frac']:>8.1%} {p['overhead_ms_per_client']:>10.1f} "
              f"{p['client_handling_s']:>11.2f} {p['engine_frac']:>6.1%} {p['engine_ms_per_client']:>10.1f} "
              f"{p['rss_gb']:>7.2f} {p['coordinator_rss_gb']:>9.2f}")
    out: dict = {"per_round": args.per_round, "rounds": args.rounds, "records_per_client": args.records,
                 "points": points}
    first, last = points[0], points[-1]
    if first["startup_s"] and last["startup_s"]:
        out["startup_ratio"] = last["startup_s"] / first["startup_s"]
    for p in points:
        if p["clients"] == 10_000:
            out.update(overhead_frac_10k=p["overhead_frac"], engine_frac_10k=p["engine_frac"], rss_gb_10k=p["rss_gb"],
                       startup_s_10k=p["startup_s"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
