"""The selection rules: which tokens of one routing group each expert processes
(docs/routing.md §3-4). The policies that use them: ecserve/routing/policies.py.

Every rule returns the expert-centric layout: idx[E, k] (token position in the group, -1 for an
empty slot) and gate[E, k] (float32, 0 for an empty slot), slots by descending gate, ties to the
lower token index. Ties resolve to the lower token index, then the lower expert index, everywhere:
torch.topk has no tie order, so every selection uses a stable descending sort instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Routing:
    idx: torch.Tensor  # int64 [E, k]: token position in the group per expert slot, -1 = empty slot
    # float32 [E, k]: S[t, e] of the chosen token (0 for an empty slot; for token_choice with
    # renormalize, the renormalised weight)
    gate: torch.Tensor


def _check_scores(scores: torch.Tensor) -> tuple[int, int]:
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dtype != torch.float32:
        # bf16/fp16 routers change which tokens experts pick (spec §1): refuse, don't upcast.
        raise ValueError(f"scores must be float32 router probabilities, got {scores.dtype}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be [n, E] for one routing group, got shape "
                         f"{tuple(scores.shape)}")
    n, num_experts = scores.shape
    if n < 1 or num_experts < 1:
        raise ValueError(f"scores must have >= 1 token and >= 1 expert, got shape ({n}, "
                         f"{num_experts})")
    return n, num_experts


def _check_capacity(capacity: int, n: int) -> None:
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    if capacity > n:
        raise ValueError(f"capacity {capacity} exceeds the group's {n} tokens")


def _sort_desc(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the last dim by descending value; equal values keep index order (lower index first)."""
    return torch.sort(x, dim=-1, descending=True, stable=True)


def _pack(
    tok: torch.Tensor, gate: torch.Tensor, keep: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's kept entries, in their row order, to the first slots of a [rows, width]
    layout; the rest is padding (-1, 0). No row may keep more than `width` entries."""
    # Dropped entries all go to a spare last column (same value, so scatter order is moot).
    pos = torch.where(keep, keep.long().cumsum(1) - 1, width)
    rows = tok.shape[0]
    idx = tok.new_full((rows, width + 1), -1).scatter_(1, pos, torch.where(keep, tok, -1))
    out = gate.new_zeros((rows, width + 1)).scatter_(1, pos, torch.where(keep, gate, 0.0))
    return idx[:, :width].contiguous(), out[:, :width].contiguous()


def _earlier(mask: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """For each entry, how many entries before it in its row's `order` are set in `mask`."""
    m = mask.gather(-1, order).long()
    return torch.empty_like(m).scatter_(-1, order, m.cumsum(-1) - m)


def expert_choice(scores: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert takes its `capacity` highest-scoring tokens: idx, gate [E, capacity]."""
    n, _ = _check_scores(scores)
    _check_capacity(capacity, n)
    idx, gate = expert_choice_groups(scores[None], capacity)
    return idx[0], gate[0]


def expert_choice_groups(
    scores: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ec` over G equal-sized groups at once: scores [G, n, E] -> idx, gate [G, E, capacity].

    The gates keep their autograd history (training routes through this)."""
    gate, idx = _sort_desc(scores.transpose(-1, -2))  # [G, E, n]
    return idx[..., :capacity].contiguous(), gate[..., :capacity].contiguous()


def capped_choice(
    scores: torch.Tensor, capacity: int, max_experts_per_token: int, total: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy over (token, expert) pairs by descending score (ties: lower token, lower expert):
    accept while the expert has < capacity tokens and the token < max_experts_per_token experts;
    stop after `total` accepted pairs. idx, gate [E, capacity], unfilled slots -1 / 0.

    The greedy is sequential by definition; it is computed exactly in rounds. A pair's fate depends
    only on earlier pairs, so an undecided pair is accepted once its expert and its token have room
    even if every undecided earlier pair were accepted, and rejected once accepted earlier pairs
    already fill either cap. The first undecided pair always has no undecided predecessor, so each
    round decides at least it; on router scores a few rounds decide everything.
    """
    n, num_experts = _check_scores(scores)
    _check_capacity(capacity, n)
    if max_experts_per_token < 1:
        raise ValueError(f"max_experts_per_token must be >= 1, got {max_experts_per_token}")
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    b = max_experts_per_token
    # The global order restricted to one expert (one token) is that expert's (token's) stable
    # descending sort, so "earlier pairs of the same expert/token" are prefixes of these rows.
    ex_gate, ex_tok = _sort_desc(scores.t())  # [E, n]
    if b >= num_experts:
        # The token cap never binds: every expert keeps its top `capacity`, as in ec.
        first = torch.arange(n, device=scores.device) < capacity
        acc = torch.empty_like(ex_tok, dtype=torch.bool).scatter_(
            1, ex_tok, first.expand(num_experts, n)).t()
    else:
        _, tok_exp = _sort_desc(scores)  # [n, E]
        acc = torch.zeros(n, num_experts, dtype=torch.bool, device=scores.device)
        live = torch.ones_like(acc)  # accepted or undecided (not rejected)
        ex_order, tok_order = ex_tok.expand(2, -1, -1), tok_exp.expand(2, -1, -1)
        while True:
            und = live & ~acc
            if not bool(und.any()):
                break
            state = torch.stack((acc, live))  # [2, n, E]: earlier accepted / earlier live
            per_ex = _earlier(state.transpose(1, 2), ex_order).transpose(1, 2)
            per_tok = _earlier(state, tok_order)
            # Both updates read the state at the start of the round, so they never conflict.
            acc = acc | (und & (per_ex[1] < capacity) & (per_tok[1] < b))
            live = live & ~(und & ((per_ex[0] >= capacity) | (per_tok[0] >= b)))
    if total < num_experts * capacity:
        # Stopping after `total` acceptances keeps the first `total` accepted pairs in global
        # order (later decisions never change earlier ones). Row-major flattening is (token,
        # expert) order, so a stable sort of the flat scores is the global order.
        _, perm = _sort_desc(scores.reshape(-1))
        acc_g = acc.reshape(-1)[perm]
        keep_g = acc_g & (acc_g.long().cumsum(0) <= total)
        acc = torch.empty_like(keep_g).scatter_(0, perm, keep_g).view(n, num_experts)
    return _pack(ex_tok, ex_gate, acc.t().gather(1, ex_tok), capacity)


def token_choice(
    scores: torch.Tensor, top_k: int, renormalize: bool, static_width: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token takes its top_k experts (ties: lower expert); dropless expert-centric layout
    [E, m], m the most tokens any expert got, slots by descending gate (ties: lower token).

    static_width: m = n, the most any expert can get, so the shape never follows the data (no
    host sync: CUDA graphs); the extra slots are empty, the filled ones are the same."""
    _, num_experts = _check_scores(scores)
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}] (the experts), got {top_k}")
    top, exp = _sort_desc(scores)
    top, exp = top[:, :top_k], exp[:, :top_k]
    if renormalize:
        # In float64, then rounded once: float32 sums depend on the reduction order (CPU vs GPU);
        # this gives the correctly rounded ratio on every device, so routing is reproducible.
        top64 = top.double()
        top = (top64 / top64.sum(-1, keepdim=True)).float()
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, exp, True)
    # -inf marks unchosen pairs; _dropless only keeps chosen ones anyway.
    return _dropless(chosen, torch.full_like(scores, -math.inf).scatter(1, exp, top),
                     static_width)


def threshold_choice(
    scores: torch.Tensor, thresholds: torch.Tensor, max_experts_per_token: int,
    static_width: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token t goes to expert e iff S[t, e] >= thresholds[e], at most max_experts_per_token
    experts per token, best first (ties: lower expert). Dropless layout as token_choice's, the
    gate the raw S[t, e]. Each token is routed on its own: causal and batch-invariant."""
    n, num_experts = _check_scores(scores)
    if thresholds.shape != (num_experts,) or thresholds.dtype != torch.float32:
        raise ValueError(f"thresholds must be float32 [{num_experts}], got "
                         f"{thresholds.dtype} {list(thresholds.shape)}")
    if max_experts_per_token < 1:
        raise ValueError(f"max_experts_per_token must be >= 1, got {max_experts_per_token}")
    chosen = scores >= thresholds
    if max_experts_per_token < num_experts:
        # [n, E]: each token's passing experts, best first (the others sort after them)
        _, order = _sort_desc(torch.where(chosen, scores, -math.inf))
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(num_experts, device=scores.device).expand(n, -1))
        chosen &= rank < max_experts_per_token
    return _dropless(chosen, scores, static_width)


def _dropless(
    chosen: torch.Tensor, weight: torch.Tensor, static_width: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-centric choices (chosen bool [n, E], weight [n, E]) -> the expert-centric layout
    [E, m], m the most tokens any expert got (static_width: n), slots by descending weight
    (ties: lower token)."""
    gate, tok = _sort_desc(torch.where(chosen, weight, -math.inf).t())
    # dropless: the busiest expert sets the width (read back from the device, unless static)
    # (at least one slot, so no expert has an empty layout)
    width = chosen.shape[0] if static_width else max(1, int(chosen.sum(0).max()))
    return _pack(tok[:, :width], gate[:, :width], chosen.t().gather(1, tok[:, :width]), width)
