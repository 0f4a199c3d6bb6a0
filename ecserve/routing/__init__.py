"""Routing: the selection rules (select.py) and the policies that use them (policies.py),
docs/routing.md §3-4."""

from ecserve.routing.policies import ROUTING_POLICIES, RoutingPolicy, policy_for, route
from ecserve.routing.select import (
    Routing,
    capped_choice,
    expert_choice,
    expert_choice_groups,
    threshold_choice,
    token_choice,
)

__all__ = ["ROUTING_POLICIES", "Routing", "RoutingPolicy", "capped_choice", "expert_choice",
           "expert_choice_groups", "policy_for", "route", "threshold_choice", "token_choice"]
