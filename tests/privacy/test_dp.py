"""DP-SGD mechanics on a real PEFT model (tiny BERT + LoRA): per-sample clipping against a by-hand computation,
the three gradient engines agreeing, seeded noise, empty Poisson batches, and a clean model afterwards."""

from __future__ import annotations

import pytest
import torch

from fedlora.privacy.dp import PrivateTrainer, leftover_dp_state, poisson_batches
from fedlora.privacy.noise import SecureNoise, SeededNoise
from fedlora.task.model import ModelSpec, build_model, set_trainable
from fedlora.task.train import make_collate

torch.set_num_threads(1)

MODES = ["hooks", "ghost", "lora_fast"]
FFA = lambda k: "lora_B" in k  # noqa: E731 - FFA-LoRA: only B trained, head frozen
B_AND_HEAD = lambda k: "lora_B" in k or "classifier" in k  # noqa: E731


@pytest.fixture(scope="module")
def base():
    # float64, so that parameter deltas of ~1e-7 (the size of LoRA-B updates through a random head) are exact
    # enough to compare at 1e-6; the float32 path is exercised by the training tests
    model = build_model(ModelSpec(name_or_path="tiny-bert"), num_labels=2, seed=0).double()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # deterministic forward, so per-sample gradients can be recomputed one example at a time
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at 0; move off it so every factor has a real gradient
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, init


@pytest.fixture
def model(base):
    model, init = base
    model.load_state_dict(init)
    model.train()
    yield model
    assert leftover_dp_state(model) == []


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ex = []
    for i in range(n):
        length = 4 + int(torch.randint(0, 6, (1,), generator=g))
        ids = [101] + torch.randint(1000, 3000, (length,), generator=g).tolist() + [102]
        ex.append({"input_ids": ids, "labels": i % 2})
    return make_collate(0)(ex)


def _params(model):
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def _snapshot(model):
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def _dp_update(model, batches, *, mode, sigma, clip, expected, lr=1.0, seed: int | None = 0):
    before = _snapshot(model)
    opt = torch.optim.SGD(list(_params(model).values()), lr=lr)
    with PrivateTrainer(model, opt, noise_multiplier=sigma, clip=clip, expected_batch_size=expected,
                        grad_sample_mode=mode, noise=SecureNoise() if seed is None else SeededNoise(seed)) as dp:
        for b in batches:
            dp.step(b)
    return {k: p.detach() - before[k] for k, p in model.named_parameters()}


def _per_sample_grads(model, batch):
    params = _params(model)
    out = []
    for i in range(batch["labels"].shape[0]):
        one = slice(i, i + 1)
        logits = model(input_ids=batch["input_ids"][one], attention_mask=batch["attention_mask"][one]).logits
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"][i : i + 1])
        out.append(dict(zip(params, torch.autograd.grad(loss, list(params.values())))))
    return out


@pytest.mark.parametrize("mode", MODES)
def test_clipped_sum_over_expected_batch_matches_by_hand(model, mode):
    set_trainable(model, B_AND_HEAD)
    batch = _batch()
    grads = _per_sample_grads(model, batch)
    norms = torch.stack([torch.sqrt(sum((g**2).sum() for g in gi.values())) for gi in grads])
    clip, expected = float(norms.median()), 5.0  # about half the examples are clipped; denominator != batch
    assert (norms > clip).any() and (norms < clip).any()
    want = {k: -sum(min(1.0, clip / (float(nrm) + 1e-6)) * gi[k] for gi, nrm in zip(grads, norms)) / expected
            for k in grads[0]}
    got = _dp_update(model, [batch], mode=mode, sigma=0.0, clip=clip, expected=expected)
    for k, w in want.items():
        assert torch.allclose(got[k], w, rtol=1e-6, atol=1e-12), (mode, k, (got[k] - w).abs().max())
    frozen = [k for k in got if k not in want]
    assert frozen and all(torch.count_nonzero(got[k]) == 0 for k in frozen)


@pytest.mark.parametrize("mode", MODES)
def test_no_clip_no_noise_is_plain_sgd_on_lora_b(model, mode):
    """The Opacus+PEFT trap (opacus#820): under DP the LoRA update must be the real gradient, not garbage."""
    set_trainable(model, FFA)
    batch = _batch(8, seed=1)
    params = _params(model)
    assert params and all("lora_B" in k for k in params)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
    plain = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    got = _dp_update(model, [batch], mode=mode, sigma=0.0, clip=1e6, expected=8, lr=0.5)
    for k, g in plain.items():
        assert torch.count_nonzero(g) > 0
        assert torch.allclose(got[k], -0.5 * g, rtol=1e-6, atol=1e-12), (mode, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lora_fast_equals_opacus_hooks_with_noise(model, base, dtype):
    set_trainable(model, B_AND_HEAD)
    batches = [_batch(6, seed=2), _batch(0), _batch(9, seed=3)]  # an empty Poisson batch in the middle
    runs = {}
    try:
        for mode in ("hooks", "lora_fast"):
            model.load_state_dict(base[1])
            model.to(dtype)
            runs[mode] = _dp_update(model, batches, mode=mode, sigma=0.8, clip=0.05, expected=7, lr=0.3, seed=11)
    finally:
        model.double()
    for k in runs["hooks"]:
        assert runs["hooks"][k].dtype == dtype
        assert torch.allclose(runs["lora_fast"][k], runs["hooks"][k], rtol=1e-5, atol=1e-7), k
    assert any(torch.count_nonzero(v) for v in runs["hooks"].values())


@pytest.mark.parametrize("source", ["csprng", "seeded"])
def test_noise_is_scaled_and_only_the_explicit_seeded_source_repeats(model, base, source):
    """An empty batch is a noise-only step. The default source (the OS CSPRNG) never repeats itself, whatever the
    seed; the seeded-insecure one repeats exactly for the same seed, whatever the engine."""
    set_trainable(model, FFA)
    empty = _batch(0)
    seeds = (None, None, None) if source == "csprng" else (5, 5, 6)
    a = _dp_update(model, [empty], mode="hooks", sigma=2.0, clip=3.0, expected=10, seed=seeds[0])
    model.load_state_dict(base[1])
    b = _dp_update(model, [empty], mode="lora_fast", sigma=2.0, clip=3.0, expected=10, seed=seeds[1])
    model.load_state_dict(base[1])
    c = _dp_update(model, [empty], mode="hooks", sigma=2.0, clip=3.0, expected=10, seed=seeds[2])
    trained = [k for k in a if "lora_B" in k]
    assert all(torch.equal(a[k], b[k]) for k in a) is (source == "seeded")
    assert not all(torch.equal(a[k], c[k]) for k in trained)
    # std σ·C / expected batch per coordinate
    noise = torch.cat([a[k].flatten() for k in trained])
    assert noise.std().item() == pytest.approx(2.0 * 3.0 / 10, rel=0.15)
    assert all(torch.count_nonzero(a[k]) == 0 for k in a if k not in trained)


def test_csprng_draws_are_standard_normal_and_uniform():
    from fedlora.privacy.noise import SecureNoise

    src = SecureNoise()
    z = src.normal(torch.Size([400_000]), 1.0, dtype=torch.float64, device=torch.device("cpu"))
    assert abs(z.mean().item()) < 5 / 400_000**0.5 and z.std().item() == pytest.approx(1.0, abs=0.01)
    assert (z.abs() > 3).float().mean().item() == pytest.approx(0.0027, abs=0.0006)  # Gaussian tails
    u = src.uniform(200_000)
    assert u.min() >= 0 and u.max() < 1 and u.mean().item() == pytest.approx(0.5, abs=0.005)
    assert len(set(src.uniform(1000).tolist())) == 1000


@pytest.mark.parametrize("mode", MODES)
def test_model_is_clean_and_reusable(model, mode):
    set_trainable(model, FFA)
    batch = _batch()
    for _ in range(2):  # the same model object, round after round
        _dp_update(model, [batch], mode=mode, sigma=0.5, clip=1.0, expected=6)
        assert leftover_dp_state(model) == []
        assert all(p.grad is None for p in model.parameters())
    # and an error mid-round still leaves it clean
    opt = torch.optim.SGD(list(_params(model).values()), lr=0.1)
    with pytest.raises(RuntimeError, match="boom"):
        with PrivateTrainer(model, opt, noise_multiplier=0.5, clip=1.0, expected_batch_size=6, grad_sample_mode=mode):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # forward, no backward
            raise RuntimeError("boom")
    assert leftover_dp_state(model) == []
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert out.shape == (6, 2)
    assert leftover_dp_state(model) == []


def test_refusals(model):
    set_trainable(model, FFA)
    params = list(_params(model).values())
    with pytest.raises(ValueError, match="exactly the model's trainable"):
        PrivateTrainer(model, torch.optim.SGD(params[:1], lr=0.1), noise_multiplier=1.0, clip=1.0,
                       expected_batch_size=4)
    with pytest.raises(ValueError, match="grad_sample_mode"):
        PrivateTrainer(model, torch.optim.SGD(params, lr=0.1), noise_multiplier=1.0, clip=1.0,
                       expected_batch_size=4, grad_sample_mode="ew")
    ln = model.base_model.model.bert.embeddings.LayerNorm.weight
    ln.requires_grad_(True)
    try:
        with pytest.raises(ValueError, match="grad_sample_mode=hooks"):
            PrivateTrainer(model, torch.optim.SGD([*params, ln], lr=0.1), noise_multiplier=1.0, clip=1.0,
                           expected_batch_size=4, grad_sample_mode="lora_fast")
    finally:
        ln.requires_grad_(False)
    assert leftover_dp_state(model) == []


def test_poisson_batches_are_seeded_with_rate_q():
    n, q = 500, 0.04
    a = list(poisson_batches(n, sample_rate=q, steps=400, source=SeededNoise(3)))
    b = list(poisson_batches(n, sample_rate=q, steps=400, source=SeededNoise(3)))
    c = list(poisson_batches(n, sample_rate=q, steps=400, source=SeededNoise(4)))
    assert a == b and a != c and len(a) == 400
    sizes = torch.tensor([len(x) for x in a], dtype=torch.float)
    assert sizes.mean().item() == pytest.approx(q * n, rel=0.05)  # E|batch| = q·n = 20, sd of the mean 0.22
    assert sizes.std().item() == pytest.approx((n * q * (1 - q)) ** 0.5, rel=0.15)  # variable size, Binomial
    assert all(len(set(x)) == len(x) and all(0 <= i < n for i in x) for x in a)
    tiny = list(poisson_batches(50, sample_rate=0.01, steps=100, source=SeededNoise(0)))
    assert any(len(x) == 0 for x in tiny)  # empty batches happen (P = 0.99^50 = 0.6 per step)


@pytest.mark.parametrize("mode", MODES)
def test_submodules_left_in_eval_mode_still_get_per_sample_gradients(model, mode):
    """from_pretrained + get_peft_model leaves the top module training=True and its submodules in eval mode;
    PrivateTrainer must put every module in training mode, or the head's gradient hook stays silent."""
    set_trainable(model, B_AND_HEAD)
    for m in model.modules():
        m.training = False
    model.training = True  # the state a freshly loaded PEFT model is in
    got = _dp_update(model, [_batch()], mode=mode, sigma=0.0, clip=1e6, expected=6)
    head = [k for k in _params(model) if "classifier" in k]
    assert head and all(torch.count_nonzero(got[k]) > 0 for k in head)
