"""The shared task pieces: dynamic-padding collate and the length-sorted evaluation."""

from __future__ import annotations

import pytest
import torch

from fedlora.task.model import ModelSpec, build_model
from fedlora.task.train import evaluate, make_collate
from tests.clients.test_trainer import first_token_task


@pytest.fixture(scope="module")
def model():
    return build_model(ModelSpec(name_or_path="tiny-bert"), num_labels=2, seed=0)


def test_collate_pads_dynamically_and_handles_empty_batches():
    c = make_collate(pad_id=7)
    b = c([{"input_ids": [1, 2, 3], "labels": 1}, {"input_ids": [4], "labels": 0}])
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [1, 0] and b["labels"].dtype == torch.long
    e = c([])
    assert e["input_ids"].shape[0] == 0 and e["attention_mask"].shape[0] == 0 and e["labels"].shape == (0,)


def test_evaluate(model):
    data = first_token_task(50, 5)
    model.train()
    out = evaluate(model, data, batch_size=16, pad_id=0)
    assert set(out) == {"loss", "accuracy", "n"} and out["n"] == 50
    assert not model.training
    with torch.no_grad():
        b = make_collate(0)(data)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert out["accuracy"] == pytest.approx(float((logits.argmax(-1) == b["labels"]).float().mean()))
    assert out["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, b["labels"])), rel=1e-5)
