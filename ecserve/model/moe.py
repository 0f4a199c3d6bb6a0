"""The expert-choice MoE layer: float32 router, per-group routing, batched experts, combine."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ecserve.config import ModelConfig
from ecserve.model.kernels import Kernels
from ecserve.model.layers import GLUFeedForward, activation_fn
from ecserve.routing import policy_for
from ecserve.types import MoEStats


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, kernels: Kernels | None = None) -> None:
        super().__init__()
        kernels = kernels or Kernels()
        e, d, f = cfg.num_experts, cfg.hidden_size, cfg.expert_ffn_hidden_size
        self.layer = layer
        self.routing = cfg.routing
        self.policy = policy_for(cfg.routing.policy)  # fixed with the model (routing/policies.py)
        self.router = nn.Parameter(torch.empty(e, d))
        self.router_bias = nn.Parameter(torch.empty(e)) if cfg.router_bias else None
        # Experts stacked on a leading E axis, so all of them run as one batched GEMM.
        self.w_gate = nn.Parameter(torch.empty(e, f, d))
        self.w_up = nn.Parameter(torch.empty(e, f, d))
        self.w_down = nn.Parameter(torch.empty(e, d, f))
        self.act = activation_fn(cfg.activation)
        self.activation = cfg.activation
        # How the routed experts run (ecserve/model/experts.py); expert parallelism replaces
        # it once, before the first step (ecserve/parallel/moe_ep.py).
        self.experts = kernels.experts
        self.linear = kernels.linear
        fs = cfg.shared_expert_ffn_hidden_size
        self.shared = GLUFeedForward(d, fs, cfg.activation, kernels.linear) if fs else None
        # Qwen2-MoE: the shared expert's output is scaled by sigmoid(x @ shared_gate.T) [N, 1].
        self.shared_gate = nn.Parameter(torch.empty(1, d)) if cfg.shared_expert_gate else None
        # threshold policy: float32 [E], the calibrated theta_e (checkpoint tensor
        # layers.N.moe.threshold, set by the loader); None when the checkpoint has none.
        self.register_buffer("threshold", None, persistent=False)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Router probabilities, always in float32 (bf16 routers pick different tokens), also
        under a training step's autocast."""
        bias = None if self.router_bias is None else self.router_bias.float()
        with torch.autocast(x.device.type, enabled=False):
            return torch.softmax(F.linear(x.float(), self.router.float(), bias), dim=-1)  # [N, E]

    def route(
        self, x: torch.Tensor, group_bounds: Sequence[int], static_shapes: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's routing of x [N, d] (see route_scores)."""
        return self.route_scores(self.scores(x), group_bounds, static_shapes)

    def route_scores(
        self, scores: torch.Tensor, group_bounds: Sequence[int], static_shapes: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's routing from router probabilities [N, E]: idx [E, K] step-wide token
        positions (-1: empty slot) and gate [E, K] float32, every group's slots side by side.
        static_shapes: K never follows the data (per-token policies take their widest layout,
        K = N). The gates keep their autograd history."""
        return self.policy.route_step(scores, group_bounds, self.routing, self.threshold,
                                      static_shapes)

    def forward(
        self, x: torch.Tensor, group_bounds: Sequence[int], static_shapes: bool = False,
    ) -> tuple[torch.Tensor, MoEStats]:
        # x: [N, d]; routing groups are the contiguous token ranges [b[i], b[i+1]).
        idx, gate = self.route(x, group_bounds, static_shapes)  # [E, K] each
        y = self.apply_experts(x, idx, gate)  # [N, d]
        return y, self._stats(idx, gate, x.shape[0], group_bounds)

    def apply_experts(self, x: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor
                      ) -> torch.Tensor:
        """The layer's output for routed x [N, d]: the experts' combine plus the shared
        expert, summed in float32, returned in x's dtype."""
        y = self.combine(x, idx, gate)  # [N, d] float32
        if self.shared is not None:
            shared = self.shared(x)  # [N, d]
            if self.shared_gate is not None:
                shared = torch.sigmoid(F.linear(x, self.shared_gate)) * shared  # [N, 1] * [N, d]
            y = y + shared.float()
        return y.to(x.dtype)

    def combine(self, x: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """y_t = sum of gate * FFN_e(x_t) over slots holding t, in float32, by ascending expert."""
        return self.experts(self, x, idx, gate)

    def expert_glu(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        """GLU of the e-th expert this layer holds on its token rows: [k, d] -> [k, d]."""
        linear = self.linear
        h = self.act(linear(rows, self.w_gate[e], None)) * linear(rows, self.w_up[e], None)
        return linear(h, self.w_down[e], None)  # [k, f] -> [k, d]

    def _stats(
        self, idx: torch.Tensor, gate: torch.Tensor, n: int, group_bounds: Sequence[int]
    ) -> MoEStats:
        tokens, gate_sum, hist = self.stat_tensors(idx, gate, n)
        sizes = tuple(b - a for a, b in itertools.pairwise(group_bounds))
        return MoEStats(
            layer=self.layer,
            policy=self.routing.policy,
            group_sizes=sizes,
            capacity_slots=int(idx.shape[1]),
            tokens_per_expert=tokens,
            gate_sum=gate_sum,
            experts_per_token=hist,
        )

    @staticmethod
    def stat_tensors(idx: torch.Tensor, gate: torch.Tensor, n: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens per expert [E], their gate sums [E] and the experts-per-token histogram
        [E + 1] of a routing over n tokens."""
        # Counted by scatter_add over static shapes (no boolean indexing, no bincount: both
        # wait for the device), so a CUDA graph can hold the whole step, statistics included.
        valid = idx >= 0
        slots = torch.where(valid, idx, n).flatten()  # empty slots count toward a spare bin n
        per_token = torch.zeros(n + 1, dtype=torch.long, device=idx.device).scatter_add_(
            0, slots, torch.ones_like(slots))[:n]  # [N]: experts each token got
        hist = torch.zeros(idx.shape[0] + 1, dtype=torch.long, device=idx.device).scatter_add_(
            0, per_token, torch.ones_like(per_token))  # [E + 1]
        return valid.sum(dim=1), (gate * valid).sum(dim=1), hist
