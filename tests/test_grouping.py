"""Routing-group formation (spec section 5)."""

from __future__ import annotations

import math

import pytest

from ecserve.engine.grouping import batch_group_sizes, sequence_group_sizes


@pytest.mark.parametrize("group_size,unit", [(8, 2), (64, 4), (64, 32), (12, 12), (5, 1)])
def test_batch_groups_are_balanced_and_sized_for_capacity(group_size, unit):
    for n in range(0, 5 * group_size + 3):
        sizes = batch_group_sizes(n, group_size, unit)
        assert sum(sizes) == n
        assert len(sizes) == math.ceil(n / group_size)
        assert all(0 < s <= group_size for s in sizes)
        # every group but the last is a whole number of units; the last holds n % unit extra
        assert all(s % unit == 0 for s in sizes[:-1])
        if sizes:
            assert sizes[-1] % unit == n % unit
            whole = [s - (n % unit if i == len(sizes) - 1 else 0) for i, s in enumerate(sizes)]
            assert max(whole) - min(whole) <= unit  # balanced to within one unit


def test_batch_groups_examples():
    assert batch_group_sizes(100, 64, 4) == [52, 48]
    assert batch_group_sizes(65, 64, 4) == [32, 33]
    assert batch_group_sizes(3, 64, 4) == [3]
    assert batch_group_sizes(128, 64, 4) == [64, 64]


def test_sequence_groups_cut_at_fixed_positions():
    assert sequence_group_sizes(0, 150, 64) == [64, 64, 22]
    assert sequence_group_sizes(64, 86, 64) == [64, 22]  # a later chunk of the same prompt
    assert sequence_group_sizes(150, 1, 64) == [1]  # a decode token is a group of one
    assert sequence_group_sizes(60, 10, 64) == [4, 6]
