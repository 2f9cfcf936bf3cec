"""Local training: exact step counts, DP-SGD through the ledger, the Opacus+PEFT trap, reuse."""

from __future__ import annotations

import math
import random

import pytest
import torch

from fedlora.clients.trainer import train_local
from fedlora.privacy.calibrate import DPSettings
from fedlora.privacy.dp import leftover_dp_state
from fedlora.privacy.ledger import PrivacyLedger
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


def _dp(mode="hooks", **kw) -> DPSettings:
    base = dict(epsilon=1e6, delta=1e-4, clip=1.0, accountant="rdp", noise_multiplier=1.0, grad_sample_mode=mode)
    return DPSettings(**{**base, **kw})


def _ledger(s: DPSettings, n: int, batch: int, rounds: int = 10, steps: int = 5) -> PrivacyLedger:
    return PrivacyLedger.create(s, n=n, batch_size=batch, rounds=rounds, local_steps=steps)


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
        s = _dp()
        led = _ledger(s, 30, 1, steps=11)
        res = train_local(model, data, steps=11, batch_size=1, lr=0.1, seed=0, pad_id=0, privacy=s, ledger=led)
        assert led.steps == 11 and led.participations == 1
        assert res.epsilon == led.epsilon() > 0
    else:  # 11 steps of 8 cycle the 30 records three times
        res = train_local(model, data, steps=11, batch_size=8, lr=0.1, seed=0, pad_id=0)
        assert res.epsilon is None
    assert len(calls) == 11 and res.steps == 11 and res.examples == 30 and res.declined is None
    if not dp:  # (under DP at q = 1/30 every batch may be empty, and the loss then nan)
        assert math.isfinite(res.loss)
    assert not model.training


@pytest.mark.parametrize("mode", MODES)
def test_dp_updates_only_trained_lora_params(model, mode):
    """The Opacus+PEFT trap (opacus#820) with the pinned versions: under DP the trained factors (FFA: lora_B)
    change, everything else is bit-identical, everything is finite."""
    trained = set(set_trainable(model, FFA))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    s = _dp(mode, noise_multiplier=0.5)
    data = first_token_task(40, 1)
    res = train_local(model, data, steps=4, batch_size=8, lr=0.5, seed=3, pad_id=0, privacy=s,
                      ledger=_ledger(s, 40, 8))
    assert res.declined is None and res.steps == 4
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
        s = _dp(mode, epsilon=1e12, noise_multiplier=1e-3, clip=10.0)
        res = train_local(model, train, steps=40, batch_size=20, lr=2.0, seed=0, pad_id=0, privacy=s,
                          ledger=_ledger(s, 200, 20, rounds=1, steps=40))
        assert res.declined is None and res.epsilon > 1e3  # the guarantee is vacuous, as intended here
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
    kw = {}
    if dp:
        s = _dp("lora_fast", epsilon=1e12, noise_multiplier=1e-3, clip=10.0)
        kw = dict(privacy=s, ledger=_ledger(s, 200, 20, rounds=1, steps=40))
    res = train_local(model, train, steps=40, batch_size=20, lr=0.02, seed=0, pad_id=0, optimizer="adam", **kw)
    assert res.declined is None and res.steps == 40
    assert evaluate(model, test, pad_id=0)["accuracy"] >= 0.95


def test_unknown_optimizer_is_refused(model):
    set_trainable(model, FFA)
    with pytest.raises(ValueError, match=r"strategy.optimizer='lbfgs'.*allowed values"):
        train_local(model, first_token_task(10, 0), steps=1, batch_size=2, lr=0.1, seed=0, pad_id=0, optimizer="lbfgs")


def test_model_is_reusable_after_dp_rounds(model):
    set_trainable(model, FFA)
    data = first_token_task(40, 2)
    s = _dp("hooks")
    led = _ledger(s, 40, 8)
    for seed in range(2):  # two DP rounds on the same model object (Opacus refuses hooks added twice)
        res = train_local(model, data, steps=2, batch_size=8, lr=0.1, seed=seed, pad_id=0, privacy=s, ledger=led)
        assert res.declined is None
        assert leftover_dp_state(model) == []
    g = _dp("ghost")
    train_local(model, data, steps=2, batch_size=8, lr=0.1, seed=5, pad_id=0, privacy=g, ledger=_ledger(g, 40, 8))
    train_local(model, data, steps=2, batch_size=8, lr=0.1, seed=6, pad_id=0)  # and a plain round after
    assert led.participations == 2 and led.steps == 4
    model.train()
    b = make_collate(0)(data[:4])
    loss = torch.nn.functional.cross_entropy(model(input_ids=b["input_ids"]).logits, b["labels"])
    loss.backward()
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())
    assert leftover_dp_state(model) == []
    model.zero_grad(set_to_none=True)


def test_declines_when_the_budget_would_be_passed(model):
    set_trainable(model, FFA)
    data = first_token_task(100, 3)
    s = _dp(epsilon=3.0, noise_multiplier=1.0)  # q = 0.1: one round of 10 steps stays under 3, two do not
    led = _ledger(s, 100, 10, steps=10)
    first = train_local(model, data, steps=10, batch_size=10, lr=0.1, seed=0, pad_id=0, privacy=s, ledger=led)
    assert first.declined is None and 0 < first.epsilon <= 3.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    second = train_local(model, data, steps=10, batch_size=10, lr=0.1, seed=1, pad_id=0, privacy=s, ledger=led)
    assert second.declined.startswith("privacy budget: ε would reach ") and second.declined.endswith("> target 3")
    assert second.steps == 0 and second.epsilon == first.epsilon and math.isnan(second.loss)
    assert led.steps == 10 and led.participations == 1  # nothing recorded for a declined round
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dp_runs_are_reproducible_by_seed(model, built):
    set_trainable(model, FFA)
    data = first_token_task(40, 4)
    s = _dp(noise_multiplier=0.7)
    outs = []
    for seed in (7, 7, 8):
        model.load_state_dict(built[1])
        train_local(model, data, steps=3, batch_size=8, lr=0.5, seed=seed, pad_id=0, privacy=s,
                    ledger=_ledger(s, 40, 8))
        outs.append(adapter_state(model))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert not all(torch.equal(outs[0][k], outs[2][k]) for k in outs[0])


def test_privacy_needs_a_ledger(model):
    set_trainable(model, FFA)
    with pytest.raises(ValueError, match="both"):
        train_local(model, first_token_task(10, 0), steps=1, batch_size=2, lr=0.1, seed=0, pad_id=0, privacy=_dp())
