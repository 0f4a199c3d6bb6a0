"""The cross-device traffic model: tokens a placement sends between devices per step.

Expert parallelism over D devices, one MoE layer, one step of N tokens (in the order the model
saw them):
- Home: token t lives on device t * D // N (the step's tokens split into D contiguous, equal
  (+-1) runs, as ecserve/parallel's expert-parallel combine does). Its expert outputs are
  combined there.
- Dispatch: the token is sent once to every other device that runs one of its experts for it; a
  token with several experts on one remote device crosses once (the receiver reuses the row).
  dedup=False counts one row per (token, remote expert) slot instead, as a plain all_to_all of
  slots moves.
- Which copy: an expert with a replica on the token's home runs there (no transfer); else, if one
  of the expert's devices already receives the token (for an expert held only there, or an
  earlier one, experts taken in ascending order, single-holder ones first), that one; else the
  expert's primary device (its first).
- Counted: dispatched tokens, one direction. The results come back over the same pairs (one
  combined row per token and device, if the device sums its experts' outputs first), so the
  return traffic equals it: double the figure for both directions; times hidden_size * dtype
  bytes for bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ecserve.placement.plan import Placement
from ecserve.placement.routing_stats import RoutingStats


def token_sends(home: int, experts: Sequence[int], holders: Sequence[Sequence[int]],
                dedup: bool = True) -> int:
    """Devices other than `home` that one token choosing `experts` is sent to (dedup=False:
    its expert slots not served at home)."""
    pending = [e for e in experts if home not in holders[e]]
    if not dedup:
        return len(pending)
    targets = {holders[e][0] for e in pending if len(holders[e]) == 1}
    for e in pending:
        if len(holders[e]) > 1 and not targets.intersection(holders[e]):
            targets.add(holders[e][0])
    return len(targets)


def homes(n: int, num_devices: int) -> torch.Tensor:
    """int64 [n]: each token's home device, t * D // n."""
    return torch.arange(n) * num_devices // n


def step_traffic(a: torch.Tensor, holders: Sequence[Sequence[int]], num_devices: int,
                 dedup: bool = True) -> int:
    """Tokens dispatched across devices for one step's routing a: bool [N, E]."""
    n = a.shape[0]
    if n == 0:
        return 0
    if all(len(h) == 1 for h in holders):  # no replicas: exact and vectorised
        owner = torch.tensor([h[0] for h in holders])
        onehot = torch.nn.functional.one_hot(owner, num_devices)  # int64 [E, D]
        # Integer matmul: exact, and no BLAS threads (a loaded machine makes those slow).
        reached = a.long() @ onehot  # [N, D]: experts each token needs on each device
        if dedup:
            reached = (reached > 0).long()
        return int(reached.sum() - reached[torch.arange(n), homes(n, num_devices)].sum())
    home = homes(n, num_devices)[:, None]
    rows, counts = torch.unique(torch.cat([home, a.long()], dim=1), dim=0, return_counts=True)
    total = 0
    for row, count in zip(rows.tolist(), counts.tolist(), strict=True):
        experts = [e for e, chosen in enumerate(row[1:]) if chosen]
        total += count * token_sends(row[0], experts, holders, dedup)
    return total


def layer_traffic(mats: Sequence[torch.Tensor], holders: Sequence[Sequence[int]],
                  num_devices: int, dedup: bool = True) -> float:
    """Mean tokens dispatched across devices per step, over the recorded steps."""
    if not mats:
        return 0.0
    return sum(step_traffic(a, holders, num_devices, dedup) for a in mats) / len(mats)


def cross_device_tokens(plan: Placement, stats: RoutingStats,
                        dedup: bool = True) -> dict[int, float]:
    """Per MoE layer: mean tokens per step the plan sends between devices (one direction)."""
    missing = sorted(set(plan.layers) - set(stats.layers))
    if missing:
        raise ValueError(f"the routing statistics have no steps for MoE layer(s) {missing}")
    if stats.num_experts != plan.model.num_experts:
        raise ValueError(f"the routing statistics have {stats.num_experts} experts, the plan "
                         f"{plan.model.num_experts}")
    return {layer: layer_traffic(stats.layers[layer], plan.layers[layer], plan.num_devices,
                                 dedup) for layer in sorted(plan.layers)}
