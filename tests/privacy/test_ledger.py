"""The per-client privacy ledger: ε against Opacus and independent references, persistence, the budget stop."""

from __future__ import annotations

import json
import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from fedlora.privacy.calibrate import DPSettings
from fedlora.privacy.ledger import PrivacyLedger, compute_epsilon

# ε at δ=1e-6 from Microsoft's prv_accountant (the PRV reference implementation), as shipped in Opacus' tests
MSR_PRV = {
    (1.5, 0.05, 100): 1.95385313568420015961635272106,
    (2.0, 0.05, 1000): 4.17279986668931890392286732094,
    (3.0, 0.2, 100): 3.38122051022184422208738396876,
}


def _ledger(sigma: float, q: float, *, delta: float, accountant: str, target: float = 1e6) -> PrivacyLedger:
    return PrivacyLedger(
        target_epsilon=target, delta=delta, noise_multiplier=sigma, sample_rate=q, clip=1.0,
        accountant=accountant, planned_steps=10**6, calibrated=False,
    )


def _rdp_by_hand(history, delta):
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(rdp_analysis.compute_rdp(q=q, noise_multiplier=s, steps=k, orders=orders) for s, q, k in history)
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def test_no_steps_is_zero():
    for acc in ("prv", "rdp"):
        led = _ledger(1.0, 0.01, delta=1e-5, accountant=acc)
        assert led.epsilon() == 0.0
        assert led.epsilon_if(0) == 0.0
        assert led.epsilon_if(10) > 0.0


@pytest.mark.parametrize("case", sorted(MSR_PRV))
def test_prv_matches_reference_implementation(case):
    sigma, q, steps = case
    led = _ledger(sigma, q, delta=1e-6, accountant="prv")
    led.record(steps)
    assert led.epsilon() == pytest.approx(MSR_PRV[case], abs=1e-4)


def test_rdp_matches_independent_computation():
    # Opacus' own regression value for σ=1.5, q=0.04, 2250 steps, δ=1e-5
    led = _ledger(1.5, 0.04, delta=1e-5, accountant="rdp")
    led.record(2250)
    assert led.epsilon() == pytest.approx(7.32911117143, abs=1e-8)
    for sigma, q, steps in [(0.7, 0.01, 300), (1.1, 0.1, 50), (4.0, 0.5, 7)]:
        led = _ledger(sigma, q, delta=1e-5, accountant="rdp")
        for _ in range(3):
            led.record(steps)
        assert led.epsilon() == pytest.approx(_rdp_by_hand([(sigma, q, 3 * steps)], 1e-5), rel=1e-12)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_equals_an_accountant_driven_step_by_step(accountant):
    led = _ledger(0.9, 0.05, delta=1e-5, accountant=accountant)
    direct = PRVAccountant() if accountant == "prv" else RDPAccountant()
    for rnd_steps in (7, 3, 10):
        led.record(rnd_steps)
        for _ in range(rnd_steps):
            direct.step(noise_multiplier=0.9, sample_rate=0.05)
        assert led.history == direct.history
        assert led.epsilon() == direct.get_epsilon(delta=1e-5)
    # a history that changed σ (e.g. a ledger restored and then continued with another σ) composes too
    state = led.state_dict()
    state["noise_multiplier"] = 1.3
    led2 = PrivacyLedger.from_state_dict(state)
    led2.record(5)
    for _ in range(5):
        direct.step(noise_multiplier=1.3, sample_rate=0.05)
    assert led2.history == direct.history and len(led2.history) == 2
    assert led2.epsilon() == direct.get_epsilon(delta=1e-5)
    if accountant == "rdp":
        assert led2.epsilon() == pytest.approx(_rdp_by_hand(led2.history, 1e-5), rel=1e-12)


def test_epsilon_if_and_cache():
    led = _ledger(1.0, 0.05, delta=1e-5, accountant="prv")
    led.record(20)
    e20 = led.epsilon()
    assert led.epsilon_if(20) == compute_epsilon([(1.0, 0.05, 40)], delta=1e-5, accountant="prv")[0]
    assert led.epsilon_if(20) > e20
    assert led.epsilon() == e20  # epsilon_if does not record
    assert led.steps == 20 and led.participations == 1


def test_persistence_through_json_continues_never_resets(tmp_path):
    s = DPSettings(epsilon=50.0, delta=1e-5, clip=1.0, accountant="rdp", noise_multiplier=1.0)
    led = PrivacyLedger.create(s, n=1000, batch_size=50, rounds=10, local_steps=5)
    seen = []
    for _ in range(4):
        led.record(5)
        seen.append(led.epsilon())
        path = tmp_path / "ledger.json"
        path.write_text(json.dumps(led.state_dict()))
        led = PrivacyLedger.from_state_dict(json.loads(path.read_text()))
        assert led.epsilon() == seen[-1]  # the restored ledger reports what the saved one did
    assert all(b > a for a, b in zip(seen, seen[1:]))
    assert led.steps == 20 and led.participations == 4 and led.history == [(1.0, 0.05, 20)]
    # a fresh accountant per round would under-report: one round's ε is far below the composed one
    assert compute_epsilon([(1.0, 0.05, 5)], delta=1e-5, accountant="rdp")[0] < 0.85 * seen[-1]
    with pytest.raises(ValueError, match="inconsistent"):
        PrivacyLedger.from_state_dict({**led.state_dict(), "steps": 3})


def test_q_is_batch_over_n_and_planned_steps():
    s = DPSettings(epsilon=8.0, delta=1e-5, clip=1.0, accountant="rdp")
    led = PrivacyLedger.create(s, n=2000, batch_size=40, rounds=10, local_steps=4)
    assert led.sample_rate == 40 / 2000
    assert led.planned_steps == 40 and led.calibrated
    capped = PrivacyLedger.create(
        DPSettings(epsilon=8.0, delta=1e-5, clip=1.0, accountant="rdp", max_participations=3),
        n=2000, batch_size=40, rounds=10, local_steps=4,
    )
    assert capped.planned_steps == 12
    assert capped.noise_multiplier < led.noise_multiplier  # fewer planned steps: less noise for the same ε
    with pytest.raises(ValueError, match="privacy.delta"):
        PrivacyLedger.create(DPSettings(epsilon=8.0, delta=0.01, clip=1.0), n=200, batch_size=20, rounds=2,
                             local_steps=2)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibrated_ledger_runs_exactly_the_planned_rounds(accountant):
    rounds, tau = 3, 5
    s = DPSettings(epsilon=3.0, delta=1e-4, clip=1.0, accountant=accountant)
    led = PrivacyLedger.create(s, n=400, batch_size=20, rounds=rounds, local_steps=tau)
    ran = 0
    while led.can_run(tau):
        led.record(tau)
        ran += 1
        assert led.epsilon() <= s.epsilon
        assert ran <= rounds + 1
    assert ran == rounds
    assert led.epsilon() > s.epsilon - 0.05  # calibrated tightly: the budget is (almost) used up
    assert led.epsilon_if(tau) > s.epsilon
    assert "ε would reach" in led.decline_reason(tau)


def test_explicit_noise_declines_before_passing_target():
    sigma, q, tau, target = 1.0, 0.05, 10, 3.0
    s = DPSettings(epsilon=target, delta=1e-5, clip=1.0, accountant="rdp", noise_multiplier=sigma)
    led = PrivacyLedger.create(s, n=1000, batch_size=50, rounds=100, local_steps=tau)
    assert not led.calibrated and led.noise_multiplier == sigma
    # the first participation count whose composed ε passes the target, computed independently
    first_bad = next(k for k in range(1, 100) if _rdp_by_hand([(sigma, q, k * tau)], 1e-5) > target)
    assert first_bad > 1
    ran = 0
    while led.can_run(tau):
        led.record(tau)
        ran += 1
    assert ran == first_bad - 1
    assert led.epsilon() <= target < led.epsilon_if(tau)
    reason = led.decline_reason(tau)
    assert reason.startswith("privacy budget: ε would reach") and f"> target {target:g}" in reason


def test_max_participations_is_a_hard_stop():
    s = DPSettings(epsilon=100.0, delta=1e-5, clip=1.0, accountant="rdp", noise_multiplier=2.0, max_participations=2)
    led = PrivacyLedger.create(s, n=1000, batch_size=10, rounds=50, local_steps=3)
    assert led.can_run(3)
    led.record(3)
    led.record(3)
    assert led.epsilon_if(3) < 100.0  # ε would allow it ...
    assert not led.can_run(3)  # ... the participation cap does not
    assert "max_participations" in led.decline_reason(3)


@pytest.mark.filterwarnings("ignore:Optimal order")
def test_tiny_sigma_under_prv_falls_back_to_rdp_quickly():
    # PRV's grid explodes for σ this small (minutes / MemoryError in Opacus): the ledger reports the RDP bound
    led = _ledger(1e-3, 0.1, delta=1e-4, accountant="prv", target=1e12)
    led.record(60)
    eps = led.epsilon()
    assert led.epsilon_accountant == "rdp"
    assert eps == pytest.approx(_rdp_by_hand([(1e-3, 0.1, 60)], 1e-4))
    assert math.isfinite(eps) and eps > 1e6


def test_default_run_dp_settings_keep_every_client_within_target():
    """`make run`'s own config (privacy=dp by default): every client, even one sampled in every round, stays at
    ε <= the target after the whole plan, and its ledger refuses one participation more."""
    from fedlora.config import check_client_sizes
    from fedlora.task.data import partition_sizes
    from tests.conftest import config

    cfg = config()
    assert cfg.privacy.enabled and cfg.privacy.epsilon == 8 and cfg.privacy.delta == 1e-5
    sizes = partition_sizes(cfg.data, cfg.clients.num, cfg.seed)
    check_client_sizes(cfg, sizes)  # the pre-flight the coordinator runs (δ < 1/n for the smallest client, q <= 1)
    for n in sorted(set(sizes)):
        led = PrivacyLedger.create(cfg.privacy, n=n, batch_size=cfg.clients.batch_size,
                                   sample_rate=cfg.clients.sample_rate, rounds=cfg.rounds,
                                   local_steps=cfg.clients.local_steps)
        assert led.delta < 1 / n
        for _ in range(cfg.rounds):
            assert led.can_run(cfg.clients.local_steps), (n, led.epsilon())
            led.record(cfg.clients.local_steps)
        assert led.epsilon() <= cfg.privacy.epsilon * (1 + 1e-6), (n, led.epsilon())
        assert not led.can_run(cfg.clients.local_steps)
