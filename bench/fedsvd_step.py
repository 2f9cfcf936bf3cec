"""Per-round FedSVD server step time: factored route vs dense SVD vs torch.svd_lowrank.

The step is what the coordinator runs after a round: B' = B + Σ p_k ΔB_k (head likewise) over the clients'
synthetic deltas, then the re-factorisation of every LoRA pair. Shapes (PEFT key names):

* RoBERTa-large: 24 layers × {query, value}, B 1024 × 8, A 8 × 1024, classifier head (dense 1024² + out_proj);
* LLaMA-7B:      32 layers × {q_proj, v_proj}, B 4096 × 16, A 16 × 4096, score head (2 × 4096).

Routes:

* factored: ``FedSVD.aggregate`` itself, timed end to end (the aggregation / refactor split timed apart);
* lowrank:  aggregation + ``torch.svd_lowrank(B'A, q=r, niter=2)`` per layer (forms the dense product);
  all RoBERTa layers timed, ``--lowrank-layers`` LLaMA layers timed and scaled to all 64 (stated);
* dense:    aggregation + ``torch.linalg.svd`` of the dense product per layer. Far too slow to run on every
  layer: timed on ``--dense-layers`` RoBERTa layers and scaled to 48; for LLaMA shapes ONE 4096² layer is
  timed (last, in a child process) and scaled ×64; if it has not finished when ``--budget-s`` runs out it is
  stopped and the time left is reported as a lower bound (stated in the output).

Times are the best of up to ``--repeats`` runs (medians printed alongside): the machines this runs on are
shared, and the minimum is the least noisy estimate of the cost itself.

Errors are max over layers of ‖B_new A_new − B'A‖_F / ‖B'A‖_F, evaluated in fp64 without forming the product.
Usage: python bench/fedsvd_step.py [--threads 2] [--repeats 5]. The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from fedlora.aggregation.base import ClientUpdate, apply_mean_delta, lora_pairs
from fedlora.aggregation.fedsvd import FedSVD, dense_refactor, lowrank_refactor, refactor_state

SHAPES = {
    "roberta-large": dict(
        layers=24, modules=("query", "value"), d_out=1024, d_in=1024, r=8,
        key="base_model.model.roberta.encoder.layer.{i}.attention.self.{m}.lora_{f}.weight",
        head={
            "base_model.model.classifier.dense.weight": (1024, 1024),
            "base_model.model.classifier.dense.bias": (1024,),
            "base_model.model.classifier.out_proj.weight": (2, 1024),
            "base_model.model.classifier.out_proj.bias": (2,),
        },
    ),
    "llama-7b": dict(
        layers=32, modules=("q_proj", "v_proj"), d_out=4096, d_in=4096, r=16,
        key="base_model.model.model.layers.{i}.self_attn.{m}.lora_{f}.weight",
        head={"base_model.model.score.weight": (2, 4096)},
    ),
}


def build(spec: dict, clients: int, seed: int = 0) -> tuple[dict, list[ClientUpdate]]:
    """A mid-training global state (PEFT Kaiming-uniform A, nonzero B) and ``clients`` synthetic uploads."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    bound = 1.0 / spec["d_in"] ** 0.5
    for i in range(spec["layers"]):
        for m in spec["modules"]:
            a = (torch.rand(spec["r"], spec["d_in"], generator=g) * 2 - 1) * bound  # PEFT's Kaiming-uniform
            state[spec["key"].format(i=i, m=m, f="A")] = a
            state[spec["key"].format(i=i, m=m, f="B")] = torch.randn(spec["d_out"], spec["r"], generator=g) * 1e-2
    for k, shape in spec["head"].items():
        state[k] = torch.randn(*shape, generator=g) * 1e-2
    probe = FedSVD()
    ups = [
        ClientUpdate(
            f"c{c}",
            {k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in state.items() if probe.shares_key(k)},
            num_examples=100 + 37 * c,
        )
        for c in range(clients)
    ]
    return state, ups


def rel_errors(new: dict, old: dict, pairs: dict) -> list[float]:
    """Per layer ‖B1 A1 − B0 A0‖_F / ‖B0 A0‖_F in fp64, without the d_out × d_in product:
    B1A1 − B0A0 = [B1, −B0]·[A1; A0] and, with [A1; A0]ᵀ = QR, ‖G·Hᵀᵀ‖ = ‖G Rᵀ‖ (Q has orthonormal columns)."""
    errs = []
    for a_key, b_key in pairs.values():
        B1, A1 = new[b_key].double(), new[a_key].double()
        B0, A0 = old[b_key].double(), old[a_key].double()
        R = torch.linalg.qr(torch.cat([A1, A0]).mT, mode="r")[1]  # (2r × 2r)
        diff = torch.cat([B1, -B0], dim=1) @ R.mT
        R0 = torch.linalg.qr(A0.mT, mode="r")[1]
        ref = B0 @ R0.mT
        errs.append((diff.norm() / ref.norm()).item() if ref.norm() > 0 else diff.norm().item())
    return errs


def timed(fn, repeats: int, cap_s: float = 20.0) -> tuple[float, float, object]:
    """(median s, min s, last result) over up to ``repeats`` calls after one warm-up call; stops early (after
    at least 3 calls) once ``cap_s`` is spent."""
    out = fn()
    ts: list[float] = []
    t_begin = time.perf_counter()
    for i in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() - t_begin > cap_s:
            break
    return statistics.median(ts), min(ts), out


def per_layer(fn, agg: dict, items: list) -> tuple[float, float]:
    """(median seconds per layer, max rel error) of ``fn`` applied to the (A key, B key) pairs ``items``."""
    per, errs = [], []
    for a_key, b_key in items:
        t0 = time.perf_counter()
        Bn, An = fn(agg[b_key], agg[a_key])
        per.append(time.perf_counter() - t0)
        errs += rel_errors({b_key: Bn, a_key: An}, agg, {"x": (a_key, b_key)})
    return statistics.median(per), max(errs)


def dense_one_in_child(
    B: torch.Tensor, A: torch.Tensor, threads: int, timeout_s: float
) -> tuple[float | None, float | None]:
    """Time ``dense_refactor`` on one layer in a child process (LAPACK cannot be interrupted in-process);
    (seconds, rel error), or (None, None) when it does not finish within ``timeout_s``."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.pt"), os.path.join(tmp, "out.json")
        torch.save({"B": B.clone(), "A": A.clone(), "threads": threads}, src)
        try:
            subprocess.run([sys.executable, __file__, "--_dense-one", src, dst], timeout=timeout_s, check=True)
        except subprocess.TimeoutExpired:
            return None, None
        with open(dst) as f:
            res = json.load(f)
    return res["seconds"], res["err"]


def _dense_one(src: str, dst: str) -> None:
    d = torch.load(src)
    torch.set_num_threads(d["threads"])
    t0 = time.perf_counter()
    Bn, An = dense_refactor(d["B"], d["A"])
    seconds = time.perf_counter() - t0
    err = rel_errors({"b": Bn, "a": An}, {"b": d["B"], "a": d["A"]}, {"x": ("a", "b")})[0]
    with open(dst, "w") as f:
        json.dump({"seconds": seconds, "err": err}, f)


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats of each factored measurement")
    ap.add_argument("--dense-layers", type=int, default=2, help="RoBERTa layers on which the dense SVD is timed")
    ap.add_argument("--lowrank-layers", type=int, default=8, help="LLaMA layers on which svd_lowrank is timed")
    ap.add_argument("--llama-dense", choices=("time", "extrapolate"), default="time",
                    help="time: time one dense 4096² SVD, stopped when --budget-s runs out (then a lower bound)")
    ap.add_argument("--budget-s", type=float, default=170.0, help="overall wall-time budget")
    ap.add_argument("--quick", action="store_true",
                    help="under a minute: 2 repeats, 1 dense RoBERTa layer, 4 lowrank LLaMA layers, "
                         "LLaMA dense extrapolated")
    ap.add_argument("--_dense-one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.dense_layers, args.lowrank_layers, args.llama_dense = 2, 1, 4, "extrapolate"
        args.budget_s = min(args.budget_s, 50.0)
    if args._dense_one:
        return _dense_one(*args._dense_one)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # svd_lowrank's random test matrices
    t_start = time.perf_counter()
    load_start = loadavg()

    rows: list[dict] = []
    max_err_factored = 0.0
    dense_layer_s: dict[str, float] = {}
    keep: dict[str, tuple] = {}  # one aggregated LLaMA pair for the dense timing at the end

    for shape_name, spec in SHAPES.items():
        n_layers = spec["layers"] * len(spec["modules"])
        for clients in (3, 10):
            g, ups = build(spec, clients)
            pairs = lora_pairs(g)
            items = list(pairs.values())
            strat = FedSVD()
            step_med, step_min, new = timed(lambda s=strat, g=g, u=ups: s.aggregate(g, u), args.repeats)
            agg_med, agg_min, agg = timed(lambda s=strat, g=g, u=ups: apply_mean_delta(s, g, u), args.repeats)
            ref_med, ref_min, _ = timed(lambda a=agg: refactor_state(a), args.repeats)
            err = max(rel_errors(new, agg, pairs))
            max_err_factored = max(max_err_factored, err)
            base = dict(shape=shape_name, clients=clients, agg_s=agg_min, agg_med_s=agg_med)
            rows.append(dict(base, route="factored", refactor_s=ref_min, refactor_med_s=ref_med, step_s=step_min,
                             step_med_s=step_med, err=err, how="FedSVD.aggregate end to end"))
            if clients == 3:  # the refactor routes do not depend on the number of clients: time them once
                if shape_name == "roberta-large":
                    lr_items, d_items = items, items[: args.dense_layers]
                else:
                    lr_items, d_items = items[: args.lowrank_layers], []
                    keep[shape_name] = (agg, items[0])
                lr_per, lr_err = per_layer(lowrank_refactor, agg, lr_items)
                lr_how = (f"aggregation + svd_lowrank(q=r, niter=2) on the dense product, {len(lr_items)} layers timed"
                          + (f", x{n_layers} extrapolated" if len(lr_items) < n_layers else ""))
                if d_items:
                    dense_layer_s[shape_name], d_err = per_layer(dense_refactor, agg, d_items)
                    d_how = (f"aggregation + dense torch.linalg.svd timed on {len(d_items)} layer(s), "
                             f"x{n_layers} extrapolated")
            rows.append(dict(base, route="lowrank", refactor_s=lr_per * n_layers, step_s=agg_min + lr_per * n_layers,
                             err=lr_err, how=lr_how))
            if shape_name == "roberta-large":
                rows.append(dict(base, route="dense", refactor_s=dense_layer_s[shape_name] * n_layers,
                                 step_s=agg_min + dense_layer_s[shape_name] * n_layers, err=d_err, how=d_how))
            del g, ups, new

    # LLaMA dense: ONE 4096² layer, timed last, in a child process killed when the budget runs out
    spec = SHAPES["llama-7b"]
    n_layers = spec["layers"] * len(spec["modules"])
    predicted = dense_layer_s["roberta-large"] * (spec["d_out"] / 1024) ** 3
    left = max(10.0, args.budget_s - (time.perf_counter() - t_start))
    d_err, lower_bound = None, False
    if args.llama_dense == "extrapolate":
        dense_layer_s["llama-7b"] = predicted
        d_how = (f"NOT timed: RoBERTa dense layer time x (4096/1024)³ = {predicted:.0f} s/layer, "
                 f"x{n_layers} extrapolated")
    else:
        agg, (a_key, b_key) = keep["llama-7b"]
        t_layer, d_err = dense_one_in_child(agg[b_key], agg[a_key], args.threads, left)
        if t_layer is None:
            lower_bound = True
            dense_layer_s["llama-7b"] = left
            d_how = (f"ONE dense 4096² SVD did not finish in the {left:.0f} s left of the budget: "
                     f">= {left:.0f} s/layer, x{n_layers} = LOWER BOUND "
                     f"(RoBERTa-based O(n³) estimate {predicted:.0f} s/layer)")
        else:
            dense_layer_s["llama-7b"] = t_layer
            d_how = f"aggregation + ONE dense 4096² torch.linalg.svd timed ({t_layer:.1f} s), x{n_layers} extrapolated"
    llama_dense_timed = d_err is not None
    for clients in (3, 10):
        agg_min = next(r["agg_s"] for r in rows if r["shape"] == "llama-7b" and r["clients"] == clients)
        rows.append(dict(shape="llama-7b", clients=clients, route="dense", agg_s=agg_min,
                         refactor_s=dense_layer_s["llama-7b"] * n_layers,
                         step_s=agg_min + dense_layer_s["llama-7b"] * n_layers, err=d_err, how=d_how))

    # ---- report -----------------------------------------------------------------------------------
    order = {"factored": 0, "lowrank": 1, "dense": 2}
    rows.sort(key=lambda r: (list(SHAPES).index(r["shape"]), r["clients"], order[r["route"]]))
    fact = {(r["shape"], r["clients"]): r["step_s"] for r in rows if r["route"] == "factored"}
    print(f"FedSVD server step = aggregate the clients' deltas (B and head) + refactor every LoRA pair; "
          f"torch threads = {args.threads}; load average at start {load_start}, now {loadavg()}")
    print(f"times: best of up to {args.repeats} (median in brackets, factored only); "
          "the machine is shared, medians are noisy")
    hdr = (f"{'shape':<14}{'clients':>7}  {'route':<9}{'agg s':>8}{'refactor s':>20}{'step s':>20}"
           f"{'x factored':>11}{'max rel err':>12}  how")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        ratio = r["step_s"] / fact[(r["shape"], r["clients"])]
        err = "n/a" if r["err"] is None else f"{r['err']:.1e}"
        ref = f"{r['refactor_s']:.4f}" + (f" [{r['refactor_med_s']:.4f}]" if "refactor_med_s" in r else "")
        step = f"{r['step_s']:.4f}" + (f" [{r['step_med_s']:.4f}]" if "step_med_s" in r else "")
        print(f"{r['shape']:<14}{r['clients']:>7}  {r['route']:<9}{r['agg_s']:>8.4f}{ref:>20}{step:>20}"
              f"{ratio:>10.1f}x{err:>12}  {r['how']}")

    def pick(shape, clients, route, field="step_s"):
        return next(r[field] for r in rows if r["shape"] == shape and r["clients"] == clients and r["route"] == route)

    for shape_name in SHAPES:
        for clients in (3, 10):
            f = pick(shape_name, clients, "factored")
            dense, lowrank = pick(shape_name, clients, "dense"), pick(shape_name, clients, "lowrank")
            print(f"{shape_name:<14} {clients:>2} clients: factored {f:.4f} s | dense/factored {dense / f:,.0f}x"
                  f" | lowrank/factored {lowrank / f:,.1f}x")
    total = time.perf_counter() - t_start
    print(f"bench wall time {total:.1f} s")
    summary = dict(
        threads=args.threads,
        speedup_vs_dense=pick("roberta-large", 3, "dense") / pick("roberta-large", 3, "factored"),
        speedup_vs_lowrank=pick("roberta-large", 3, "lowrank") / pick("roberta-large", 3, "factored"),
        max_rel_error=max_err_factored,
        roberta_step_s={str(c): pick("roberta-large", c, "factored") for c in (3, 10)},
        llama7b_step_s=pick("llama-7b", 10, "factored"),
        llama7b_step_s_3clients=pick("llama-7b", 3, "factored"),
        llama7b_step_median_s=pick("llama-7b", 10, "factored", "step_med_s"),
        llama7b_speedup_vs_dense=pick("llama-7b", 10, "dense") / pick("llama-7b", 10, "factored"),
        llama7b_dense_layer_timed=llama_dense_timed,
        llama7b_dense_is_lower_bound=lower_bound,
        dense_extrapolated=True,
        timing="best of repeats",
        loadavg_start=load_start,
        wall_s=round(total, 1),
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
