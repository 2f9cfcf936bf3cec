"""The frozen-prefix cache: the cached suffix gives the full model's logits and per-sample gradients (dropout off in
the frozen layers), and an entry is rebuilt — never reused — when model, data, max_length or k change."""

from __future__ import annotations

import random

import pytest
import torch

from fedlora.task import cache as cache_mod
from fedlora.task.cache import CachedSuffix, cached_records
from fedlora.task.model import ModelSpec, build_model, set_trainable
from fedlora.task.train import make_collate

B_AND_HEAD = lambda k: "lora_B" in k or "classifier" in k  # noqa: E731


def _records(n: int, seed: int, max_len: int = 12) -> list[dict]:
    r = random.Random(seed)
    return [{"input_ids": [101] + [r.randrange(1000, 5000) for _ in range(r.randint(3, max_len))] + [102],
             "labels": r.randint(0, 1)} for _ in range(n)]


def _model(pooling: str, seed: int = 0):
    model = build_model(ModelSpec(name_or_path="tiny-bert", lora_layers=(1,), pooling=pooling), num_labels=2,
                        seed=seed)
    with torch.no_grad():  # make B non-zero so LoRA changes the output
        for k, p in model.named_parameters():
            if "lora_B" in k:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_cached_suffix_gives_the_full_models_eval_logits(tmp_path, pooling):
    model = _model(pooling).eval()
    recs = _records(20, 0)
    cached = cached_records(model, 1, recs, cache_dir=tmp_path, pad_id=0)
    suffix = CachedSuffix(model, 1, pooling).eval()
    full_b = make_collate(0)(recs)
    cached_b = make_collate(0)(cached)
    with torch.no_grad():
        full = model(input_ids=full_b["input_ids"], attention_mask=full_b["attention_mask"]).logits
        fast = suffix(hidden=cached_b["hidden"], attention_mask=cached_b["attention_mask"]).logits
    assert torch.allclose(full, fast, atol=1e-6, rtol=0), (full - fast).abs().max()


def _per_sample_grads(forward, batch, params, seed: int):
    out = []
    for i in range(batch["labels"].shape[0]):
        one = {k: v[i : i + 1] for k, v in batch.items() if k != "labels"}
        torch.manual_seed(seed + i)  # the same dropout draws on both paths
        loss = torch.nn.functional.cross_entropy(forward(**one).logits, batch["labels"][i : i + 1])
        out.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(out)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_cached_suffix_gives_the_per_sample_gradients_of_the_full_model_with_dropout_off_below(tmp_path, pooling):
    model = _model(pooling)
    set_trainable(model, B_AND_HEAD)
    params = [p for p in model.parameters() if p.requires_grad]
    recs = _records(8, 1)
    cached = cached_records(model, 1, recs, cache_dir=tmp_path, pad_id=0)
    suffix = CachedSuffix(model, 1, pooling)
    model.train()  # dropout on ...
    enc = model.get_base_model().bert
    enc.embeddings.eval()  # ... except in the frozen prefix (what the cache computed)
    enc.encoder.layer[0].eval()
    full = _per_sample_grads(model, make_collate(0)(recs), params, seed=7)
    fast = _per_sample_grads(suffix, make_collate(0)(cached), params, seed=7)
    assert full.abs().sum() > 0
    assert torch.allclose(full, fast, atol=1e-6, rtol=0), (full - fast).abs().max()


def test_an_entry_is_rebuilt_when_model_data_max_length_or_k_change(tmp_path, monkeypatch):
    computed = []
    real = cache_mod._compute
    monkeypatch.setattr(cache_mod, "_compute", lambda *a, **kw: computed.append(1) or real(*a, **kw))
    cache_mod._MEMORY.clear()
    model = _model("mean")
    recs = _records(10, 2)

    def entries():
        return sorted(p.name for p in tmp_path.glob("*.pt"))

    a = cached_records(model, 1, recs, cache_dir=tmp_path, pad_id=0)
    cache_mod._MEMORY.clear()
    b = cached_records(model, 1, recs, cache_dir=tmp_path, pad_id=0)  # same key: read from disk, not recomputed
    assert len(computed) == 1 and len(entries()) == 1
    assert all(torch.equal(x["hidden"], y["hidden"]) for x, y in zip(a, b))
    cached_records(model, 1, _records(10, 3), cache_dir=tmp_path, pad_id=0)  # other data
    cached_records(model, 1, [{**r, "input_ids": r["input_ids"][:5]} for r in recs], cache_dir=tmp_path,
                   pad_id=0)  # a shorter max_length truncates the token ids
    cached_records(model, 2, recs, cache_dir=tmp_path, pad_id=0)  # another k
    cached_records(_model("mean", seed=1), 1, recs, cache_dir=tmp_path, pad_id=0)  # other prefix weights
    assert len(computed) == 5 and len(entries()) == 5
