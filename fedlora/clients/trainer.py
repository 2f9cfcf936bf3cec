"""The client's local training loop: plain SGD/Adam, or record-level DP-SGD through ``fedlora.privacy``."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch

from fedlora.privacy.dp import trainable
from fedlora.task.train import make_collate, make_optimizer


@dataclass
class TrainResult:
    loss: float  # mean training loss over the steps that saw data (nan when declined / no data)
    steps: int  # optimizer steps taken (DP: including empty Poisson batches)
    examples: int  # the client's training-set size
    seconds: float
    epsilon: float | None = None  # the client's ε after this round (DP only)
    declined: str | None = None  # why no training happened (privacy budget)




def train_local(
    model,
    examples: list[dict],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    pad_id: int,
    privacy=None,
    ledger=None,
    optimizer: str = "sgd",
) -> TrainResult:
    """Exactly ``steps`` SGD steps (lr ``lr``) on the parameters that have ``requires_grad=True``.

    Without privacy: seeded shuffled batches of ``batch_size``, cycling through ``examples``.
    With ``privacy`` (DPSettings) and ``ledger`` (PrivacyLedger): declines (no training) when the ledger says the
    round would pass the target ε; else DP-SGD with Poisson sampling q = ledger.sample_rate, σ =
    ledger.noise_multiplier, clip = privacy.clip, then ``ledger.record(steps)``.
    The model is in train mode during, eval mode after. Dropout and sampling are seeded by ``seed``."""
    if (privacy is None) != (ledger is None):
        raise ValueError("train_local: pass both privacy and ledger for DP training, or neither")
    if steps < 0 or batch_size < 1:
        raise ValueError(f"train_local: steps={steps}, batch_size={batch_size}")
    if not examples:
        raise ValueError("train_local: no training examples")
    t0 = time.perf_counter()
    n = len(examples)
    if ledger is not None:
        reason = ledger.decline_reason(steps)
        if reason is not None:
            model.eval()
            return TrainResult(math.nan, 0, n, time.perf_counter() - t0, ledger.epsilon(), reason)

    params = [p for _, p in trainable(model)]
    if not params:
        raise ValueError("train_local: the model has no trainable parameter (call set_trainable first)")
    opt = make_optimizer(optimizer, params, lr)
    collate = make_collate(pad_id)
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        try:
            if ledger is None:
                _sgd(model, opt, examples, collate, steps=steps, batch_size=min(batch_size, n), seed=seed,
                     losses=losses)
            else:
                _dp_sgd(model, opt, examples, collate, steps=steps, seed=seed, privacy=privacy, ledger=ledger,
                        losses=losses)
        finally:
            model.eval()
    epsilon = None
    if ledger is not None:
        ledger.record(steps)
        epsilon = ledger.epsilon()
    loss = sum(losses) / len(losses) if losses else math.nan
    return TrainResult(loss, steps, n, time.perf_counter() - t0, epsilon, None)


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


def _dp_sgd(model, opt, examples, collate, *, steps, seed, privacy, ledger, losses) -> None:
    from fedlora.privacy.dp import PrivateTrainer, poisson_batches

    n = len(examples)
    if ledger.n is not None and ledger.n != n:
        raise ValueError(
            f"the privacy ledger was made for n={ledger.n} records, this client now has {n}: its sample rate "
            "q = batch/n would be wrong"
        )
    q = ledger.sample_rate
    with PrivateTrainer(
        model,
        opt,
        noise_multiplier=ledger.noise_multiplier,
        clip=privacy.clip,
        expected_batch_size=q * n,
        grad_sample_mode=privacy.grad_sample_mode,
        seed=seed,
    ) as dp:
        for idx in poisson_batches(n, sample_rate=q, steps=steps, seed=seed):
            value = dp.step(collate([examples[i] for i in idx]))
            if value is not None:
                losses.append(value)
