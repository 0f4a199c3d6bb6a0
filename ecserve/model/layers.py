"""Small building blocks: RMSNorm, the GLU feed-forward, rotary and relative position encodings."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32: bf16 sums of squares lose too much.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def activation_fn(name: str):
    if name == "silu":
        return F.silu
    if name == "gelu":
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation {name!r}")


class GLUFeedForward(nn.Module):
    """down(act(gate(x)) * up(x)): the dense layer, and the shared expert."""

    def __init__(self, dim: int, hidden: int, activation: str,
                 linear: Callable[..., torch.Tensor] = F.linear) -> None:
        super().__init__()
        self.linear = linear
        self.w_gate = nn.Parameter(torch.empty(hidden, dim))
        self.w_up = nn.Parameter(torch.empty(hidden, dim))
        self.w_down = nn.Parameter(torch.empty(dim, hidden))
        self.act = activation_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, d] -> [N, d]
        h = self.act(self.linear(x, self.w_gate, None)) * self.linear(x, self.w_up, None)
        return self.linear(h, self.w_down, None)  # [N, f] -> [N, d]


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each [N, head_dim], for the half-rotation (NeoX/Llama) convention."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )  # [hd/2]
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [N, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [N, hd]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [N, heads, hd]; cos/sin: [N, hd]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    xf = x.float() * cos[:, None, :] + rotated.float() * sin[:, None, :]
    return xf.to(x.dtype)


def relative_position_bucket(
    distance: torch.Tensor, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's causal bucketing of distance = query_pos - key_pos (>= 0 where attention is allowed).

    Small distances get their own bucket; larger ones share log-spaced buckets up to max_distance.
    """
    n = distance.clamp(min=0)
    max_exact = max(num_buckets // 2, 1)
    large = max_exact + (
        torch.log(n.float().clamp(min=1) / max_exact)
        / math.log(max(max_distance / max_exact, 1.0 + 1e-6))
        * (num_buckets - max_exact)
    ).long()
    large = large.clamp(max=num_buckets - 1)
    return torch.where(n < max_exact, n, large)
