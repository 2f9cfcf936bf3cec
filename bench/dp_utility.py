"""What does privacy cost? Global accuracy vs ε for FedAvg-LoRA, FFA-LoRA and FedSVD on the default data, beside
the DP linear probe (head only, same frozen features, same ε), the one-class baseline, and the DP-SGD step speed
with and without the frozen-prefix cache.

Every federation is the default `fedlora run` config (privacy=dp) at the given ε (∞: privacy=none, the same
configuration without DP), driven in-process by ``bench/compare.py``'s runner (the real coordinator, client and
DP-SGD code; frozen-prefix activations shared through one cache), ``--jobs`` at a time. The probe gets its own
schedule (``--probe-set``: many cheap head-only steps; only the head trains, so the whole encoder is cached).
Speed: one DP-SGD step (lora_fast engine, one thread) of the default model on the same records — cached with LoRA
in the top layer, uncached with the same LoRA layers, and uncached with LoRA in every layer (the former default).

    .venv/bin/python bench/dp_utility.py [--seeds 0,1,2] [--eps inf,8,3,1] [--jobs 2] [--quick]

Last line: a JSON object with dp8_accuracy (default strategy, mean over seeds), dp8_probe_accuracy,
nondp_accuracy, cache_speedup, speedup_vs_all_layers and every run's figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import QUICK, fmt, mean_std, run_grid  # noqa: E402

STRATEGIES = ("fedavg", "ffa", "fedsvd")
PROBE_SET = ["strategy=probe", "rounds=10", "clients.local_steps=5", "eval_every=10"]


def eps_overrides(eps: str) -> list[str]:
    return ["privacy=none"] if eps == "inf" else ["privacy=dp", f"privacy.epsilon={eps}"]


def speed(quick: bool, n: int = 256) -> dict:
    """Samples/s per core of one DP-SGD step, cached vs uncached vs LoRA in every layer (one thread)."""
    import torch

    from fedlora.env import apply_offline_env
    from fedlora.privacy.dp import PrivateTrainer
    from fedlora.task.cache import CachedSuffix, cached_records
    from fedlora.task.data import DataSpec, global_split, tokenize
    from fedlora.task.model import ModelSpec, build_model, load_tokenizer, set_trainable
    from fedlora.task.train import make_collate

    apply_offline_env()
    torch.set_num_threads(1)
    name = "tiny-bert" if quick else ModelSpec().name_or_path
    n = 64 if quick else n
    spec = ModelSpec(name_or_path=name, max_length=48, pooling="mean")
    tok = load_tokenizer(spec)
    pool, _ = global_split(DataSpec(name="rt_polarity", max_examples=2000 if quick else None), 0)
    recs = tokenize(list(pool)[:n], tok, spec.max_length)
    out = {}
    layers = None
    for label, lora_layers, cached in (("cached, LoRA in the top layer", "top", True),
                                       ("uncached, LoRA in the top layer", "top", False),
                                       ("uncached, LoRA in every layer", None, False)):
        probe = build_model(spec, num_labels=2, seed=0)
        layers = layers or probe.get_base_model().config.num_hidden_layers
        lora = (layers - 1,) if lora_layers == "top" else None
        model = build_model(ModelSpec(name_or_path=name, max_length=48, pooling="mean", lora_layers=lora),
                            num_labels=2, seed=0)
        set_trainable(model, lambda k: "lora_B" in k or "classifier" in k)
        runner, data = model, recs
        if cached:
            runner, data = CachedSuffix(model, layers - 1, "mean"), cached_records(model, layers - 1, recs,
                                                                                    cache_dir=None, pad_id=0)
        params = [p for p in runner.parameters() if p.requires_grad]
        batch = make_collate(0)(data)
        times = []
        with PrivateTrainer(runner, torch.optim.SGD(params, lr=0.1), noise_multiplier=1.0, clip=1.0,
                            expected_batch_size=len(data), grad_sample_mode="lora_fast") as dp:
            for _ in range(3):  # warm-up + 2 timed
                t0 = time.perf_counter()
                dp.step(batch)
                times.append(time.perf_counter() - t0)
        out[label] = len(data) / min(times[1:])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--eps", default="inf,8,3,1")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--set", nargs="*", default=[], help="overrides for every federation")
    ap.add_argument("--probe-set", nargs="*", default=PROBE_SET, help="the probe's schedule")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny BERT, 1 seed, ε ∞ and 8: under a minute")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    eps_list = args.eps.split(",")
    strategies = args.strategies.split(",")
    base = list(args.set)
    if args.quick:
        seeds, eps_list, strategies = [0], ["inf", "8"], ["fedsvd"]
        base = [*QUICK, "model.lora_layers=[1]", "model.pooling=mean", "privacy.epsilon=50", *base]
    t0 = time.perf_counter()
    points = [[f"strategy={s}", *eps_overrides(e)] for s in strategies for e in eps_list]
    points += [[*args.probe_set, *eps_overrides(e)] for e in eps_list if not args.quick or e == "8"]
    results = run_grid(points, seeds, base, args.jobs)
    sp = speed(args.quick)
    wall = time.perf_counter() - t0

    by_point: dict[str, list[dict]] = {}
    for i, p in enumerate(points):
        by_point[" ".join(p)] = results[i * len(seeds):(i + 1) * len(seeds)]
    print(f"{len(results)} federations in {wall:.0f}s; common overrides: {' '.join(base) or '(defaults)'}")
    print(f"global accuracy on the server's test split, mean ± std over seeds {seeds}, in %")
    print(f"{'method':<14} " + " ".join(f"{'ε=' + e:>14}" for e in eps_list))
    table = {}
    for name, key in [*[(s, f"strategy={s}") for s in strategies], ("linear probe", args.probe_set[0])]:
        cells = []
        for e in eps_list:
            runs = next((v for k, v in by_point.items() if k.startswith(key) and k.endswith(" ".join(
                eps_overrides(e)))), None)
            m, sd = mean_std([r["global_accuracy"] for r in runs]) if runs else (None, None)
            table[(name, e)] = (m, sd, [r["global_accuracy"] for r in runs] if runs else [])
            cells.append(fmt(m, sd))
        print(f"{name:<14} " + " ".join(f"{c:>14}" for c in cells))
    one_class = [r.get("majority_accuracy") for r in results[: len(seeds)]]
    mc, sc = mean_std(one_class)
    print(f"{'one class':<14} {fmt(mc, sc):>14}  (the test split's majority class)")
    print("\nDP-SGD step, samples/s per core (one thread, lora_fast, full batch of the same records):")
    for label, v in sp.items():
        print(f"  {label:<34} {v:8.1f}")
    labels = list(sp)
    cache_speedup = sp[labels[0]] / sp[labels[1]]
    vs_all = sp[labels[0]] / sp[labels[2]]
    print(f"  cache speedup (same LoRA layers) {cache_speedup:.2f}x; vs LoRA in every layer {vs_all:.2f}x")
    default = "fedsvd" if "fedsvd" in strategies else strategies[0]
    out = {
        "dp8_accuracy": table.get((default, "8"), (None,))[0],
        "dp8_probe_accuracy": table.get(("linear probe", "8"), (None,))[0],
        "nondp_accuracy": table.get((default, "inf"), (None,))[0],
        "one_class_accuracy": mc,
        "cache_speedup": cache_speedup,
        "speedup_vs_all_layers": vs_all,
        "samples_per_s_per_core": sp,
        "table": {f"{k[0]}|eps={k[1]}": {"mean": v[0], "std": v[1], "per_seed": v[2]} for k, v in table.items()},
        "wall_s": wall,
        "runs": results,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
