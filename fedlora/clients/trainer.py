"""The client's local training loop: plain SGD/Adam, or record-level DP-SGD through ``fedlora.privacy``."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch

from fedlora.privacy.dp import DPPlan, PrivateTrainer, poisson_batches, trainable
from fedlora.task.model import model_device, to_device
from fedlora.task.train import make_collate, make_optimizer


@dataclass
class TrainResult:
    loss: float  # mean training loss over the steps that saw data (nan when no batch held data)
    steps: int  # optimizer steps taken (DP: including empty Poisson batches)
    examples: int  # the client's training-set size
    seconds: float


def train_local(
    model,
    examples: list[dict],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    pad_id: int,
    dp: DPPlan | None = None,
    optimizer: str = "sgd",
) -> TrainResult:
    """Exactly ``steps`` optimizer steps (lr ``lr``) on the parameters that have ``requires_grad=True``.

    Without ``dp``: seeded shuffled batches of ``batch_size``, cycling through ``examples``.
    With ``dp`` (a ``DPPlan``: σ, q, clip, engine and noise source — the caller charged the privacy ledger for
    these steps before calling): DP-SGD with Poisson sampling at q and Gaussian noise from ``dp.noise``.
    The model is in train mode during, eval mode after. Dropout and shuffling are seeded by ``seed``."""
    if steps < 0 or batch_size < 1:
        raise ValueError(f"train_local: steps={steps}, batch_size={batch_size}")
    if not examples:
        raise ValueError("train_local: no training examples")
    t0 = time.perf_counter()
    n = len(examples)
    params = [p for _, p in trainable(model)]
    if not params:
        raise ValueError("train_local: the model has no trainable parameter (call set_trainable first)")
    opt = make_optimizer(optimizer, params, lr)
    device = model_device(model)
    batches = make_collate(pad_id)

    def collate(records: list[dict]) -> dict[str, torch.Tensor]:  # records stay on CPU; each batch moves once
        return to_device(batches(records), device)

    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        try:
            if dp is None:
                _sgd(model, opt, examples, collate, steps=steps, batch_size=min(batch_size, n), seed=seed,
                     losses=losses)
            else:
                _dp_sgd(model, opt, examples, collate, steps=steps, plan=dp, losses=losses)
        finally:
            model.eval()
    loss = sum(losses) / len(losses) if losses else math.nan
    return TrainResult(loss, steps, n, time.perf_counter() - t0)


def _sgd(model, opt, examples, collate, *, steps, batch_size, seed, losses) -> None:
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            extra = list(range(len(examples)))
            rng.shuffle(extra)
            order += extra
        idx, order = order[:batch_size], order[batch_size:]
        batch = collate([examples[i] for i in idx])
        labels = batch.pop("labels")
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    opt.zero_grad(set_to_none=True)


def _dp_sgd(model, opt, examples, collate, *, steps: int, plan: DPPlan, losses: list[float]) -> None:
    n = len(examples)
    with PrivateTrainer(
        model,
        opt,
        noise_multiplier=plan.noise_multiplier,
        clip=plan.clip,
        expected_batch_size=plan.sample_rate * n,
        grad_sample_mode=plan.grad_sample_mode,
        noise=plan.noise,
    ) as dp:
        for idx in poisson_batches(n, sample_rate=plan.sample_rate, steps=steps, source=plan.noise):
            value = dp.step(collate([examples[i] for i in idx]))
            if value is not None:
                losses.append(value)
