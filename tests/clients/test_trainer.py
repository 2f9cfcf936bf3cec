"""Local training: exact step counts, DP-SGD through the ledger, the Opacus+PEFT trap, reuse."""

from __future__ import annotations

import math
import random

import pytest
import torch

from fedlora.clients.trainer import train_local
from fedlora.privacy.dp import DPPlan, leftover_dp_state
from fedlora.privacy.noise import SecureNoise, SeededNoise
from fedlora.task.model import ModelSpec, adapter_state, build_model, load_adapter_state, set_trainable
from fedlora.task.train import evaluate, make_collate

torch.set_num_threads(1)

FFA = lambda k: "lora_B" in k  # noqa: E731 - FFA-LoRA: only B trained, head frozen
B_AND_HEAD = lambda k: "lora_B" in k or "classifier" in k  # noqa: E731
MODES = ["hooks", "ghost", "lora_fast"]


def first_token_task(n: int, seed: int) -> list[dict]:
    """Separable: the label is the token right after [CLS] is replaced by (1000 + label); the rest is noise."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        y = r.randint(0, 1)
        ids = [1000 + y] + [r.randrange(2000, 2100) for _ in range(r.randint(4, 10))] + [102]
        out.append({"input_ids": ids, "labels": y})
    return out


@pytest.fixture(scope="module")
def built():
    model = build_model(ModelSpec(name_or_path="tiny-bert"), num_labels=2, seed=0)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def model(built):
    model, init = built
    model.load_state_dict(init)
    model.eval()
    return model


def _plan(mode="hooks", *, sigma=1.0, q=0.1, clip=1.0, seed: int | None = 0) -> DPPlan:
    """A DP-SGD round's plan; seeded noise (reproducible) unless ``seed`` is None (the OS CSPRNG)."""
    noise = SecureNoise() if seed is None else SeededNoise(seed)
    return DPPlan(noise_multiplier=sigma, sample_rate=q, clip=clip, grad_sample_mode=mode, noise=noise)


@pytest.mark.parametrize("dp", [False, True])
def test_runs_exactly_the_requested_steps(model, monkeypatch, dp):
    calls = []
    real_step = torch.optim.SGD.step

    def counting_step(self, *a, **kw):
        calls.append(1)
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.SGD, "step", counting_step)
    set_trainable(model, FFA)
    data = first_token_task(30, 0)
    if dp:  # q = 1/30: most Poisson batches are empty or hold one record; each still is a step
        res = train_local(model, data, steps=11, batch_size=1, lr=0.1, seed=0, pad_id=0, dp=_plan(q=1 / 30))
    else:  # 11 steps of 8 cycle the 30 records three times
        res = train_local(model, data, steps=11, batch_size=8, lr=0.1, seed=0, pad_id=0)
    assert len(calls) == 11 and res.steps == 11 and res.examples == 30
    if not dp:  # (under DP at q = 1/30 every batch may be empty, and the loss then nan)
        assert math.isfinite(res.loss)
    assert not model.training


@pytest.mark.parametrize("mode", MODES)
def test_dp_updates_only_trained_lora_params(model, mode):
    """The Opacus+PEFT trap (opacus#820) with the pinned versions: under DP the trained factors (FFA: lora_B)
    change, everything else is bit-identical, everything is finite."""
    trained = set(set_trainable(model, FFA))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = first_token_task(40, 1)
    res = train_local(model, data, steps=4, batch_size=8, lr=0.5, seed=3, pad_id=0,
                      dp=_plan(mode, sigma=0.5, q=0.2, seed=None))
    assert res.steps == 4
    after = model.state_dict()
    adapter_keys = set(adapter_state(model))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    lora_b = {k for k in after if "lora_B" in k}
    assert changed == lora_b and len(lora_b) == len(trained) == 4
    assert {k for k in adapter_keys if "lora_A" in k or "classifier" in k}.isdisjoint(changed)
    assert leftover_dp_state(model) == []


def test_dp_with_huge_epsilon_learns_like_plain_sgd(model):
    """σ tiny, clip above every per-sample norm: DP-SGD reaches the accuracy plain SGD does."""
    train, test = first_token_task(200, 0), first_token_task(200, 1)
    set_trainable(model, B_AND_HEAD)
    start = adapter_state(model)
    acc0 = evaluate(model, test, pad_id=0)["accuracy"]
    plain = train_local(model, train, steps=40, batch_size=20, lr=2.0, seed=0, pad_id=0)
    acc_plain = evaluate(model, test, pad_id=0)["accuracy"]
    accs = {}
    for mode in ("hooks", "lora_fast"):
        load_adapter_state(model, start)
        train_local(model, train, steps=40, batch_size=20, lr=2.0, seed=0, pad_id=0,
                    dp=_plan(mode, sigma=1e-3, q=0.1, clip=10.0))  # a vacuous guarantee, as intended here
        accs[mode] = evaluate(model, test, pad_id=0)["accuracy"]
    assert acc0 < 0.6  # the task is not solved before training ...
    assert acc_plain >= 0.95 and plain.loss < 0.6  # ... plain SGD solves it ...
    for mode, acc in accs.items():
        assert acc >= acc_plain - 0.05, (mode, acc, acc_plain)  # ... and so does DP-SGD at huge ε


@pytest.mark.parametrize("dp", [False, True])
def test_adam_learns_with_and_without_dp(model, dp):
    """The default client optimizer: Adam (wrapped by Opacus' DPOptimizer under DP) solves the task."""
    train, test = first_token_task(200, 0), first_token_task(200, 1)
    set_trainable(model, B_AND_HEAD)
    plan = _plan("lora_fast", sigma=1e-3, q=0.1, clip=10.0) if dp else None
    res = train_local(model, train, steps=40, batch_size=20, lr=0.02, seed=0, pad_id=0, optimizer="adam", dp=plan)
    assert res.steps == 40
    assert evaluate(model, test, pad_id=0)["accuracy"] >= 0.95


def test_unknown_optimizer_is_refused(model):
    set_trainable(model, FFA)
    with pytest.raises(ValueError, match=r"strategy.optimizer='lbfgs'.*allowed values"):
        train_local(model, first_token_task(10, 0), steps=1, batch_size=2, lr=0.1, seed=0, pad_id=0, optimizer="lbfgs")


def test_model_is_reusable_after_dp_rounds(model):
    set_trainable(model, FFA)
    data = first_token_task(40, 2)
    for seed in range(2):  # two DP rounds on the same model object (Opacus refuses hooks added twice)
        res = train_local(model, data, steps=2, batch_size=8, lr=0.1, seed=seed, pad_id=0, dp=_plan(q=0.2))
        assert res.steps == 2
        assert leftover_dp_state(model) == []
    train_local(model, data, steps=2, batch_size=8, lr=0.1, seed=5, pad_id=0, dp=_plan("ghost", q=0.2))
    train_local(model, data, steps=2, batch_size=8, lr=0.1, seed=6, pad_id=0)  # and a plain round after
    model.train()
    b = make_collate(0)(data[:4])
    loss = torch.nn.functional.cross_entropy(model(input_ids=b["input_ids"]).logits, b["labels"])
    loss.backward()
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())
    assert leftover_dp_state(model) == []
    model.zero_grad(set_to_none=True)


def test_dp_noise_is_unknowable_unless_explicitly_seeded(model, built):
    """The same start, data and seed: the OS-CSPRNG source gives different updates every time (the server
    cannot regenerate the noise); only the explicit seeded source reproduces them bit for bit."""
    set_trainable(model, FFA)
    data = first_token_task(40, 4)
    outs = {}
    for name, noise_seed in (("secure-a", None), ("secure-b", None), ("seeded-a", 7), ("seeded-b", 7),
                             ("seeded-c", 8)):
        model.load_state_dict(built[1])
        train_local(model, data, steps=3, batch_size=8, lr=0.5, seed=7, pad_id=0,
                    dp=_plan(sigma=0.7, q=0.2, seed=noise_seed))
        outs[name] = adapter_state(model)

    def same(a, b):
        return all(torch.equal(outs[a][k], outs[b][k]) for k in outs[a])

    assert not same("secure-a", "secure-b")
    assert same("seeded-a", "seeded-b") and not same("seeded-a", "seeded-c")
