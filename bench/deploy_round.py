"""What does a real deployment cost per round? A deployed federation (`fedlora serve` + enrolled `fedlora client`
devices, TLS and SuperNode authentication on, everything on loopback) against the same federation in simulation
(`fedlora run`: Ray actors), same model, data sizes, steps and DP.

Each device gets its own CSV of ``--records`` rt-polarity sentences; the simulation reads the union of those files
(``data=local``, IID split into as many clients), so every client trains the same number of steps on the same
amount of data in both. Figures: ``round_s_deploy`` and ``round_s_sim`` (median console round time of rounds
2..R: steady state, round 1 pays model loads), their ratio, and ``client_startup_s`` (from starting `fedlora
client` to the coordinator seeing the device online; the coordinator polls every 2 s, so ±2 s).

    .venv/bin/python bench/deploy_round.py [--models tiny,minilm] [--devices 2] [--rounds 4] [--records 300]

Run it alone (it uses both cores). Last line: a JSON object with every figure per model.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FEDLORA = [sys.executable, "-m", "fedlora.cli"]
ROUND = re.compile(r"^round (\d+)/\d+ \|.*\| ([\d.]+)s$", re.M)
MODELS = {
    "tiny": ["model=tiny_bert", "clients.sample_rate=null", "clients.batch_size=16", "strategy.optimizer=adam",
             "strategy.lr=0.01"],
    "minilm": [],  # the default model, pooling, cache and DP schedule (sample_rate 0.25, sgd)
}


def write_devices(root: Path, n_dev: int, records: int) -> tuple[list[Path], Path]:
    from fedlora.env import apply_offline_env
    from fedlora.task.data import DataSpec, global_split, label_names

    apply_offline_env()
    spec = DataSpec(name="rt_polarity")
    pool, _ = global_split(spec, 0)
    labels = label_names(spec, 0)
    rows = [(r["text"], labels[r["label"]]) for r in list(pool)[: n_dev * records]]
    files = []
    for i in range(n_dev):
        f = root / f"dev-{i}.csv"
        with open(f, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["text", "label"])
            w.writerows(rows[i * records:(i + 1) * records])
        files.append(f)
    union = root / "all.csv"
    with open(union, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return files, union


def round_times(text: str) -> list[float]:
    return [float(t) for _, t in ROUND.findall(text)]


def steady(times: list[float]) -> float | None:
    return statistics.median(times[1:]) if len(times) > 1 else None


def wait_for(pattern: str, log: Path, timeout: float, proc: subprocess.Popen) -> re.Match:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        m = re.search(pattern, log.read_text() if log.exists() else "")
        if m:
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, proc.args[:4]))} exited {proc.returncode}:\n"
                               f"{log.read_text()[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"{pattern!r} not in {log} within {timeout}s:\n{log.read_text()[-3000:]}")


def start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([*FEDLORA, *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def deployed(root: Path, common: list[str], files: list[Path], rounds: int) -> dict:
    runs = root / "runs"
    serve_log = root / "serve.log"
    n = len(files)
    serve = start(["serve", *common, f"rounds={rounds}", f"clients.num={n}", f"clients.per_round={n}",
                   "deploy.host=127.0.0.1", "deploy.port=0", f"deploy.min_available={n}", f"runs_root={runs}",
                   "tracking=none"], serve_log)
    procs = [serve]
    try:
        port = int(wait_for(r"fleet API on 127\.0\.0\.1:(\d+)", serve_log, 300, serve).group(1))
        ca = runs / "deploy" / "tls" / "ca.crt"
        startup = []
        for i, data in enumerate(files):
            name, state = f"dev-{i}", root / f"dev-{i}"
            subprocess.run([*FEDLORA, "client", "--init-key", "--state-dir", str(state)], check=True,
                           capture_output=True, timeout=120)
            subprocess.run([*FEDLORA, "enroll", str(state / "node.key.pub"), "--name", name, "--runs-root",
                            str(runs)], check=True, capture_output=True, timeout=120)
            t0 = time.monotonic()
            procs.append(start(["client", "--server", f"127.0.0.1:{port}", "--ca", str(ca), "--data", str(data),
                                "--name", name, "--state-dir", str(state)], root / f"{name}.log"))
            online = r"devices online: .*" if i == n - 1 else rf"waiting for devices: {i + 1}/{n}"
            wait_for(online, serve_log, 300, serve)
            startup.append(time.monotonic() - t0)
        rc = serve.wait(3600)
        text = serve_log.read_text()
        if rc != 0:
            raise RuntimeError(f"fedlora serve exited {rc}:\n{text[-3000:]}")
        times = round_times(text)
        return {"round_s": times, "steady_s": steady(times), "client_startup_s": startup}
    finally:
        for p in procs:
            stop(p)


def simulated(root: Path, common: list[str], union: Path, n: int, rounds: int) -> dict:
    log = root / "sim.log"
    p = start(["run", *common, f"rounds={rounds}", f"clients.num={n}", f"clients.per_round={n}", "data=local",
               f"data.path={union}", "data.partitioner=iid", f"runs_root={root / 'sim-runs'}", "tracking=none"], log)
    try:
        rc = p.wait(3600)
    finally:
        stop(p)
    text = log.read_text()
    if rc != 0:
        raise RuntimeError(f"fedlora run exited {rc}:\n{text[-3000:]}")
    times = round_times(text)
    return {"round_s": times, "steady_s": steady(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,minilm")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--records", type=int, default=300, help="records per device")
    ap.add_argument("--set", nargs="*", default=[], help="overrides for both federations")
    args = ap.parse_args()
    out: dict = {"devices": args.devices, "rounds": args.rounds, "records_per_device": args.records}
    with tempfile.TemporaryDirectory(prefix="fedlora-deploy-bench-") as tmp:
        root = Path(tmp)
        files, union = write_devices(root, args.devices, args.records)
        for model in args.models.split(","):
            common = [*MODELS[model], "clients.local_steps=4", "round_timeout_s=600", "privacy=dp", *args.set]
            (root / f"{model}-deploy").mkdir()
            (root / f"{model}-sim").mkdir()
            d = deployed(root / f"{model}-deploy", common, files, args.rounds)
            s = simulated(root / f"{model}-sim", common, union, args.devices, args.rounds)
            ratio = d["steady_s"] / s["steady_s"] if d["steady_s"] and s["steady_s"] else None
            out[model] = {"round_s_deploy": d["steady_s"], "round_s_sim": s["steady_s"], "deploy_over_sim": ratio,
                          "client_startup_s": statistics.median(d["client_startup_s"]),
                          "deploy_rounds": d["round_s"], "sim_rounds": s["round_s"],
                          "startup_each": d["client_startup_s"]}
            print(f"{model}: steady round {d['steady_s']:.1f}s deployed vs {s['steady_s']:.1f}s simulated "
                  f"({ratio:.2f}x); device start-up to online {out[model]['client_startup_s']:.1f}s "
                  f"(rounds deployed {d['round_s']}, simulated {s['round_s']})", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
