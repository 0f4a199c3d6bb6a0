"""Expert-choice router selection in Triton: per expert, the top-k tokens of each group.

Rank-based and exact: a token's rank in its expert's column is the number of tokens of its group
that beat it (higher score, or equal score and lower index); the token with rank r < k goes to
slot r. Ranks are distinct, so every slot is written once: no sort, no atomics, deterministic.
Work is O(n^2) per (group, expert), spread over cdiv(n, BLOCK_I) programs; routing groups are
small (tens to a few thousand tokens), where this beats a sort's several passes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import _check_select


@triton.jit
def _ec_select_kernel(
    scores_ptr,  # float32 [G, n, E] contiguous
    idx_ptr,  # int64 [G, E, k], pre-filled with -1
    gate_ptr,  # float32 [G, E, k], pre-filled with 0
    group_k_ptr,  # int32 [G] (read only if HAS_GROUP_K)
    n, num_experts, k,
    HAS_GROUP_K: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    ge = tl.program_id(0)  # g * E + e
    g = ge // num_experts
    e = ge % num_experts
    col = scores_ptr + g.to(tl.int64) * n * num_experts + e  # column e of group g, stride E
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)  # [BI]
    in_i = offs_i < n
    s_i = tl.load(col + offs_i * num_experts, mask=in_i, other=0.0)  # [BI]
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, n, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)  # [BJ]
        in_j = offs_j < n
        s_j = tl.load(col + offs_j * num_experts, mask=in_j, other=0.0)  # [BJ]
        beats = (s_j[None, :] > s_i[:, None]) | (
            (s_j[None, :] == s_i[:, None]) & (offs_j[None, :] < offs_i[:, None]))  # [BI, BJ]
        beats = beats & in_j[None, :]
        rank += tl.sum(beats.to(tl.int32), axis=1)
    k_g = k
    if HAS_GROUP_K:
        k_g = tl.minimum(tl.load(group_k_ptr + g), k)
    # -inf marks a padding token: its slot stays empty (-1, 0).
    take = in_i & (rank < k_g) & (s_i != float("-inf"))
    out = ge.to(tl.int64) * k + rank
    tl.store(idx_ptr + out, offs_i.to(tl.int64), mask=take)
    tl.store(gate_ptr + out, s_i, mask=take)


def ec_select(
    scores: torch.Tensor, k: int, group_k: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ec_select_reference: scores [G, n, E] float32 -> idx [G, E, k] int64,
    gate [G, E, k] float32 (see the reference and README.md for the contract)."""
    g, n, e = _check_select(scores, k)
    scores = scores.contiguous()
    idx = torch.full((g, e, k), -1, dtype=torch.int64, device=scores.device)
    gate = torch.zeros((g, e, k), dtype=torch.float32, device=scores.device)
    gk = (group_k if group_k is not None else torch.zeros(1, device=scores.device)).to(
        device=scores.device, dtype=torch.int32).contiguous()
    block_i = min(64, triton.next_power_of_2(n))
    block_j = min(128, triton.next_power_of_2(n))
    grid = (g * e, triton.cdiv(n, block_i))
    _ec_select_kernel[grid](
        scores, idx, gate, gk, n, e, k,
        HAS_GROUP_K=group_k is not None, BLOCK_I=block_i, BLOCK_J=block_j,
    )
    return idx, gate
