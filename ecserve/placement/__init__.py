"""Expert placement across devices: which device holds which expert.

One concern per file: `plan` (the Placement type and its JSON), `memory` (bytes per expert and
per device), `balanced` and `affinity` (the two strategies), `replicate` (extra copies of hot
experts where memory allows), `routing_stats` (co-selection statistics recorded from the engine
or given explicitly), `traffic` (the cross-device token model), `options` and `command`
(`ecserve plan`).
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use, so the command line's parser (placement.options) loads no torch.
_EXPORTS = {
    "affinity_placement": "ecserve.placement.affinity",
    "balanced_placement": "ecserve.placement.balanced",
    "balanced_shares": "ecserve.placement.balanced",
    "Device": "ecserve.placement.plan",
    "ModelShape": "ecserve.placement.plan",
    "Placement": "ecserve.placement.plan",
    "PlanError": "ecserve.placement.plan",
    "load_plan": "ecserve.placement.plan",
    "save_plan": "ecserve.placement.plan",
    "replicate_hot_experts": "ecserve.placement.replicate",
    "RoutingStats": "ecserve.placement.routing_stats",
    "collect_routing_stats": "ecserve.placement.routing_stats",
    "cross_device_tokens": "ecserve.placement.traffic",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ecserve.placement' has no attribute {name!r}")
