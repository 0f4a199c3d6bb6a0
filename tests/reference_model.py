"""A non-cached recompute of the model: the reference for the KV-cached engine.

It processes every sequence from scratch, layer by layer, with plain causal attention (no KV
cache, no paging, explicit softmax), and routes each token in the group the engine recorded
for it, since under expert choice a token's output depends on its routing group.
"""

from __future__ import annotations

import math

import torch

from ecserve.model.layers import relative_position_bucket, rope_cos_sin
from ecserve.model.transformer import Transformer

Token = tuple[str, int]  # (request id, position)


def causal_attention(q, k, v, bias=None):
    """q [T, H, hd], k/v [T, KVH, hd] of one sequence -> [T, H, hd]."""
    t, h, hd = q.shape
    rep = h // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [T, H, hd]
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) / math.sqrt(hd)  # [H, T, T]
    if bias is not None:
        scores = scores + bias.double()
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).to(q.dtype)


@torch.no_grad()
def recompute_logits(
    model: Transformer, tokens: dict[str, list[int]], groups: list[list[Token]],
    router_scores: dict[int, dict[Token, torch.Tensor]] | None = None,
) -> dict[Token, torch.Tensor]:
    """Logits [V] after every token the groups cover, keyed by (request id, position).
    router_scores: filled with each MoE layer's float32 router probabilities [E] per token."""
    cfg = model.cfg
    covered: dict[str, int] = {}
    for g in groups:
        for rid, pos in g:
            covered[rid] = max(covered.get(rid, 0), pos + 1)
    order = [(rid, p) for rid, n in covered.items() for p in range(n)]
    flat = {tok: i for i, tok in enumerate(order)}
    ids = torch.tensor([tokens[rid][p] for rid, p in order])
    positions = torch.tensor([p for _, p in order])
    spans = {}
    for rid, n in covered.items():
        spans[rid] = (flat[(rid, 0)], n)
    rope = (
        rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        if cfg.position_encoding == "rope" else None
    )
    x = model.embed[ids]  # [T_all, d]
    for block in model.layers:
        q, k, v = block.attn.project(block.attn_norm(x), rope)
        out = torch.empty_like(q)
        for start, n in spans.values():
            bias = None
            if block.attn.rel_bias is not None:
                p = torch.arange(n)
                buckets = relative_position_bucket(
                    p[:, None] - p[None, :], cfg.relative_attention_num_buckets,
                    cfg.relative_attention_max_distance)
                bias = block.attn.rel_bias[buckets].permute(2, 0, 1)  # [H, T, T]
            sl = slice(start, start + n)
            out[sl] = causal_attention(q[sl], k[sl], v[sl], bias)
        h = x + block.attn.output(out.reshape(x.shape[0], -1))
        if block.moe is None:
            x, _ = block.feed_forward(h, (0, h.shape[0]))
            continue
        y = block.ffn_norm(h)
        if router_scores is not None:
            scores = block.moe.scores(y)
            router_scores[block.moe.layer] = {tok: scores[i] for tok, i in flat.items()}
        moe_out = torch.zeros_like(y)
        for g in groups:
            idx = torch.tensor([flat[tok] for tok in g])
            moe_out[idx] = block.moe(y[idx], (0, len(g)))[0]
        x = h + moe_out
    logits = model.logits(x)
    return {tok: logits[i] for tok, i in flat.items()}
