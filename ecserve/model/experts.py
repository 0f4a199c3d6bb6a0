"""How an MoE layer runs its routed experts: one backend per model, chosen when it is built.

Every backend computes the same function, the layer's combine (docs/routing.md §6): for routed
x [N, d], idx/gate [E, K] (-1 / 0: an empty slot), y [N, d] float32 with
y_t = sum of gate * GLU_e(x_t) over the slots holding t, added in ascending expert order.
They differ in what they read and whether their shapes follow the data:

- `filled`: only the experts holding a token, one GEMM per expert (CPU eager, plain torch);
- `fused-cpu`: the same in one C++ op (ecserve_kernels/cpu), opaque to torch.compile;
- `batched`: the whole [E, K] layout as three batched GEMMs (static shapes: CUDA, training);
- `triton`: the fused Triton kernel (ecserve_kernels.expert_mlp);
- `expert-parallel`: experts spread over processes (ecserve/parallel/moe_ep.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from ecserve_kernels.cpu import ACTIVATIONS


class MoELayer(Protocol):
    """What a backend reads of ecserve.model.moe.MoELayer."""

    layer: int  # the block index
    w_gate: torch.Tensor  # [E, F, d]
    w_up: torch.Tensor  # [E, F, d]
    w_down: torch.Tensor  # [E, d, F]
    act: Callable[[torch.Tensor], torch.Tensor]
    activation: str

    def expert_glu(self, e: int, rows: torch.Tensor) -> torch.Tensor: ...


class ExpertBackend(Protocol):
    name: str
    # Why a CUDA graph cannot hold this backend's work (None: it can).
    graph_blocker: str | None

    def __call__(self, layer: MoELayer, x: torch.Tensor, idx: torch.Tensor,
                 gate: torch.Tensor) -> torch.Tensor: ...


class BatchedExperts:
    """The whole [E, K] layout as three batched GEMMs: static shapes (CUDA graphs, compiled
    training); empty slots compute a row of zero weight."""

    name = "batched"
    graph_blocker = None

    def __call__(self, layer: MoELayer, x: torch.Tensor, idx: torch.Tensor,
                 gate: torch.Tensor) -> torch.Tensor:
        xs = x[idx.clamp(min=0)]  # [E, K, d]: gathered token rows (empty slots read token 0)
        h = layer.act(torch.bmm(xs, layer.w_gate.transpose(1, 2)))  # [E, K, f]
        h.mul_(torch.bmm(xs, layer.w_up.transpose(1, 2)))
        out = torch.bmm(h, layer.w_down.transpose(1, 2)).float()  # [E, K, d]
        out.mul_(gate[..., None])  # empty slots have gate 0
        y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        # Expert-major source order: CPU index_add_ accumulates rows in that order, which is
        # the spec's ascending expert order. (CUDA uses the Triton combine, issue 7.)
        # Empty slots add their zero rows to token 0, which changes no bit of its sum.
        y.index_add_(0, idx.clamp(min=0).flatten(), out.flatten(0, 1))
        return y


class FilledExperts:
    """Only the filled slots, each expert's weights read once (CPU eager, plain torch).

    A decode step is memory-bound, and the batched [E, K] layout streams every expert's
    weights even where an expert holds no token (token choice and `capped` at small batch,
    empty `ec` slots). Data-dependent shapes are free on a CPU."""

    name = "filled"
    graph_blocker = "its shapes follow the routing"

    def __call__(self, layer: MoELayer, x: torch.Tensor, idx: torch.Tensor,
                 gate: torch.Tensor) -> torch.Tensor:
        filled = idx >= 0  # [E, K]
        counts = filled.sum(dim=1).tolist()  # [E]: tokens each expert holds
        pos = filled.flatten().nonzero().squeeze(1)  # expert-major: ascending expert order
        tok = idx.flatten()[pos]  # [S]
        xs = x[tok]  # [S, d]
        out = torch.empty(tok.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        start = 0
        for e, count in enumerate(counts):
            if count:  # [k_e, d] rows, written as float32
                out[start:start + count] = layer.expert_glu(e, xs[start:start + count])
                start += count
        out.mul_(gate.flatten()[pos, None])
        y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        # One token appears at most once per expert, so each token's sum runs in ascending
        # expert order, as the spec's is (CPU index_add_ follows the source order).
        return y.index_add_(0, tok, out)


class FusedCpuExperts:
    """torch.ops.ecserve.moe_experts: the filled slots' experts in one C++ op, gate and up in
    one parallel region, down and the gated sum in a second (ecserve_kernels/cpu/ops.cpp).
    Its twin is ecserve_kernels.reference.moe_experts_reference, bit for bit in float32."""

    name = "fused-cpu"
    graph_blocker = "a CPU op"

    def __call__(self, layer: MoELayer, x: torch.Tensor, idx: torch.Tensor,
                 gate: torch.Tensor) -> torch.Tensor:
        return torch.ops.ecserve.moe_experts(x, idx.contiguous(), gate.float().contiguous(),
                                             layer.w_gate, layer.w_up, layer.w_down,
                                             ACTIVATIONS[layer.activation])


class TritonExperts:
    """The fused Triton kernel (kernels/ecserve_kernels/README.md), deterministic combine."""

    name = "triton"
    graph_blocker = None

    def __call__(self, layer: MoELayer, x: torch.Tensor, idx: torch.Tensor,
                 gate: torch.Tensor) -> torch.Tensor:
        import ecserve_kernels

        return ecserve_kernels.expert_mlp(x, idx, gate.float(), layer.w_gate, layer.w_up,
                                          layer.w_down, layer.activation, "deterministic")


def small_batch_linear(x: torch.Tensor, w: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear through torch.ops.ecserve.linear, which reads w at the memory's rate at decode
    sizes (float32 rows of up to 8 tokens, or products up to 2^22 multiply-adds in float32 and,
    with AVX512-BF16, bf16), where BLAS pays a fixed ~100 us per call and its matrix-vector path
    reads w at a quarter of the rate (bench/bench_decode_floor.py); it hands larger products
    to at::linear itself."""
    if x.dim() == 2 and x.device.type == "cpu":
        return torch.ops.ecserve.linear(x, w, bias)
    return F.linear(x, w, bias)
