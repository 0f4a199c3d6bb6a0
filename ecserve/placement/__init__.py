"""Expert placement across devices (issue 8, first slice): which device holds which expert.

One concern per file: `plan` (the Placement type and its JSON), `memory` (bytes per expert and
per device), `balanced` and `affinity` (the two strategies), `replicate` (extra copies of hot
experts where memory allows), `routing_stats` (co-selection statistics recorded from the engine
or given explicitly), `traffic` (the cross-device token model), `command` (`ecserve plan`).
"""

from ecserve.placement.affinity import affinity_placement
from ecserve.placement.balanced import balanced_placement, balanced_shares
from ecserve.placement.plan import Device, ModelShape, Placement, PlanError, load_plan, save_plan
from ecserve.placement.replicate import replicate_hot_experts
from ecserve.placement.routing_stats import RoutingStats, collect_routing_stats
from ecserve.placement.traffic import cross_device_tokens

__all__ = [
    "Device",
    "ModelShape",
    "Placement",
    "PlanError",
    "RoutingStats",
    "affinity_placement",
    "balanced_placement",
    "balanced_shares",
    "collect_routing_stats",
    "cross_device_tokens",
    "load_plan",
    "replicate_hot_experts",
    "save_plan",
]
