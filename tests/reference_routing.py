"""Slow, obviously-correct references for the routing policies (docs/routing.md §3-4).

Plain Python on lists, written straight from the spec's wording and independent of
ecserve.routing: no shared helpers. Same output layout: idx int64 [E, k] (-1 = empty slot) and
gate float32 [E, k] (0 for an empty slot), each expert's slots by descending gate, ties to the
lower token index.
"""

from __future__ import annotations

import struct

import torch


def _f32(x: float) -> float:
    """Round a Python float (float64) to the nearest float32."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _layout(rows: list[list[tuple[int, float]]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = [[t for t, _ in row] + [-1] * (width - len(row)) for row in rows]
    gate = [[g for _, g in row] + [0.0] * (width - len(row)) for row in rows]
    return (torch.tensor(idx, dtype=torch.int64).reshape(len(rows), width),
            torch.tensor(gate, dtype=torch.float32).reshape(len(rows), width))


def ref_expert_choice(scores: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    s = scores.tolist()
    n, num_experts = len(s), len(s[0])
    rows = []
    for e in range(num_experts):
        tokens = sorted(range(n), key=lambda t: (-s[t][e], t))[:capacity]
        rows.append([(t, s[t][e]) for t in tokens])
    return _layout(rows, capacity)


def ref_capped_choice(
    scores: torch.Tensor, capacity: int, max_experts_per_token: int, total: int
) -> tuple[torch.Tensor, torch.Tensor]:
    s = scores.tolist()
    n, num_experts = len(s), len(s[0])
    pairs = [(t, e) for t in range(n) for e in range(num_experts)]
    pairs.sort(key=lambda p: (-s[p[0]][p[1]], p[0], p[1]))
    taken: list[list[tuple[int, float]]] = [[] for _ in range(num_experts)]
    experts_of_token = [0] * n
    accepted = 0
    for t, e in pairs:
        if accepted == total:
            break
        if len(taken[e]) < capacity and experts_of_token[t] < max_experts_per_token:
            taken[e].append((t, s[t][e]))  # walked by descending score: already in slot order
            experts_of_token[t] += 1
            accepted += 1
    return _layout(taken, capacity)


def ref_token_choice(
    scores: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    s = scores.tolist()
    n, num_experts = len(s), len(s[0])
    picked: list[list[tuple[int, float]]] = [[] for _ in range(num_experts)]
    for t in range(n):
        experts = sorted(range(num_experts), key=lambda e: (-s[t][e], e))[:top_k]
        denom = sum(s[t][e] for e in experts)  # float64, like the engine
        for e in experts:
            picked[e].append((t, _f32(s[t][e] / denom) if renormalize else s[t][e]))
    rows = [sorted(row, key=lambda tg: (-tg[1], tg[0])) for row in picked]
    return _layout(rows, max(len(row) for row in rows))


def ref_threshold_choice(
    scores: torch.Tensor, thresholds: torch.Tensor, max_experts_per_token: int
) -> tuple[torch.Tensor, torch.Tensor]:
    s, theta = scores.tolist(), thresholds.tolist()
    n, num_experts = len(s), len(s[0])
    picked: list[list[tuple[int, float]]] = [[] for _ in range(num_experts)]
    for t in range(n):
        passing = [e for e in range(num_experts) if s[t][e] >= theta[e]]
        best = sorted(passing, key=lambda e: (-s[t][e], e))[:max_experts_per_token]
        for e in best:
            picked[e].append((t, s[t][e]))
    rows = [sorted(row, key=lambda tg: (-tg[1], tg[0])) for row in picked]
    return _layout(rows, max(1, max(len(row) for row in rows)))
