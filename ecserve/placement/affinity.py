"""Affinity-aware placement: balanced shares, with experts that choose the same tokens together.

Per MoE layer, the co-selection graph (weight C[i, j]: tokens chosen by both i and j) is split
into parts of exactly the balanced shares (ecserve/placement/balanced.py) so as to minimise the
cut weight, the token-expert pairs that have to cross devices:
1. greedy: experts by descending total co-selection, each to the device it has most affinity
   with among those with room (ties: more room, then lower id);
2. refinement, Kernighan-Lin style: repeatedly apply the swap of two experts on different
   devices that lowers the cut most, until no swap does (sizes never change);
3. the same refinement from the contiguous split and from `restarts` seeded random splits.
The candidates (and the plain balanced split) are then scored with the exact traffic model on the
recorded steps (ecserve/placement/traffic.py); the lowest wins (ties: lower cut, then the earlier
candidate). So on the recorded routing the plan never sends more than the balanced one, and the
result is deterministic for a given seed.
"""

from __future__ import annotations

import torch

from ecserve.placement.balanced import balanced_shares, contiguous_owners
from ecserve.placement.plan import Device, ModelShape, Placement
from ecserve.placement.routing_stats import RoutingStats
from ecserve.placement.traffic import layer_traffic


def cut_weight(weights: torch.Tensor, owner: list[int]) -> int:
    """Sum of weights[i, j] over pairs i < j on different devices (weights: int64 [E, E])."""
    o = torch.tensor(owner)
    split = o[:, None] != o[None, :]
    return int(weights[split].sum()) // 2


def greedy_partition(weights: torch.Tensor, sizes: list[int]) -> list[int]:
    e = weights.shape[0]
    order = sorted(range(e), key=lambda i: (-int(weights[i].sum()), i))
    room = list(sizes)
    aff = torch.zeros(e, len(sizes), dtype=torch.int64)  # affinity to what each device holds
    owner = [-1] * e
    for i in order:
        dev = max((d for d in range(len(sizes)) if room[d] > 0),
                  key=lambda d: (int(aff[i, d]), room[d], -d))
        owner[i] = dev
        room[dev] -= 1
        aff[:, dev] += weights[:, i]
    return owner


def refine(weights: torch.Tensor, owner: list[int], num_devices: int,
           max_swaps: int = 10_000) -> list[int]:
    """Best-improvement pairwise swaps until no swap lowers the cut (each one strictly does).

    Integer weights throughout: exact gains, and no BLAS (tiny float matmuls can cost
    milliseconds each on a loaded machine)."""
    owner = list(owner)
    e = len(owner)
    if e < 2 or num_devices < 2:
        return owner
    for _ in range(max_swaps):
        o = torch.tensor(owner)
        aff = weights @ torch.nn.functional.one_hot(o, num_devices)  # int64 [E, D]
        own = aff[torch.arange(e), o]  # [E]
        # Swapping a and b: a gains its ties to b's device, loses those to its own; same for b;
        # the a-b edge stays cut, but was counted on both sides.
        gain = aff[:, o] - own[:, None]  # [a, b]: aff[a, owner[b]] - own[a]
        gain = gain + gain.T - 2 * weights
        gain[o[:, None] == o[None, :]] = -1  # same device: no swap
        best = int(torch.argmax(gain))
        if int(gain.flatten()[best]) <= 0:
            break
        a, b = divmod(best, e)
        owner[a], owner[b] = owner[b], owner[a]
    return owner


def partition_candidates(weights: torch.Tensor, sizes: list[int], seed: int,
                         restarts: int) -> list[list[int]]:
    """Refined partitions from the greedy, contiguous and seeded random starts."""
    d = len(sizes)
    contiguous = [dev for dev, n in enumerate(sizes) for _ in range(n)]
    starts = [greedy_partition(weights, sizes), contiguous]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(restarts):
        perm = torch.randperm(len(contiguous), generator=gen).tolist()
        starts.append([contiguous[p] for p in perm])
    return [refine(weights, s, d) for s in starts]


def affinity_owners(stats: RoutingStats, layer: int, num_devices: int, seed: int = 0,
                    restarts: int = 8) -> list[int]:
    """One layer's owner per expert: balanced shares, lowest traffic on the recorded steps."""
    e = stats.num_experts
    weights = stats.coselection(layer).fill_diagonal_(0)  # int64 [E, E]
    sizes = balanced_shares(e, num_devices)
    candidates = [*partition_candidates(weights, sizes, seed, restarts),
                  contiguous_owners(e, num_devices)]
    mats = stats.layers[layer]

    def score(owner: list[int]) -> tuple[float, int]:
        return layer_traffic(mats, [(o,) for o in owner], num_devices), cut_weight(weights, owner)

    return min(candidates, key=score)  # min keeps the first of equal scores


def affinity_placement(model: ModelShape, devices: tuple[Device, ...], stats: RoutingStats,
                       seed: int = 0, restarts: int = 8) -> Placement:
    missing = sorted(set(model.moe_layers) - set(stats.layers))
    if missing:
        raise ValueError(f"the routing statistics have no steps for MoE layer(s) {missing}")
    if stats.num_experts != model.num_experts:
        raise ValueError(f"the routing statistics have {stats.num_experts} experts, the model "
                         f"{model.num_experts}")
    layers = {layer: tuple((o,) for o in affinity_owners(stats, layer, len(devices), seed,
                                                         restarts))
              for layer in model.moe_layers}
    return Placement(model, tuple(devices), "affinity", layers)
