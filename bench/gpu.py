"""Client training throughput on a device (GPU when there is one): samples/s of the client's real training path
(``clients.trainer.train_local``: collate on CPU, one move per batch, Opacus DP-SGD with CSPRNG noise) for

* the default model (packaged all-MiniLM-L6-v2 + LoRA r=8, every layer), without and with DP;
* a 12-layer BERT-base-sized encoder (hidden 768, 12 heads; random weights saved to a local folder and loaded
  through the same ``from_pretrained`` path as a hub model: no hub here) under DP with batch >= 256.

Records are random token ids of ``--seq`` tokens. Each row: one warm-up call, then ``--steps`` timed steps.

    .venv/bin/python bench/gpu.py [--device auto] [--steps 10] [--seq 64] [--batch 256] [--quick]

Last line: a JSON object (device, torch/CUDA versions, one entry per row).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fedlora.env import apply_offline_env  # noqa: E402

apply_offline_env()

import torch  # noqa: E402

from fedlora.clients.trainer import train_local  # noqa: E402
from fedlora.privacy.dp import DPPlan  # noqa: E402
from fedlora.privacy.noise import SecureNoise  # noqa: E402
from fedlora.task.model import ModelSpec, build_model, resolve_device, resolve_path, set_trainable  # noqa: E402


def bert_base_folder(dst: Path) -> str:
    """A 12-layer, 768-wide BERT classifier (random weights) with MiniLM's tokenizer, saved as a local model."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    src = resolve_path(ModelSpec().name_or_path)
    cfg = BertConfig(vocab_size=AutoTokenizer.from_pretrained(src).vocab_size, hidden_size=768,
                     num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return str(dst)


def records(n: int, seq: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (n, seq), generator=g)
    return [{"input_ids": row.tolist(), "labels": i % 2} for i, row in enumerate(ids)]


def measure(name_or_path: str, *, dp: bool, batch: int, steps: int, seq: int, device: torch.device) -> dict:
    spec = ModelSpec(name_or_path=name_or_path, max_length=seq, cache=False)
    model = build_model(spec, num_labels=2, seed=0, device=device)
    set_trainable(model, lambda k: "lora_" in k or "classifier" in k)
    data = records(4 * batch, seq, model.config.vocab_size)
    plan = None
    if dp:  # q = batch / n: Poisson batches of `batch` records on average
        plan = DPPlan(noise_multiplier=1.0, sample_rate=batch / len(data), clip=1.0, grad_sample_mode="hooks",
                      noise=SecureNoise())

    def run(k: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_local(model, data, steps=k, batch_size=batch, lr=0.01, seed=0, pad_id=0, dp=plan, optimizer="sgd")
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(1)  # warm-up: kernels, Opacus hooks, allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = run(steps)
    row = {"model": Path(name_or_path).name if "/" in name_or_path else name_or_path, "dp": dp, "batch": batch,
           "seq": seq, "steps": steps, "seconds": round(seconds, 3),
           "samples_per_s": round(steps * batch / seconds, 1)}
    if device.type == "cuda":
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256, help="DP batch (>= 256 for the large model)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: 1 step, batch 8, seq 16")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.batch, args.seq = 1, 8, 16
    device = resolve_device(args.device, key="--device")
    if device.type == "cpu":
        torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="fedlora-gpu-"))
    try:
        base = bert_base_folder(tmp / "bert-base-12l")
        default = ModelSpec().name_or_path
        rows = [measure(default, dp=False, batch=args.batch, steps=args.steps, seq=args.seq, device=device),
                measure(default, dp=True, batch=args.batch, steps=args.steps, seq=args.seq, device=device),
                measure(base, dp=True, batch=args.batch, steps=args.steps, seq=args.seq, device=device)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name} (torch {torch.__version__}, CUDA {torch.version.cuda})", file=sys.stderr)
    print(f"{'model':28} {'DP':>3} {'batch':>6} {'samples/s':>10}", file=sys.stderr)
    for r in rows:
        print(f"{r['model']:28} {'yes' if r['dp'] else 'no':>3} {r['batch']:>6} {r['samples_per_s']:>10}",
              file=sys.stderr)
    print(json.dumps({"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "rows": rows}))


if __name__ == "__main__":
    main()
