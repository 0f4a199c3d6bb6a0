"""The pure-decode step as one function of tensors, for torch.compile (ecserve/engine/
compiled_decode.py): every sequence adds one token, attends its paged cache, and routes it on
its own (per-token policies: docs/routing.md §4), so nothing in the step depends on Python
state that changes between steps; the batch size and the table width are its only shapes.

It computes what Transformer.forward computes for such a step: the same modules, the same
operators (the model's Kernels), attention over the sequence's keys gathered from its blocks.
"""

from __future__ import annotations

import torch

from ecserve.model.attention import LayerKV, sdpa
from ecserve.model.layers import rope_cos_sin
from ecserve.model.transformer import Transformer


def decode_forward(
    model: Transformer,
    kv: list[LayerKV],
    input_ids: torch.Tensor,  # int64 [B]: each sequence's new token
    positions: torch.Tensor,  # int64 [B]: its position
    slots: torch.Tensor,  # int64 [B]: the KV slot it writes
    block_tables: torch.Tensor,  # int64 [B, T]: each sequence's blocks (padding: any block)
    seq_lens: torch.Tensor,  # int64 [B]: keys each sequence sees, the new one included
    block_size: int,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]]:
    """float32 logits [B, V], and each MoE layer's routing counts (tokens per expert [E], gate
    sums [E], experts-per-token histogram [E + 1], its layer index)."""
    cfg = model.cfg
    assert cfg.head_dim is not None
    b = input_ids.shape[0]
    x = model.embed[input_ids]  # [B, d]
    rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    j = torch.arange(block_tables.shape[1] * block_size, device=input_ids.device)  # [L]
    key_slots = block_tables.gather(1, (j // block_size).expand(b, -1)) * block_size + (
        j % block_size)  # [B, L]
    mask = (j[None, :] < seq_lens[:, None])[:, None, None, :]  # [B, 1, 1, L]
    stats = []
    for block, cache in zip(model.layers, kv, strict=True):
        attn = block.attn
        q, k, v = attn.project(block.attn_norm(x), rope)  # [B, H, hd], [B, KVH, hd] x2
        cache.k.index_copy_(0, slots, k)
        cache.v.index_copy_(0, slots, v)
        keys = cache.k[key_slots].transpose(1, 2)  # [B, KVH, L, hd]
        values = cache.v[key_slots].transpose(1, 2)
        out = sdpa(q[:, :, None, :], keys, values, mask)  # [B, H, 1, hd]
        h = x + attn.output(out.reshape(b, -1))
        xn = block.ffn_norm(h)
        if block.moe is None:
            assert block.ffn is not None
            x = h + block.ffn(xn)
            continue
        moe = block.moe
        idx, gate = moe.route(xn, (0, b), static_shapes=True)  # [E, B]: per-token layout
        x = h + moe.apply_experts(xn, idx, gate)
        stats.append((*moe.stat_tensors(idx, gate, b), moe.layer))
    return model.logits(x), stats
