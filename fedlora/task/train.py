"""The task's training pieces shared by both sides: batching (collate), the optimizers, and evaluation
(the server evaluates the global model with the same code the clients use on their validation splits)."""

from __future__ import annotations

import torch


def record_length(record: dict) -> int:
    """Tokens in a record: token ids, or cached hidden states ([T, H]) of the frozen prefix."""
    return int(record["hidden"].shape[0]) if "hidden" in record else len(record["input_ids"])


def make_collate(pad_id: int):
    """Collate records into dynamically padded tensors: token records {"input_ids": list[int], "labels": int} into
    {input_ids, attention_mask, labels}; cached records {"hidden": [T, H], "labels"} (``task.cache``) into
    {hidden, attention_mask, labels} (zeros at padded positions, which the mask hides). An empty list (a Poisson
    batch can be empty) gives tensors with batch dimension 0."""

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        n = max((record_length(b) for b in batch), default=1)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        labels = torch.tensor([int(b["labels"]) for b in batch], dtype=torch.long)
        if batch and "hidden" in batch[0]:
            hidden = torch.zeros((len(batch), n, batch[0]["hidden"].shape[-1]), dtype=batch[0]["hidden"].dtype)
            for i, b in enumerate(batch):
                k = b["hidden"].shape[0]
                hidden[i, :k] = b["hidden"]
                mask[i, :k] = 1
            return {"hidden": hidden, "attention_mask": mask, "labels": labels}
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.as_tensor(b["input_ids"], dtype=torch.long)
            mask[i, :k] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


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


@torch.inference_mode()
def evaluate(model, examples: list[dict], *, batch_size: int = 128, pad_id: int = 0) -> dict:
    """Mean cross-entropy loss and accuracy of ``model`` (a classifier, or a ``CachedSuffix`` for cached records)
    on ``examples`` (eval mode, no gradients).

    Batches are cut from the examples sorted by length, so each is padded only to its own longest record
    (far fewer pad tokens than random batches on short-sentence corpora); the result is order-independent."""
    from fedlora.task.model import model_device, to_device

    collate = make_collate(pad_id)
    device = model_device(model)
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: record_length(examples[i]))
    correct, loss_sum = 0, 0.0
    for i in range(0, len(order), batch_size):
        b = to_device(collate([examples[j] for j in order[i : i + batch_size]]), device)
        labels = b.pop("labels")
        logits = model(**b).logits
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
    n = len(examples)
    return {"loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1), "n": n}
