"""Compare strategies (or any config knob) over seeds: one federation per grid point and seed, mean ± std.

Each federation runs the real coordinator and client code (DP-SGD, ledgers, aggregation, validation,
evaluation) through ``fedlora.lifecycle.run_inprocess``: the same objects ``fedlora run`` drives,
without Flower/Ray transport, so that many federations fit on a 2-core machine (``--jobs`` in parallel, one
torch thread each). The same sweep through the product path is ``fedlora run -m <grid> seed=0,1,2``.

    .venv/bin/python bench/compare.py --grid strategy=fedavg,ffa,fedsvd privacy.epsilon=3,8 \\
        --seeds 0,1,2 --set rounds=8 clients.per_round=2 [--jobs 2] [--quick]

Prints one row per grid point (global accuracy, personalised accuracy for FedSA-LoRA, the reference-global
model, ε, bytes per round, wall time), then as the last line a JSON object with every run's figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from fedlora.config import FedConfig, compose

#: frozen-prefix activations are shared by every federation of a sweep (an entry is keyed by model, data and k)
CACHE = Path(__file__).resolve().parents[1] / "runs" / "cache"

QUICK = ["model=tiny_bert", "data.max_examples=600", "clients.num=4", "clients.per_round=2", "clients.local_steps=3",
         "clients.batch_size=16", "clients.sample_rate=null", "rounds=2", "model.max_length=32",
         "strategy.optimizer=adam", "strategy.lr=0.01"]


def one_run(overrides: list[str]) -> dict:
    """One federation in this process; returns its summary's headline figures."""
    import torch

    torch.set_num_threads(1)
    from fedlora.lifecycle import run_inprocess

    with tempfile.TemporaryDirectory(prefix="fedlora-compare-") as d:
        cfg = FedConfig.from_dict(compose([*overrides, "tracking=none", f"runs_root={d}", "runtime.torch_threads=1",
                                           "runtime.num_cpus=1", f"runtime.cache_dir={CACHE}"]))
        t0 = time.perf_counter()
        s = run_inprocess(cfg, Path(d) / "run", echo=lambda *_: None)
        last = s["history"][-1]
        rounds = max(1, s["rounds_completed"])
        from collections import Counter

        from fedlora.task.data import global_split

        test_labels = global_split(cfg.data, cfg.seed)[1]["label"]
        return {
            "overrides": overrides,
            "global_accuracy": s["global_accuracy"],
            "accuracy_per_round": [h.get("global_accuracy") for h in s["history"]],
            "majority_accuracy": max(Counter(test_labels).values()) / len(test_labels),
            "personalized_accuracy": s["personalized_accuracy"],
            "personalized_accuracy_unweighted": last.get("personalized_accuracy_unweighted"),
            "reference_global_accuracy": last.get("reference_global_accuracy"),
            "global_accuracy_by_bits": last.get("global_accuracy_by_bits"),
            "epsilon_max": s["epsilon_max"],
            "bytes_up_per_round": s["bytes_up"] / rounds,
            "bytes_down_per_round": s["bytes_down"] / rounds,
            "wall_s": time.perf_counter() - t0,
        }


def grid_points(grid: list[str]) -> list[list[str]]:
    """Hydra's own sweep grammar, so list values work: ``model.lora_layers=[4,5],null`` is two points."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    axes = []
    parser = OverridesParser.create()
    for g in grid:
        (ov,) = parser.parse_overrides([g])
        values = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [ov.get_value_element_as_str()]
        axes.append([f"{ov.get_key_element()}={v}" for v in values])
    return [list(p) for p in itertools.product(*axes)] if axes else [[]]


def mean_std(xs: list[float | None]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(m: float | None, s: float | None) -> str:
    return "-" if m is None else f"{100 * m:.1f} ± {100 * s:.1f}"


def run_grid(points: list[list[str]], seeds: list[int], base: list[str], jobs: int) -> list[dict]:
    """Every (point, seed) federation, ``jobs`` at a time; results in (point, seed) order."""
    todo = [[*base, *p, f"seed={s}"] for p in points for s in seeds]
    # check every point, data-dependent checks included, before any training starts (a bad override or a seed
    # whose partition cannot satisfy the privacy settings fails here, with the key named)
    from fedlora.lifecycle import prepare

    for ov in todo:
        prepare(FedConfig.from_dict(compose(ov)))
    if jobs <= 1:
        return [one_run(ov) for ov in todo]
    with ProcessPoolExecutor(max_workers=jobs) as ex:
        return list(ex.map(one_run, todo))


def summarise(points: list[list[str]], seeds: list[int], results: list[dict]) -> list[dict]:
    rows = []
    for i, p in enumerate(points):
        rs = results[i * len(seeds) : (i + 1) * len(seeds)]
        row = {"point": " ".join(p) or "(base)", "runs": rs}
        for k in ("global_accuracy", "personalized_accuracy", "personalized_accuracy_unweighted",
                  "reference_global_accuracy", "epsilon_max", "bytes_up_per_round", "bytes_down_per_round", "wall_s"):
            row[k] = mean_std([r[k] for r in rs])
        rows.append(row)
    return rows


def print_table(rows: list[dict], seeds: list[int]) -> None:
    print(f"mean ± std over seeds {seeds} (accuracy in %):")
    print(f"{'point':<44} {'global':>13} {'personalised':>13} {'ref. global':>13} {'ε max':>6} "
          f"{'kB up/rnd':>10} {'kB dn/rnd':>10} {'s/run':>6}")
    for r in rows:
        eps = r["epsilon_max"][0]
        print(f"{r['point']:<44} {fmt(*r['global_accuracy']):>13} {fmt(*r['personalized_accuracy']):>13} "
              f"{fmt(*r['reference_global_accuracy']):>13} {eps if eps is None else round(eps, 2)!s:>6} "
              f"{r['bytes_up_per_round'][0] / 1e3:>10.1f} {r['bytes_down_per_round'][0] / 1e3:>10.1f} "
              f"{r['wall_s'][0]:>6.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", nargs="*", default=["strategy=fedavg,ffa,fedsvd"], help="key=v1,v2 axes")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--set", nargs="*", default=[], help="overrides applied to every run")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny BERT, 2 rounds, 1 seed: a smoke run under a minute")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    base = list(args.set)
    if args.quick:
        base, seeds = [*QUICK, *base], seeds[:1]
    points = grid_points(args.grid)
    t0 = time.perf_counter()
    results = run_grid(points, seeds, base, args.jobs)
    rows = summarise(points, seeds, results)
    print(f"{len(results)} federations ({len(points)} points x {len(seeds)} seeds) in {time.perf_counter() - t0:.0f}s; "
          f"common overrides: {' '.join(base) or '(defaults)'}")
    print_table(rows, seeds)
    print(json.dumps({"seeds": seeds, "base": base,
                      "points": rows}))


if __name__ == "__main__":
    main()
