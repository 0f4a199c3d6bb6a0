"""The training forward pass, over the serving model's own modules (no second definition).

A batch of B sequences of T tokens is laid out position-major: flat token t*B + b is sequence b's
token at position t. Attention regroups it per sequence for causal SDPA (no KV cache in
training). Every MoE layer then routes contiguous groups of `group_size` tokens: with group_size
dividing B, a group holds tokens at one position of different sequences, never two tokens of one
sequence. That is spec section 7: a group with several tokens of one sequence would let a
token's routing depend on that sequence's later tokens, a decoder would learn to use the future,
and no decode policy could reproduce it. It is also exactly the group a batch-scope decode step
forms (one new token from each live sequence), so the model trains on the groups it is served
with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ecserve.errors import ConfigError
from ecserve.model.layers import rope_cos_sin
from ecserve.model.transformer import Transformer
from ecserve.routing import RoutingPolicy


@dataclass
class RoutingRecord:
    """What one MoE layer's routing did in a training step (detached)."""

    kth_score: torch.Tensor | None  # float32 [E]: mean over groups of each expert's k-th score
    tokens_per_expert: torch.Tensor  # int64 [E]
    dropped: torch.Tensor  # int64 []: tokens no expert took (a tensor: no sync under compile)
    tokens: int


@dataclass
class ForwardOut:
    logits: torch.Tensor  # float32 [T*B, V], position-major
    aux_loss: torch.Tensor  # load-balancing loss (token_choice layers; 0 otherwise)
    routing: list[RoutingRecord] = field(default_factory=list)


def group_bounds(num_tokens: int, group_size: int) -> tuple[int, ...]:
    return tuple(range(0, num_tokens + 1, group_size))


def forward(model: Transformer, ids: torch.Tensor, group_size: int) -> ForwardOut:
    """ids int64 [B, T] -> position-major logits [T*B, V] (row t*B + b predicts ids[b, t+1])."""
    cfg = model.cfg
    b, t = ids.shape
    if cfg.position_encoding != "rope":
        raise ConfigError("training supports rope models only")
    if b % group_size:
        raise ConfigError(f"batch size {b} must be a multiple of the routing group size "
                         f"{group_size}, so that no group holds two tokens of one sequence")
    assert cfg.head_dim is not None
    n = b * t
    positions = torch.arange(t, device=ids.device).repeat_interleave(b)  # [N]
    rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)  # cos, sin [N, hd]
    bounds = group_bounds(n, group_size)
    x = model.embed[ids.t().reshape(-1)]  # [N, d]
    aux = x.new_zeros((), dtype=torch.float32)
    records = []
    for block in model.layers:
        attn = block.attn
        q, k, v = attn.project(block.attn_norm(x), rope)  # [N, H, hd], [N, KVH, hd] x2
        q, k, v = (z.view(t, b, z.shape[1], z.shape[2]).permute(1, 2, 0, 3)
                   for z in (q, k, v))  # [B, heads, T, hd]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        h = x + attn.output(o.permute(2, 0, 1, 3).reshape(n, -1))  # [N, d]
        moe = block.moe
        if moe is None:
            x = block.feed_forward(h, bounds)[0]
            continue
        xn = block.ffn_norm(h)  # [N, d]
        scores = moe.scores(xn)  # [N, E] float32
        idx, gate = moe.route_scores(scores, bounds)  # [E, K]
        x = h + moe.apply_experts(xn, idx, gate)
        record, layer_aux = _routing_record(moe.policy, scores, idx, gate,
                                            len(bounds) - 1)
        records.append(record)
        aux = aux + layer_aux
    return ForwardOut(model.logits(x), aux, records)


def _routing_record(policy: RoutingPolicy, scores: torch.Tensor, idx: torch.Tensor,
                    gate: torch.Tensor, groups: int) -> tuple[RoutingRecord, torch.Tensor]:
    n = scores.shape[0]
    valid = idx >= 0
    per_expert = valid.sum(1)  # [E]
    per_token = torch.zeros(n + 1, dtype=torch.long, device=idx.device).scatter_add_(
        0, torch.where(valid, idx, n).flatten(), torch.ones(idx.numel(), dtype=torch.long,
                                                            device=idx.device))[:n]
    dropped = (per_token == 0).sum()
    kth = policy.kth_score(gate, groups)
    aux = policy.balance_loss(scores, per_expert)
    return RoutingRecord(kth, per_expert.detach(), dropped, n), aux


def token_nll(out: ForwardOut, targets: torch.Tensor) -> torch.Tensor:
    """float32 [T*B]: each position's cross entropy in nats, position-major like the logits;
    targets int64 [B, T]."""
    return F.cross_entropy(out.logits, targets.t().reshape(-1), reduction="none")
