"""Data splits: the sizes the privacy pre-flight checks are the sizes the clients train on."""

from __future__ import annotations

import pytest

from fedlora.task.data import DataSpec, client_split, partition_counts, partition_sizes, split_sizes


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
@pytest.mark.parametrize("num, val_fraction, seed", [(3, 0.1, 0), (7, 0.15, 1), (10, 0.1, 2), (13, 0.25, 3),
                                                      (14, 0.1, 0), (5, 0.33, 4)])
def test_preflight_sizes_equal_trained_sizes(partitioner, num, val_fraction, seed):
    spec = DataSpec(name="rt_polarity", max_examples=1500, val_fraction=val_fraction, partitioner=partitioner,
                    alpha=5.0, min_partition_size=10)
    sizes = partition_sizes(spec, num, seed)
    splits = [client_split(spec, num, i, seed) for i in range(num)]
    assert sizes == [len(train) for train, _ in splits]
    # what simulated clients are registered with (without loading their records)
    assert partition_counts(spec, num, seed) == tuple((len(train), len(val)) for train, val in splits)


def test_split_sizes_take_the_ceiling_for_validation():
    """The rule `datasets` applies to a float test_size (the old pre-flight rounded, one record too many)."""
    assert split_sizes(245, 0.1) == (220, 25)  # round() would have said 221
    assert split_sizes(10, 0.1) == (9, 1)
    assert split_sizes(11, 0.5) == (5, 6)
