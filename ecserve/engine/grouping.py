"""Cutting a step's tokens into routing groups (docs/routing.md §5)."""

from __future__ import annotations

import math


def batch_group_sizes(num_tokens: int, group_size: int, unit: int) -> list[int]:
    """`batch` scope: ceil(N / group_size) contiguous groups of balanced size.

    Sizes are multiples of `unit` (the smallest n whose n*c/E is whole) wherever N allows; the
    N % unit leftover tokens join the last group, which stays within group_size because it is
    one of the smaller groups. Larger groups come first. Deterministic in N alone.
    """
    if num_tokens == 0:
        return []
    groups = math.ceil(num_tokens / group_size)
    units, leftover = divmod(num_tokens, unit)
    base, extra = divmod(units, groups)
    sizes = [(base + (i < extra)) * unit for i in range(groups)]
    sizes[-1] += leftover
    return [s for s in sizes if s]


def sequence_group_sizes(start_pos: int, num_tokens: int, group_size: int) -> list[int]:
    """`sequence` scope: a sequence's tokens cut at fixed positions (multiples of group_size).

    A prompt always forms the same groups whatever the load; a decode token is a group of one.
    """
    sizes, pos, end = [], start_pos, start_pos + num_tokens
    while pos < end:
        nxt = min(end, (pos // group_size + 1) * group_size)
        sizes.append(nxt - pos)
        pos = nxt
    return sizes
