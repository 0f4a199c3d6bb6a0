"""The decoder: embedding, blocks of attention + (dense GLU | expert-choice MoE), output head."""

from __future__ import annotations

import torch
from torch import nn

from ecserve.config import ModelConfig
from ecserve.model.attention import Attention, LayerKV
from ecserve.model.batch import ForwardBatch
from ecserve.model.kernels import Kernels
from ecserve.model.layers import GLUFeedForward, RMSNorm
from ecserve.model.moe import MoELayer
from ecserve.types import MoEStats


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, kernels: Kernels) -> None:
        super().__init__()
        assert cfg.moe_layers is not None
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg, kernels)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.moe = MoELayer(cfg, layer, kernels) if layer in cfg.moe_layers else None
        self.ffn = (
            None if self.moe else GLUFeedForward(cfg.hidden_size, cfg.ffn_hidden_size,
                                                 cfg.activation, kernels.linear)
        )

    def feed_forward(
        self, h: torch.Tensor, group_bounds: tuple[int, ...], static_shapes: bool = False,
    ) -> tuple[torch.Tensor, MoEStats | None]:
        """The block's second half on the residual stream h [N, d]."""
        x = self.ffn_norm(h)
        if self.moe is not None:
            y, stats = self.moe(x, group_bounds, static_shapes)
            return h + y, stats
        assert self.ffn is not None
        return h + self.ffn(x), None

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, kv: LayerKV
    ) -> tuple[torch.Tensor, MoEStats | None]:
        h = x + self.attn(self.attn_norm(x), batch, kv)
        return self.feed_forward(h, batch.group_bounds, batch.static_shapes)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels | None = None) -> None:
        """kernels: which implementation each operator runs, fixed for the model's life
        (default: plain torch with batched experts, as training runs)."""
        super().__init__()
        self.cfg = cfg
        self.kernels = kernels = kernels or Kernels()
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(Block(cfg, i, kernels) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = (
            None if cfg.tie_word_embeddings
            else nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        )

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed if self.lm_head is None else self.lm_head

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output head: h [M, d] -> float32 logits [M, V]."""
        return self.kernels.linear(self.norm(h), self.head_weight, None).float()

    def forward(
        self, batch: ForwardBatch, kv_caches: list[LayerKV]
    ) -> tuple[torch.Tensor, list[MoEStats]]:
        x = self.embed[batch.input_ids]  # [N, d]
        stats = []
        for block, kv in zip(self.layers, kv_caches, strict=True):
            x, s = block(x, batch, kv)
            if s is not None:
                stats.append(s)
        return self.logits(x[batch.logits_index]), stats  # [M, V]
