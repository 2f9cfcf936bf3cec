"""DPSettings, the refusal of settings that give no guarantee, and noise calibration."""

from __future__ import annotations

import pytest

from fedlora.privacy.calibrate import (
    DPSettings,
    calibrate_noise,
    check_dp_settings,
)
from fedlora.privacy.ledger import compute_epsilon
from fedlora.schema import ConfigError

GOOD = dict(epsilon=8.0, delta=1e-5, clip=1.0)


def test_from_dict_coerces_and_refuses_unknown_keys():
    s = DPSettings.from_dict(
        {"enabled": True, "epsilon": 8, "delta": 1e-5, "clip": 1, "accountant": "rdp", "noise_multiplier": None,
         "max_participations": 3, "grad_sample_mode": "ghost"}
    )
    assert s == DPSettings(epsilon=8.0, delta=1e-5, clip=1.0, accountant="rdp", max_participations=3,
                           grad_sample_mode="ghost")
    assert isinstance(s.epsilon, float) and isinstance(s.clip, float)
    d = DPSettings.from_dict({"epsilon": 3.0, "delta": 1e-6, "clip": 0.5})
    assert (d.accountant, d.noise_multiplier, d.max_participations, d.grad_sample_mode) == ("prv", None, None, "hooks")
    with pytest.raises(ConfigError) as e:
        DPSettings.from_dict({"epsilon": 3.0, "delta": 1e-6, "clip": 0.5, "sigma": 1.0})
    assert e.value.key == "privacy.sigma" and "unknown key" in str(e.value)


def test_disabled_privacy_needs_no_values():
    s = DPSettings.from_dict({"enabled": False, "epsilon": None, "delta": None, "clip": None, "accountant": None})
    assert not s.enabled


def test_good_settings_pass():
    check_dp_settings(DPSettings(**GOOD), n=1000, batch_size=32)
    check_dp_settings(DPSettings(**GOOD, noise_multiplier=0.8, max_participations=2, accountant="rdp",
                                 grad_sample_mode="lora_fast"), n=1000, batch_size=1000)


@pytest.mark.parametrize(
    "change, n, batch, key, hint",
    [
        (dict(epsilon=0.0), 1000, 32, "privacy.epsilon", "> 0"),
        (dict(epsilon=-1.0), 1000, 32, "privacy.epsilon", "> 0"),
        (dict(epsilon=float("inf")), 1000, 32, "privacy.epsilon", "finite"),
        (dict(delta=0.0), 1000, 32, "privacy.delta", "> 0"),
        (dict(delta=-1e-5), 1000, 32, "privacy.delta", "> 0"),
        (dict(delta=1e-3), 1000, 32, "privacy.delta", "1/n"),  # δ = 1/n exactly
        (dict(delta=0.01), 1000, 32, "privacy.delta", "privacy.delta <= 1.0e-04"),
        (dict(clip=0.0), 1000, 32, "privacy.clip", "> 0"),
        (dict(clip=-2.0), 1000, 32, "privacy.clip", "> 0"),
        ({}, 100, 101, "clients.batch_size", "clients.batch_size <= 100"),
        (dict(accountant="gdp"), 1000, 32, "privacy.accountant", "allowed values"),
        (dict(grad_sample_mode="ew"), 1000, 32, "privacy.grad_sample_mode", "allowed values"),
        (dict(noise_multiplier=0.0), 1000, 32, "privacy.noise_multiplier", "> 0"),
        (dict(noise_multiplier=-0.5), 1000, 32, "privacy.noise_multiplier", "> 0"),
        (dict(max_participations=0), 1000, 32, "privacy.max_participations", ">= 1"),
    ],
)
def test_bad_settings_refused_naming_the_key(change, n, batch, key, hint):
    with pytest.raises(ConfigError) as e:  # static checks when built, data-dependent ones against n
        check_dp_settings(DPSettings(**{**GOOD, **change}), n=n, batch_size=batch)
    assert e.value.key == key
    assert key in str(e.value)
    assert hint in str(e.value)


def test_calibrated_sigma_meets_target_tightly():
    for accountant in ("rdp", "prv"):
        sigma = calibrate_noise(epsilon=4.0, delta=1e-5, sample_rate=0.02, steps=200, accountant=accountant)
        eps, used = compute_epsilon([(sigma, 0.02, 200)], delta=1e-5, accountant=accountant)
        assert used == accountant
        assert 4.0 - 0.02 <= eps <= 4.0, (accountant, sigma, eps)
        # less noise would pass the target: the search is tight
        assert compute_epsilon([(sigma * 0.95, 0.02, 200)], delta=1e-5, accountant=accountant)[0] > 4.0


@pytest.mark.filterwarnings("ignore:Optimal order")
def test_calibration_uses_opacus_search():
    from opacus.accountants.utils import get_noise_multiplier

    got = calibrate_noise(epsilon=2.0, delta=1e-5, sample_rate=0.01, steps=500, accountant="rdp")
    assert got == get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.01, steps=500,
                                       accountant="rdp")


def test_calibration_refuses_impossible_inputs():
    with pytest.raises(ValueError, match="steps"):
        calibrate_noise(epsilon=1.0, delta=1e-5, sample_rate=0.1, steps=0, accountant="rdp")
    with pytest.raises(ValueError, match="privacy.accountant"):
        calibrate_noise(epsilon=1.0, delta=1e-5, sample_rate=0.1, steps=10, accountant="gdp")
    with pytest.raises(ValueError, match="sample rate"):
        calibrate_noise(epsilon=1.0, delta=1e-5, sample_rate=1.5, steps=10, accountant="rdp")
