"""Replicated experts: copies of the hottest experts on other devices, while memory allows.

Experts are taken by descending token count over the recorded steps (all MoE layers together;
ties: lower layer, then lower expert); each is copied onto every device that lacks it and still
has room for one more expert, in device order, until no device has room. Experts no token chose
are never copied. The primary (first) device of every expert stays the one the base plan gave,
so per-device primary counts stay balanced. With replicas, a token uses the copy on its home
device when there is one (ecserve/placement/traffic.py).
"""

from __future__ import annotations

from ecserve.placement.memory import check_fits, free_bytes
from ecserve.placement.plan import Placement, PlanError
from ecserve.placement.routing_stats import RoutingStats


def replicate_hot_experts(plan: Placement, stats: RoutingStats, per_expert: int,
                          dense: int) -> Placement:
    unlimited = [d.id for d in plan.devices if d.memory_bytes is None]
    if unlimited:
        raise PlanError(f"replication needs each device's memory (device(s) {unlimited} have "
                        "none): give --device-memory")
    check_fits(plan, per_expert, dense)
    free = [int(f) for f in free_bytes(plan, per_expert, dense)]  # type: ignore[arg-type]
    holders = {layer: [list(h) for h in hs] for layer, hs in plan.layers.items()}
    heat = sorted(((int(n), layer, e) for layer in sorted(holders)
                   for e, n in enumerate(stats.tokens_per_expert(layer).tolist())),
                  key=lambda t: (-t[0], t[1], t[2]))
    for count, layer, e in heat:
        if count == 0 or max(free) < per_expert:
            break
        for dev in range(plan.num_devices):
            if dev not in holders[layer][e] and free[dev] >= per_expert:
                holders[layer][e].append(dev)
                free[dev] -= per_expert
    layers = {layer: tuple(tuple(h) for h in hs) for layer, hs in holders.items()}
    return Placement(plan.model, plan.devices, plan.strategy, layers)
