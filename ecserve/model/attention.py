"""Causal grouped-query attention that writes and reads a paged KV cache."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ecserve.config import ModelConfig
from ecserve.model.batch import AttentionRuns, ForwardBatch
from ecserve.model.kernels import Kernels
from ecserve.model.layers import RMSNorm, apply_rope


class LayerKV(NamedTuple):
    """One layer's cache, viewed flat: slot = block * block_size + offset."""

    k: torch.Tensor  # [num_slots, kv_heads, head_dim]
    v: torch.Tensor  # [num_slots, kv_heads, head_dim]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels | None = None) -> None:
        super().__init__()
        kernels = kernels or Kernels()
        assert cfg.num_kv_heads is not None and cfg.head_dim is not None
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        )
        d, hd = cfg.hidden_size, cfg.head_dim
        self.wq = nn.Parameter(torch.empty(cfg.num_heads * hd, d))
        self.wk = nn.Parameter(torch.empty(cfg.num_kv_heads * hd, d))
        self.wv = nn.Parameter(torch.empty(cfg.num_kv_heads * hd, d))
        self.wo = nn.Parameter(torch.empty(d, cfg.num_heads * hd))
        qkv_bias = cfg.attention_bias
        self.bq = nn.Parameter(torch.empty(cfg.num_heads * hd)) if qkv_bias else None
        self.bk = nn.Parameter(torch.empty(cfg.num_kv_heads * hd)) if qkv_bias else None
        self.bv = nn.Parameter(torch.empty(cfg.num_kv_heads * hd)) if qkv_bias else None
        self.bo = nn.Parameter(torch.empty(d)) if cfg.attention_output_bias else None
        # q/k RMSNorm before rope: over all heads at once (full) or over each head (head).
        self.qk_norm = cfg.qk_norm
        q_dim, k_dim = {"full": (cfg.num_heads * hd, cfg.num_kv_heads * hd),
                        "head": (hd, hd)}.get(cfg.qk_norm, (0, 0))
        self.q_norm = RMSNorm(q_dim, cfg.norm_eps) if q_dim else None
        self.k_norm = RMSNorm(k_dim, cfg.norm_eps) if k_dim else None
        self.kernels = kernels.attention
        self.linear = kernels.linear
        # Per-layer relative position bias of the paper's model: [buckets, heads].
        self.rel_bias = (
            nn.Parameter(torch.empty(cfg.relative_attention_num_buckets, cfg.num_heads))
            if cfg.position_encoding == "relative_bias"
            else None
        )

    def project(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] -> q [N, H, hd], k and v [N, KVH, hd], rope applied."""
        n = x.shape[0]
        q = self.linear(x, self.wq, self.bq)  # [N, H*hd]
        k = self.linear(x, self.wk, self.bk)  # [N, KVH*hd]
        v = self.linear(x, self.wv, self.bv).view(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "full":
            assert self.q_norm is not None and self.k_norm is not None
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(n, self.num_heads, self.head_dim)  # [N, H, hd]
        k = k.view(n, self.num_kv_heads, self.head_dim)  # [N, KVH, hd]
        if self.qk_norm == "head":
            assert self.q_norm is not None and self.k_norm is not None
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """The output projection: attention output [N, H*hd] -> [N, d]."""
        return self.linear(out, self.wo, self.bo)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv: LayerKV) -> torch.Tensor:
        # x: [N, d] -> [N, d]
        q, k, v = self.project(x, batch.rope)
        if self.kernels == "triton":
            import ecserve_kernels

            shape = (-1, batch.attention[0].block_size, self.num_kv_heads, self.head_dim)
            ecserve_kernels.kv_cache_write(k, v, kv.k.view(shape), kv.v.view(shape),
                                           batch.slot_mapping)
        else:  # index_copy_/index_select: CPU advanced indexing is 2-3x slower
            kv.k.index_copy_(0, batch.slot_mapping, k)
            kv.v.index_copy_(0, batch.slot_mapping, v)
        out = torch.empty_like(q)  # [N, H, hd]
        for runs in batch.attention:
            out.index_copy_(0, runs.tokens, self.attend(q, kv, runs))
        return self.output(out.reshape(x.shape[0], -1))

    def attend(self, q: torch.Tensor, kv: LayerKV, runs: AttentionRuns) -> torch.Tensor:
        """One bucket of runs: q [N, H, hd] -> [n, H, hd] for runs.tokens."""
        if self.kernels == "triton" and runs.is_decode and self.rel_bias is None:
            import ecserve_kernels

            shape = (-1, runs.block_size, self.num_kv_heads, self.head_dim)
            return ecserve_kernels.paged_decode_attention(  # [S, H, hd], one query per run
                q[runs.tokens], kv.k.view(shape), kv.v.view(shape), runs.block_tables,
                runs.seq_lens)
        assert runs.kv_slots is not None and runs.attn_mask is not None, "a paged-only batch"
        qp = _rows(q, runs.q_index).transpose(1, 2)  # [S, H, Q, hd]
        kp = _rows(kv.k, runs.kv_slots).transpose(1, 2)  # [S, KVH, L, hd]
        vp = _rows(kv.v, runs.kv_slots).transpose(1, 2)  # [S, KVH, L, hd]
        mask: torch.Tensor = runs.attn_mask  # [S, 1, Q, L]
        if self.rel_bias is not None:
            assert runs.rel_buckets is not None
            bias = self.rel_bias[runs.rel_buckets].permute(0, 3, 1, 2)  # [S, H, Q, L]
            mask = bias.to(q.dtype).masked_fill(~mask, float("-inf"))
        out = sdpa(qp, kp, vp, mask)
        return out.transpose(1, 2)[runs.q_valid]  # [n, H, hd]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """F.scaled_dot_product_attention with grouped heads: q [S, H, Q, hd], k and v
    [S, KVH, L, hd], a boolean or additive mask [S, 1 or H, Q, L] -> [S, H, Q, hd].

    One query row (a decode step) in bf16 or f16 on a CPU is computed in float32: PyTorch's
    CPU attention kernel takes about 5x float32's time in bf16 there (1.27 ms against 0.25 ms
    for 16 sequences of 176 keys, 2 threads)."""
    if q.device.type != "cpu" or q.dtype == torch.float32 or q.shape[2] != 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    if torch.compiler.is_compiling():
        # Inductor fuses the widening into the key gather and keeps the float32 kernel (its
        # own softmax over the keys would guard their count, which a step leaves free).
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                              enable_gqa=True).to(q.dtype)
    # Eagerly, that kernel on widened copies measured 1.0 ms for the same batch, these
    # matmuls 0.18 ms.
    s, h, _, hd = q.shape
    kvh = k.shape[1]
    qg = q.reshape(s, kvh, h // kvh, hd).float()  # [S, KVH, G, hd]: a group shares its keys
    m = mask.reshape(s, 1, 1, -1) if mask.shape[1] == 1 else mask.reshape(s, kvh, h // kvh, -1)
    bias = m.float() if m.dtype != torch.bool else torch.zeros(()).masked_fill(~m, -torch.inf)
    scores = qg @ k.float().transpose(-1, -2) * hd**-0.5 + bias  # [S, KVH, G, L]
    out = scores.softmax(-1) @ v.float()  # [S, KVH, G, hd]
    return out.reshape(s, h, 1, hd).to(q.dtype)


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] for x [R, ...] and an index of any shape, as one index_select."""
    return x.index_select(0, index.flatten()).view(*index.shape, *x.shape[1:])
