"""Time one training step, plain vs DP-SGD engines, on the default packaged model (MiniLM-L6 + LoRA r=8).

FFA-style: only lora_B trained, head frozen. Batch 32 × seq 128 of random token ids. Paths, timed side by side
(round-robin, rotated, so machine load hits all alike): plain SGD, Opacus hooks, Opacus ghost clipping, and our
``lora_fast`` engine. Prints a table, then as the last line a JSON object.

    .venv/bin/python bench/dp_step.py [--steps 5] [--batch 32] [--seq 128] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from fedlora.env import apply_offline_env  # noqa: E402

apply_offline_env()

import torch  # noqa: E402

from fedlora.privacy.dp import PrivateTrainer, leftover_dp_state  # noqa: E402
from fedlora.task.model import ModelSpec, adapter_state, build_model, load_adapter_state, set_trainable  # noqa: E402

DP_PATHS = ("hooks", "ghost", "lora_fast")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per path (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=ModelSpec().name_or_path)
    ap.add_argument("--quick", action="store_true", help="under a minute: 1 timed step per path at seq 64")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.seq = 1, 64
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    spec = ModelSpec(name_or_path=args.model)
    model = build_model(spec, num_labels=2, seed=0)
    trained = set_trainable(model, lambda k: "lora_B" in k)
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    load_s = time.perf_counter() - t0
    start = adapter_state(model)

    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batch = {
        "input_ids": torch.randint(1000, vocab, (args.batch, args.seq), generator=g),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (args.batch,), generator=g),
    }
    params = [p for p in model.parameters() if p.requires_grad]

    def plain_step(opt):
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        loss.backward()
        opt.step()

    errors: dict[str, str] = {}

    def make(path):
        opt = torch.optim.SGD(params, lr=1e-3)
        if path == "non-DP":
            return opt
        return PrivateTrainer(model, opt, noise_multiplier=1.0, clip=1.0, expected_batch_size=args.batch,
                              grad_sample_mode=path, seed=0)

    def run(path, obj):
        if path == "non-DP":
            plain_step(obj)
        else:
            obj.step(batch)

    # warm-up (and a correctness cross-check on the real model: lora_fast vs Opacus hooks, same noise seed)
    updates = {}
    model.train()
    for path in ("non-DP", *DP_PATHS):
        load_adapter_state(model, start)
        obj = None
        try:
            obj = make(path)
            before = [p.detach().clone() for p in params]
            torch.manual_seed(0)  # same dropout masks for every path
            run(path, obj)
            updates[path] = [p.detach() - b for p, b in zip(params, before)]
        except Exception as e:  # report why a path does not work on this model, keep going
            errors[path] = f"{type(e).__name__}: {e}"
        finally:
            if isinstance(obj, PrivateTrainer):
                obj.close()
    load_adapter_state(model, start)
    paths = [p for p in ("non-DP", *DP_PATHS) if p not in errors]
    diff = None
    if "hooks" in updates and "lora_fast" in updates:
        diff = max(float((a - b).abs().max()) for a, b in zip(updates["hooks"], updates["lora_fast"]))

    # timed: round-robin over paths; each path's engine attached only while it runs (one engine on the model)
    times: dict[str, list[float]] = {p: [] for p in paths}
    for i in range(args.steps):
        for path in paths[i % len(paths):] + paths[: i % len(paths)]:  # rotate: no path always goes first
            obj = make(path)
            try:
                t = time.perf_counter()
                run(path, obj)
                times[path].append(time.perf_counter() - t)
            finally:
                if isinstance(obj, PrivateTrainer):
                    obj.close()
    assert leftover_dp_state(model) == []

    # The box is shared: contention only ever adds time, so each path's fastest step is the estimate of its
    # own cost (the median is printed too, to show the noise).
    med = {p: statistics.median(v) for p, v in times.items()}
    fast = {p: min(v) for p, v in times.items()}
    sps = {p: args.batch / fast[p] for p in paths}
    base = fast["non-DP"]
    dp_paths = [p for p in paths if p != "non-DP"]
    best = min(dp_paths, key=lambda p: fast[p]) if dp_paths else None

    print(f"model {spec.name_or_path}: {len(trained)} lora_B tensors, {n_trained} trained params (FFA, head off); "
          f"batch {args.batch} x seq {args.seq}; torch threads {torch.get_num_threads()}; "
          f"{args.steps} timed steps/path after 1 warm-up; load {load_s:.1f}s")
    print(f"{'path':<10} {'min s/step':>11} {'samples/s':>10} {'vs non-DP':>10} {'median s/step':>14}")
    for p in paths:
        print(f"{p:<10} {fast[p]:>11.3f} {sps[p]:>10.1f} {fast[p] / base:>9.2f}x {med[p]:>14.3f}")
    for p, e in errors.items():
        print(f"{p:<10} FAILED: {e}")
    if diff is not None:
        print(f"lora_fast vs Opacus hooks, one DP step from the same start and noise seed: max |Δ update| = {diff:.2e}")
    print(json.dumps({
        "dp_over_nondp": round(fast[best] / base, 4) if best else None,
        "best_dp_path": best,
        "samples_per_s": {p: round(v, 2) for p, v in sps.items()},
        "min_step_s": {p: round(v, 4) for p, v in fast.items()},
        "median_step_s": {p: round(v, 4) for p, v in med.items()},
        "over_nondp": {p: round(fast[p] / base, 4) for p in paths},
        "errors": errors,
        "lora_fast_vs_hooks_max_abs_diff": diff,
        "batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads(), "steps": args.steps,
        "model": spec.name_or_path,
    }))


if __name__ == "__main__":
    sys.exit(main())
