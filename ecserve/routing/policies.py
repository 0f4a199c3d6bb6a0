"""The routing policies as objects: each says what it needs and how it routes a step, so the
rest of the engine asks the policy instead of comparing its name (docs/routing.md §3-4).

A model's MoE layers hold their policy from the moment the model is built (`policy_for` on the
config's name); the batcher, the decode graphs, the compiled step, the checkpoint loader and
training read its properties.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import ClassVar

import torch

from ecserve.config import RoutingConfig, exact_fraction
from ecserve.routing.select import (
    Routing,
    _check_scores,
    capped_choice,
    expert_choice,
    expert_choice_groups,
    threshold_choice,
    token_choice,
)

Layout = tuple[torch.Tensor, torch.Tensor]  # idx int64 [E, K] step-wide positions, gate [E, K]


class RoutingPolicy:
    name: ClassVar[str]
    # Routes each token on its own (§4): batch-invariant, so any cut of a step into groups gives
    # the same routing and its layout is dropless (as wide as the busiest expert).
    per_token: ClassVar[bool] = False
    # Per-MoE-layer checkpoint tensors it needs beyond the weights (layers.N.moe.<name>).
    layer_tensors: ClassVar[tuple[str, ...]] = ()

    def route_group(self, scores: torch.Tensor, cfg: RoutingConfig,
                    thresholds: torch.Tensor | None = None) -> Routing:
        """One group's float32 router probabilities [n, E] -> its layout (positions in it)."""
        raise NotImplementedError

    def route_step(self, scores: torch.Tensor, group_bounds: Sequence[int], cfg: RoutingConfig,
                   thresholds: torch.Tensor | None = None, static_shapes: bool = False
                   ) -> Layout:
        """A step's routing: its groups [b[i], b[i+1]) side by side. static_shapes: K never
        follows the data (CUDA graphs, compiled steps). The gates keep their autograd history."""
        idx_parts, gate_parts = [], []
        for start, end in itertools.pairwise(group_bounds):
            r = self.route_group(scores[start:end], cfg, thresholds)
            idx_parts.append(torch.where(r.idx >= 0, r.idx + start, -1))  # [E, k_g] step-wide
            gate_parts.append(r.gate)
        return torch.cat(idx_parts, dim=1), torch.cat(gate_parts, dim=1)

    def static_blocker(self, cfg: RoutingConfig, num_experts: int) -> str | None:
        """Why a step of fixed shapes (a CUDA graph) cannot hold this routing (None: it can)."""
        return None

    def experts_per_token(self, cfg: RoutingConfig) -> float:
        """Experts a token gets on average (the model card's active parameters)."""
        return cfg.capacity_factor

    def balance_loss(self, scores: torch.Tensor, per_expert: torch.Tensor) -> torch.Tensor:
        """The auxiliary load-balancing loss training adds (0: balanced by construction)."""
        return scores.new_zeros(())

    def kth_score(self, gate: torch.Tensor, groups: int) -> torch.Tensor | None:
        """float32 [E]: each expert's k-th largest score, mean over the groups (training records
        it to calibrate thresholds); None where slots are not a per-group top-k."""
        return None


class _PerToken(RoutingPolicy):
    per_token = True

    def route_step(self, scores: torch.Tensor, group_bounds: Sequence[int], cfg: RoutingConfig,
                   thresholds: torch.Tensor | None = None, static_shapes: bool = False
                   ) -> Layout:
        # The grouping changes nothing: route the whole step at once (one dropless layout,
        # less padding than one per group); static: its widest layout, K = N.
        return self._route(scores, cfg, thresholds, static_shapes)

    def route_group(self, scores: torch.Tensor, cfg: RoutingConfig,
                    thresholds: torch.Tensor | None = None) -> Routing:
        return Routing(*self._route(scores, cfg, thresholds, False))

    def _route(self, scores: torch.Tensor, cfg: RoutingConfig, thresholds: torch.Tensor | None,
               static: bool) -> Layout:
        raise NotImplementedError


class ExpertChoice(RoutingPolicy):
    """`ec`: each expert takes the k(n) highest-scoring tokens of each group."""

    name = "ec"

    def route_group(self, scores: torch.Tensor, cfg: RoutingConfig,
                    thresholds: torch.Tensor | None = None) -> Routing:
        n, num_experts = _check_scores(scores)
        return Routing(*expert_choice(scores, cfg.capacity(n, num_experts)))

    def route_step(self, scores: torch.Tensor, group_bounds: Sequence[int], cfg: RoutingConfig,
                   thresholds: torch.Tensor | None = None, static_shapes: bool = False
                   ) -> Layout:
        sizes = {b - a for a, b in itertools.pairwise(group_bounds)}
        if len(sizes) != 1:
            return super().route_step(scores, group_bounds, cfg, thresholds, static_shapes)
        # Equal groups (training steps, full decode steps): all of them in one sort.
        e = scores.shape[1]
        (n,), g, start = sizes, len(group_bounds) - 1, group_bounds[0]
        idx, gate = expert_choice_groups(scores[start:start + g * n].view(g, n, e),
                                         cfg.capacity(n, e))  # [G, E, k]
        idx = idx + (start + n * torch.arange(g, device=idx.device))[:, None, None]
        return idx.transpose(0, 1).reshape(e, -1), gate.transpose(0, 1).reshape(e, -1)

    def kth_score(self, gate: torch.Tensor, groups: int) -> torch.Tensor | None:
        # Slots are by descending gate within each group: the last is the k-th largest score.
        return gate.detach().view(gate.shape[0], groups, -1)[:, :, -1].mean(1)


class Capped(RoutingPolicy):
    """`capped`: greedy (token, expert) pairs by descending score under both caps."""

    name = "capped"

    def route_group(self, scores: torch.Tensor, cfg: RoutingConfig,
                    thresholds: torch.Tensor | None = None) -> Routing:
        n, num_experts = _check_scores(scores)
        # ceil(n * c) on the exact decimal c, so e.g. n=10, c=0.7 gives 7, not float's 8.
        total = math.ceil(n * exact_fraction(cfg.capacity_factor))
        return Routing(*capped_choice(scores, cfg.capacity(n, num_experts),
                                      cfg.experts_per_token_cap(num_experts), total))

    def static_blocker(self, cfg: RoutingConfig, num_experts: int) -> str | None:
        if cfg.experts_per_token_cap(num_experts) < num_experts:
            return "capped routing with max_experts_per_token < num_experts decides in rounds"
        return None


class Threshold(_PerToken):
    """`threshold`: token t goes to expert e iff S[t, e] >= theta_e (calibrated per layer)."""

    name = "threshold"
    layer_tensors = ("threshold",)

    def _route(self, scores: torch.Tensor, cfg: RoutingConfig, thresholds: torch.Tensor | None,
               static: bool) -> Layout:
        if thresholds is None:
            raise ValueError("threshold routing needs the model's calibrated thresholds "
                             "(checkpoint tensors layers.N.moe.threshold)")
        return threshold_choice(scores, thresholds, cfg.experts_per_token_cap(scores.shape[1]),
                                static)


class TokenChoice(_PerToken):
    """`token_choice`: each token takes its top_k experts (dropless)."""

    name = "token_choice"

    def _route(self, scores: torch.Tensor, cfg: RoutingConfig, thresholds: torch.Tensor | None,
               static: bool) -> Layout:
        return token_choice(scores, cfg.top_k, cfg.renormalize, static)

    def experts_per_token(self, cfg: RoutingConfig) -> float:
        return cfg.top_k

    def balance_loss(self, scores: torch.Tensor, per_expert: torch.Tensor) -> torch.Tensor:
        # Switch/GShard: E * sum_e (share of routed slots) * (mean probability).
        share = per_expert.float() / per_expert.sum()
        return scores.shape[1] * (share * scores.mean(0)).sum()


ROUTING_POLICIES: dict[str, RoutingPolicy] = {
    p.name: p for p in (ExpertChoice(), Capped(), Threshold(), TokenChoice())}


def policy_for(name: str) -> RoutingPolicy:
    policy = ROUTING_POLICIES.get(name)
    if policy is None:
        raise ValueError(f"unknown routing policy {name!r}; implemented: "
                         f"{', '.join(sorted(ROUTING_POLICIES))}")
    return policy


def route(scores: torch.Tensor, cfg: RoutingConfig) -> Routing:
    """Route one group's float32 router probabilities [n, E] with cfg's policy (`threshold`
    also needs the model's thresholds: its MoE layer routes it)."""
    return policy_for(cfg.policy).route_group(scores, cfg)
