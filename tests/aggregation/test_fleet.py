"""Fleet composition: exact bitwidth counts, determinism, validation."""

from __future__ import annotations

from collections import Counter

import pytest

from fedlora.aggregation.fleet import fleet_bitwidths


@pytest.mark.parametrize(
    ("mix", "n", "want"),
    [
        ({32: 0.5, 8: 0.5}, 10, {32: 5, 8: 5}),
        ({32: 0.5, 4: 0.5}, 7, {32: 4, 4: 3}),  # tie on the remainder: the higher bitwidth gets it
        ({32: 0.5, 8: 0.25, 4: 0.25}, 10, {32: 5, 8: 3, 4: 2}),
        ({32: 0.3, 16: 0.3, 2: 0.4}, 10, {32: 3, 16: 3, 2: 4}),
        ({32: 0.34, 8: 0.33, 2: 0.33}, 100, {32: 34, 8: 33, 2: 33}),
        ({32: 0.1, 2: 0.9}, 3, {32: 0, 2: 3}),
        ({4: 1.0}, 6, {4: 6}),
    ],
)
def test_fleet_bitwidths_exact_counts(mix, n, want):
    bits = fleet_bitwidths(mix, n, seed=0)
    assert len(bits) == n
    assert Counter(bits) == Counter({b: c for b, c in want.items() if c})


def test_fleet_bitwidths_deterministic_and_permuted():
    mix = {32: 0.5, 8: 0.25, 2: 0.25}
    a = fleet_bitwidths(mix, 40, seed=7)
    assert a == fleet_bitwidths(mix, 40, seed=7)
    assert a != fleet_bitwidths(mix, 40, seed=8)
    assert a != sorted(a, reverse=True)  # not simply grouped by index
    assert Counter(a) == Counter(fleet_bitwidths(mix, 40, seed=8))
    assert fleet_bitwidths({"32": 0.5, "4": 0.5}, 4, seed=0).count(4) == 2  # Hydra may give string keys
    assert fleet_bitwidths(mix, 0, seed=0) == []


@pytest.mark.parametrize(
    ("mix", "n"),
    [
        ({32: 0.5, 3: 0.5}, 4),
        ({32: 0.5, 8: 0.4}, 4),
        ({32: 1.2, 8: -0.2}, 4),
        ({}, 4),
        ({32: float("nan")}, 4),
        ({32: 1.0}, -1),
        ({True: 1.0}, 2),
    ],
)
def test_fleet_bitwidths_validation(mix, n):
    with pytest.raises(ValueError, match="clients.bitwidths"):
        fleet_bitwidths(mix, n, seed=0)
