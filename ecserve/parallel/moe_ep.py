"""The expert-parallel MoE combine: each rank runs its own experts, the outputs go home.

Every rank runs attention and the dense layers for all tokens, so it holds the whole input
x [N, d], and the same router on the same tokens, so `idx`/`gate` [E, K] are identical
everywhere: no token row needs sending to an expert's owner, and every rank knows who computes
what. Token t's home rank is t * world // N (a contiguous split of the step's tokens). Each
owner runs GLU_e on its experts' slots, grouped by the token's home rank, and sends the outputs
home with one all_to_all_single (split sizes from the shared routing, so no count exchange);
the home rank applies the gates and sums in float32 in ascending expert order (index_add_ in
expert-major order, as MoELayer.combine does), and an all-gather gives every rank the whole
[N, d] result. Two collectives per MoE layer.

The placement is the planner's (ecserve.placement.Placement), per MoE layer: an expert's primary
device is the rank owning it. Plans with replicas are refused for now (executable_placement).

Traffic counter: every rank computes the layer's W x W matrix rows[src, dst] (slots whose
token lives on src and whose expert is on dst) from the shared routing; `traffic` accumulates
it. Off-diagonal entries are the cross-device rows (the outputs dst sends back to src),
comparable to the planner's prediction with dedup=False.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ecserve.config import ModelConfig
from ecserve.model.moe import MoELayer
from ecserve.parallel.group import ParallelGroup
from ecserve.placement.balanced import balanced_placement
from ecserve.placement.plan import Device, ModelShape, Placement, PlanError


def default_placement(cfg: ModelConfig, world: int) -> Placement:
    """The balanced contiguous plan: equal (+-1) runs of experts per rank, every layer."""
    return balanced_placement(ModelShape.of(cfg), tuple(Device(r) for r in range(world)))


def executable_placement(plan: Placement, cfg: ModelConfig, world: int) -> Placement:
    """The plan, if the executor can run it for this model over `world` ranks; else PlanError."""
    plan.check_model(cfg)
    if plan.num_devices != world:
        raise PlanError(f"the plan places experts on {plan.num_devices} devices, expert "
                        f"parallelism runs {world} ranks")
    if plan.replicated:
        copies = [(layer, e, list(h)) for layer, hs in sorted(plan.layers.items())
                  for e, h in enumerate(hs) if len(h) > 1]
        layer, e, h = copies[0]
        raise PlanError(f"the plan replicates {len(copies)} expert(s) (e.g. layer {layer} expert "
                        f"{e} on devices {h}); executing replicas is not supported yet: plan "
                        "without --replicate")
    return plan


def owned_experts(plan: Placement, rank: int) -> dict[int, list[int]]:
    """MoE layer -> the experts `rank` owns (ascending): the weight loader's expert filter."""
    return {layer: plan.experts_on(layer, rank, primary_only=True) for layer in plan.layers}


def home_range(rank: int, world: int, n: int) -> tuple[int, int]:
    """[lo, hi): the tokens t with t * world // n == rank."""
    return -(-rank * n // world), -(-(rank + 1) * n // world)


class ExpertParallelCombine:
    """The expert backend of a sharded layer (ecserve/model/experts.py), installed once before
    the first step; keeps only this rank's experts in `layer`."""

    name = "expert-parallel"
    graph_blocker = "expert parallelism exchanges rows between processes each step"

    def __init__(self, layer: MoELayer, group: ParallelGroup, owners: Sequence[int]) -> None:
        """owners[e]: the rank holding expert e of this layer. The layer holds either all E
        experts (the ones this rank does not own are dropped here) or exactly the owned ones
        already (loaded with the weight loader's expert filter)."""
        e = layer.router.shape[0]
        if len(owners) != e:
            raise ValueError(f"placement covers {len(owners)} experts, layer {layer.layer} "
                             f"has {e}")
        self.layer = layer
        self.rank, self.world = group.rank, group.world
        self.owned = [x for x, r in enumerate(owners) if r == group.rank]
        self.owner = torch.tensor(list(owners), dtype=torch.long)  # [E]
        held = layer.w_gate.shape[0]
        if held == e and len(self.owned) != e:
            # Keep only the owned experts' weights ([E_own, ...], in ascending expert order).
            for name in ("w_gate", "w_up", "w_down"):
                w = getattr(layer, name)
                setattr(layer, name, nn.Parameter(w[self.owned].clone(), requires_grad=False))
        elif held != len(self.owned):
            raise ValueError(f"layer {layer.layer} holds {held} experts; rank {self.rank} owns "
                             f"{len(self.owned)} of {e}")
        self.traffic = torch.zeros(self.world, self.world, dtype=torch.long)  # rows[src, dst]
        self.calls = 0
        layer.experts = self

    def __call__(self, layer: MoELayer, x: torch.Tensor, idx: torch.Tensor,
                 gate: torch.Tensor) -> torch.Tensor:
        n, d = x.shape
        num_e, k = idx.shape
        w = self.world
        flat = idx.flatten()  # [E*K], expert-major
        experts = torch.arange(num_e, device=idx.device).repeat_interleave(k)  # [E*K]
        valid = flat >= 0
        home = torch.where(valid, flat * w // n, 0)  # [E*K]: rank holding each slot's token
        owner = self.owner.to(idx.device)[experts]  # [E*K]: rank computing each slot
        pair = torch.where(valid, home * w + owner, w * w)  # empty slots: a spare bin
        matrix = torch.zeros(w * w + 1, dtype=torch.long, device=idx.device).scatter_add_(
            0, pair, torch.ones_like(pair))[: w * w].view(w, w)  # rows[home, owner]
        counts = matrix.cpu()
        self.traffic += counts
        self.calls += 1
        # This rank computes its experts' slots, grouped by the token's home, expert-major within.
        pos = (valid & (owner == self.rank)).nonzero().squeeze(1)
        pos = pos[torch.sort(home[pos], stable=True).indices]
        out = self.experts(x[flat[pos]], experts[pos])  # [R, d] in x.dtype
        # It gets back its home slots' outputs, grouped by owner, expert-major within.
        slots = (valid & (home == self.rank)).nonzero().squeeze(1)  # [P], expert-major
        perm = torch.sort(owner[slots], stable=True).indices
        back = x.new_empty(len(slots), d)
        dist.all_to_all_single(back, out, counts[self.rank].tolist(),
                               counts[:, self.rank].tolist())
        res = torch.empty_like(back)
        res[perm] = back  # back to expert-major slot order
        contrib = res.float() * gate.flatten()[slots].float()[:, None]  # [P, d]
        lo, hi = home_range(self.rank, w, n)
        y_home = torch.zeros(hi - lo, d, dtype=torch.float32, device=x.device)
        y_home.index_add_(0, flat[slots] - lo, contrib)  # each token's experts in ascending order
        return self.all_gather(y_home, n)

    def experts(self, xs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """GLU_e(row) for rows [R, d] with global expert ids [R] this rank owns."""
        layer, out = self.layer, torch.empty_like(xs)
        for le, e in enumerate(self.owned):
            sel = (ids == e).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            out[sel] = layer.expert_glu(le, xs[sel])
        return out

    def all_gather(self, y_home: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's home rows -> the whole [N, d] (padded to equal sizes for the gather)."""
        m = -(-n // self.world)
        padded = y_home.new_zeros(m, y_home.shape[1])
        padded[: y_home.shape[0]] = y_home
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        sizes = [b - a for a, b in (home_range(r, self.world, n) for r in range(self.world))]
        return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])


def shard_experts(model: nn.Module, group: ParallelGroup, placement: Placement) -> None:
    """Make every MoE layer of `model` expert-parallel: own experts only, dispatch across ranks
    (layer l's expert e on rank placement.owners(l)[e])."""
    if placement.replicated:
        raise PlanError("executing a placement with replicas is not supported yet")
    for block in model.layers:
        if block.moe is not None:
            ExpertParallelCombine(block.moe, group, placement.owners(block.moe.layer))


def combines(model: nn.Module) -> dict[int, ExpertParallelCombine]:
    """MoE layer -> its expert-parallel combine (empty when the model is not sharded)."""
    return {b.moe.layer: b.moe.experts for b in model.layers
            if b.moe is not None and isinstance(b.moe.experts, ExpertParallelCombine)}


def traffic(model: nn.Module) -> dict[int, tuple[torch.Tensor, int]]:
    """MoE layer -> (int64 [W, W] token rows dispatched rows[src, dst] so far, calls so far).
    Off the diagonal: rows that crossed devices. Every rank has the same figures."""
    return {layer: (c.traffic.clone(), c.calls) for layer, c in combines(model).items()}


def reset_traffic(model: nn.Module) -> None:
    for c in combines(model).values():
        c.traffic.zero_()
        c.calls = 0
