"""Mixed-bitwidth fleets: naive vs grouped vs progressive+selective aggregation, same clients, same seeds.

Fleets: 50% 32-bit / 50% 4-bit, and a 4-way mix (32/16/8/4, a quarter each). For every fleet, method and seed
one federation runs (``bench/compare.py``'s in-process driver: the real coordinator, client quantisation with
bit-packed payloads, DP-SGD when privacy=dp, server-side dequantizer training). Reported: accuracy of the
32-bit clients' model (the full-precision global adapter) and of each low-bit class (the global adapter
re-quantised to its bitwidth, as those clients hold it), on the server's test split; bytes up/down per round;
the dequantizer's server time is in each run's summary (``strategy_stats``).

    .venv/bin/python bench/bitwidth.py [--seeds 0,1,2] [--set rounds=6 ...] [--jobs 2] [--quick]

Last line: a JSON object with ``gain_over_naive_pp`` (progressive − naive, 32-bit model, 50% low-bit fleet, in
accuracy points) and ``bytes_per_round`` (per method, up + down, 50% low-bit fleet).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compare import QUICK, fmt, mean_std, run_grid  # noqa: E402

FLEETS = {"50% 32-bit / 50% 4-bit": "{32: 0.5, 4: 0.5}", "4-way 32/16/8/4": "{32: 0.25, 16: 0.25, 8: 0.25, 4: 0.25}"}
FLEET_NAMES = {"half": "50% 32-bit / 50% 4-bit", "4way": "4-way 32/16/8/4"}
METHODS = ("naive", "grouped", "progressive")
#: the settings the README's bitwidth tables were measured with (the non-DP schedule of before the DP defaults)
DEFAULT_SET = ["strategy=ffa", "clients.num=8", "clients.per_round=4", "rounds=5", "eval_every=5",
               "clients.local_steps=3", "model.max_length=32", "privacy=none", "model.lora_layers=null",
               "model.pooling=cls", "model.lora_alpha=16", "clients.batch_size=32", "clients.sample_rate=null",
               "strategy.optimizer=adam", "strategy.lr=0.01"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--set", nargs="*", default=[], help="overrides applied to every run (after the defaults)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--fleets", default="half,4way", help="which fleets: half (50%% 32/4-bit), 4way (32/16/8/4)")
    ap.add_argument("--quick", action="store_true", help="tiny BERT, 2 rounds, 1 seed: a smoke run under a minute")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    base = [*DEFAULT_SET, *args.set]
    if args.quick:
        base, seeds = [*base, *QUICK, "clients.per_round=4"], seeds[:1]
    fleets = {FLEET_NAMES[f]: FLEETS[FLEET_NAMES[f]] for f in args.fleets.split(",")}
    points = [[f"clients.bitwidths={mix}", f"clients.bitwidth_method={m}"] for mix in fleets.values() for m in METHODS]
    t0 = time.perf_counter()
    results = run_grid(points, seeds, base, args.jobs)
    print(f"{len(results)} federations in {time.perf_counter() - t0:.0f}s; common overrides: {' '.join(base)}")
    print(f"mean ± std over seeds {seeds}; accuracy in % on the server's test split")
    print(f"{'fleet':<24} {'method':<12} {'32-bit model':>13} {'low-bit models (bits: acc)':<40} "
          f"{'kB up+down/round':>17}")
    table: dict[str, dict[str, dict]] = {}
    for i, p in enumerate(points):
        fleet = next(k for k, v in fleets.items() if p[0].endswith(v))
        method = p[1].split("=", 1)[1]
        rs = results[i * len(seeds) : (i + 1) * len(seeds)]
        acc = mean_std([r["global_accuracy"] for r in rs])
        bits = sorted({b for r in rs for b in (r["global_accuracy_by_bits"] or {})}, key=int, reverse=True)
        low = {b: mean_std([(r["global_accuracy_by_bits"] or {}).get(b) for r in rs]) for b in bits}
        traffic = mean_std([r["bytes_up_per_round"] + r["bytes_down_per_round"] for r in rs])[0]
        table.setdefault(fleet, {})[method] = {"acc32": acc, "low": low, "bytes_per_round": traffic,
                                               "runs": [r["global_accuracy"] for r in rs]}
        low_s = ", ".join(f"{b}: {fmt(*v)}" for b, v in low.items())
        print(f"{fleet:<24} {method:<12} {fmt(*acc):>13} {low_s:<40} {traffic / 1e3:>17.1f}")
    first = next(iter(fleets))
    half = table[first]
    gain = 100 * (half["progressive"]["acc32"][0] - half["naive"]["acc32"][0])
    print(f"progressive+selective vs naive, {first} fleet, 32-bit model: {gain:+.2f} points")
    print(json.dumps({
        "gain_over_naive_pp": round(gain, 3), "gain_fleet": first,
        "bytes_per_round": {m: half[m]["bytes_per_round"] for m in METHODS},
        "seeds": seeds, "base": base,
        "table": {f: {m: {"acc32_mean": v["acc32"][0], "acc32_std": v["acc32"][1],
                          "low_bit_mean": {b: x[0] for b, x in v["low"].items()}, "runs": v["runs"]}
                      for m, v in t.items()} for f, t in table.items()},
    }))


if __name__ == "__main__":
    main()
