"""The expert-parallel MoE combine: dispatch token rows to the experts' owners and back.

Every rank runs the same router on the same tokens (attention is replicated), so `idx`/`gate`
[E, K] are identical everywhere. Token t's home rank is t * world // N (a contiguous split of
the step's tokens). Each rank sends its home tokens' rows, for every (token, expert) slot, to
the expert's owner with all_to_all_single; the owner runs GLU_e on them; the outputs come back
the same way; the home rank applies the gates and sums in float32 in ascending expert order
(index_add_ in expert-major order, as MoELayer.combine does), and an all-gather gives every
rank the whole [N, d] result.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ecserve.model.moe import MoELayer
from ecserve.parallel.group import ParallelGroup, Placement


def home_range(rank: int, world: int, n: int) -> tuple[int, int]:
    """[lo, hi): the tokens t with t * world // n == rank."""
    return -(-rank * n // world), -(-(rank + 1) * n // world)


class ExpertParallelCombine:
    """Installed as `layer.expert_parallel`; keeps only this rank's experts in `layer`."""

    def __init__(self, layer: MoELayer, group: ParallelGroup, placement: Placement) -> None:
        e = layer.w_gate.shape[0]
        if len(placement.owner) != e:
            raise ValueError(f"placement covers {len(placement.owner)} experts, layer "
                             f"{layer.layer} has {e}")
        self.layer = layer
        self.rank, self.world = group.rank, group.world
        self.owned = placement.owned(group.rank)
        self.owner = torch.tensor(placement.owner, dtype=torch.long)  # [E]
        # Keep only the owned experts' weights ([E_own, ...], in ascending expert order).
        for name in ("w_gate", "w_up", "w_down"):
            w = getattr(layer, name)
            setattr(layer, name, nn.Parameter(w[self.owned].clone(), requires_grad=False))
        layer.expert_parallel = self

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        n, d = x.shape
        num_e, k = idx.shape
        flat = idx.flatten()  # [E*K], expert-major
        experts = torch.arange(num_e, device=idx.device).repeat_interleave(k)  # [E*K]
        lo, hi = home_range(self.rank, self.world, n)
        mine = (flat >= lo) & (flat < hi)  # valid slots whose token lives here (-1 never does)
        pos = mine.nonzero().squeeze(1)  # [P]: in expert-major order
        tok, exp, g = flat[pos], experts[pos], gate.flatten()[pos].float()
        dest = self.owner.to(exp.device)[exp]  # [P]
        perm = torch.sort(dest, stable=True).indices  # grouped by owner, expert-major within
        send_counts = torch.bincount(dest, minlength=self.world)  # [W]
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        recv_x = x.new_empty(sum(recv), d)
        dist.all_to_all_single(recv_x, x[tok[perm]].contiguous(), recv, send)
        recv_e = exp.new_empty(sum(recv))
        dist.all_to_all_single(recv_e, exp[perm].contiguous(), recv, send)
        out = self.experts(recv_x, recv_e)  # [R, d] in x.dtype
        back = x.new_empty(len(pos), d)
        dist.all_to_all_single(back, out, send, recv)
        res = torch.empty_like(back)
        res[perm] = back  # back to expert-major slot order
        contrib = res.float() * g[:, None]  # [P, d]
        y_home = torch.zeros(hi - lo, d, dtype=torch.float32, device=x.device)
        y_home.index_add_(0, tok - lo, contrib)  # each token's experts in ascending order
        return self.all_gather(y_home, n)

    def experts(self, xs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """GLU_e(row) for rows [R, d] with global expert ids [R] this rank owns."""
        layer, out = self.layer, torch.empty_like(xs)
        for le, e in enumerate(self.owned):
            sel = (ids == e).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            rows = xs[sel]
            h = layer.act(rows @ layer.w_gate[le].T) * (rows @ layer.w_up[le].T)
            out[sel] = h @ layer.w_down[le].T
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
    """Make every MoE layer of `model` expert-parallel: own experts only, dispatch across ranks."""
    for block in model.layers:
        if block.moe is not None:
            ExpertParallelCombine(block.moe, group, placement)
