"""Local training (plain SGD, or record-level DP-SGD through fedlora.privacy) and evaluation."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch


def make_collate(pad_id: int):
    """Collate [{"input_ids": list[int], "labels": int}, ...] into dynamically padded tensors
    {input_ids, attention_mask, labels}. An empty list (a Poisson batch can be empty) gives tensors with batch
    dimension 0."""

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        n = max((len(b["input_ids"]) for b in batch), default=1)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.as_tensor(b["input_ids"], dtype=torch.long)
            mask[i, :k] = 1
        labels = torch.tensor([int(b["labels"]) for b in batch], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


@dataclass
class TrainResult:
    loss: float  # mean training loss over the steps that saw data (nan when declined / no data)
    steps: int  # optimizer steps taken (DP: including empty Poisson batches)
    examples: int  # the client's training-set size
    seconds: float
    epsilon: float | None = None  # the client's ε after this round (DP only)
    declined: str | None = None  # why no training happened (privacy budget)


OPTIMIZERS = ("sgd", "adam")


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The client's local optimizer, fresh every round (no state crosses rounds or clients). Under DP, Opacus'
    DPOptimizer wraps it: clipping and noise happen before its step, so Adam on privatised gradients is
    post-processing and costs no privacy."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"strategy.optimizer={name!r}: allowed values are {list(OPTIMIZERS)}")


def _trainable(model) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_local: the model has no trainable parameter (call set_trainable first)")
    return params


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

    params = _trainable(model)
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


@torch.inference_mode()
def evaluate(model, examples: list[dict], *, batch_size: int = 128, pad_id: int = 0) -> dict:
    """Mean cross-entropy loss and accuracy of ``model`` on ``examples`` (eval mode, no gradients).

    Batches are cut from the examples sorted by length, so each is padded only to its own longest record
    (far fewer pad tokens than random batches on short-sentence corpora); the result is order-independent."""
    collate = make_collate(pad_id)
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    correct, loss_sum = 0, 0.0
    for i in range(0, len(order), batch_size):
        b = collate([examples[j] for j in order[i : i + batch_size]])
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss_sum += float(torch.nn.functional.cross_entropy(logits, b["labels"], reduction="sum"))
        correct += int((logits.argmax(-1) == b["labels"]).sum())
    n = len(examples)
    return {"loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1), "n": n}
