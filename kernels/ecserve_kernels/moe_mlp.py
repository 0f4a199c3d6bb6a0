"""Fused expert-choice MLP in Triton: gather, GLU, down projection, gate scale, combine.

Three launches, none of which materialises the gathered [E, K, d] activations:
  1. _glu_kernel: per expert, token rows gathered by idx inside the GEMM's load, gate and up
     projections in one pass over d, activation and product fused: h [E, K, f] (x's dtype).
  2. _down_kernel: h @ w_down^T, scaled by gate in the epilogue; "atomic" adds straight into
     y [N, d] float32 (order-free), "deterministic" stores o [E, K, d] float32.
  3. _combine_kernel ("deterministic" only): per token, its slots summed in ascending
     (expert, slot) order through a token -> slots CSR map: bitwise reproducible.
Grids put the slot blocks on axis 0 so programs sharing a weight tile run together; the weight
dimension (f, then d) is split across programs, so a decode step (K <= 16) still has E * f / BF
programs each streaming its own slice of the expert's weights exactly once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import check_expert_mlp

_ACT = {"silu": 0, "gelu": 1, "gelu_tanh": 1}


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:
        return g * tl.sigmoid(g)
    # gelu, tanh approximation: 0.5 g (1 + tanh(u)) = g * sigmoid(2u)
    u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    return g * tl.sigmoid(2.0 * u)


@triton.jit
def _glu_kernel(
    x_ptr, idx_ptr, wg_ptr, wu_ptr, h_ptr,  # x [N, d], idx [E, K], w [E, f, d], h [E, K, f]
    K, d, f,
    ACT: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
):
    e = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)  # [BM] slots
    offs_f = tl.program_id(1) * BF + tl.arange(0, BF)  # [BF]
    in_m = offs_m < K
    in_f = offs_f < f
    tok = tl.load(idx_ptr + e * K + offs_m, mask=in_m, other=-1).to(tl.int64)  # [BM]
    valid = tok >= 0
    acc_g = tl.zeros([BM, BF], dtype=tl.float32)
    acc_u = tl.zeros([BM, BF], dtype=tl.float32)
    w_off = e * f * d + offs_f[None, :].to(tl.int64) * d  # [1, BF]: rows of w, read transposed
    for d0 in range(0, d, BD):
        offs_d = d0 + tl.arange(0, BD)
        in_d = offs_d < d
        xs = tl.load(x_ptr + tok[:, None] * d + offs_d[None, :],
                     mask=valid[:, None] & in_d[None, :], other=0.0)  # [BM, BD] gathered rows
        w_mask = in_d[:, None] & in_f[None, :]
        wg = tl.load(wg_ptr + w_off + offs_d[:, None], mask=w_mask, other=0.0)  # [BD, BF]
        wu = tl.load(wu_ptr + w_off + offs_d[:, None], mask=w_mask, other=0.0)
        acc_g = tl.dot(xs, wg, acc_g, input_precision=PREC)
        acc_u = tl.dot(xs, wu, acc_u, input_precision=PREC)
    dt = h_ptr.dtype.element_ty
    # Round like the twin: each projection to x's dtype, then act, then the product.
    g = acc_g.to(dt).to(tl.float32)
    u = acc_u.to(dt).to(tl.float32)
    h = _act(g, ACT).to(dt).to(tl.float32) * u
    h_off = (e * K + offs_m[:, None]) * f + offs_f[None, :]
    tl.store(h_ptr + h_off, h.to(dt), mask=in_m[:, None] & in_f[None, :])


@triton.jit
def _down_kernel(
    h_ptr, wd_ptr, gate_ptr, idx_ptr, out_ptr,  # h [E,K,f], wd [E,d,f], gate/idx [E,K]
    K, d, f,
    ATOMIC: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BF: tl.constexpr,
):
    # out: y [N, d] float32 when ATOMIC, else o [E, K, d] float32.
    e = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)  # [BM] slots
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)  # [BN] output features
    in_m = offs_m < K
    in_n = offs_n < d
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    w_off = e * d * f + offs_n[None, :].to(tl.int64) * f  # [1, BN]
    for f0 in range(0, f, BF):
        offs_f = f0 + tl.arange(0, BF)
        in_f = offs_f < f
        hs = tl.load(h_ptr + (e * K + offs_m[:, None]) * f + offs_f[None, :],
                     mask=in_m[:, None] & in_f[None, :], other=0.0)  # [BM, BF]
        wd = tl.load(wd_ptr + w_off + offs_f[:, None],
                     mask=in_f[:, None] & in_n[None, :], other=0.0)  # [BF, BN]
        acc = tl.dot(hs, wd, acc, input_precision=PREC)
    # Round to the activations' dtype first, as the twin's bmm does, then scale in float32.
    acc = acc.to(h_ptr.dtype.element_ty).to(tl.float32)
    gate = tl.load(gate_ptr + e * K + offs_m, mask=in_m, other=0.0)  # [BM]; 0 for empty slots
    acc = acc * gate[:, None]
    if ATOMIC:
        tok = tl.load(idx_ptr + e * K + offs_m, mask=in_m, other=-1).to(tl.int64)
        tl.atomic_add(out_ptr + tok[:, None] * d + offs_n[None, :], acc,
                      mask=(tok >= 0)[:, None] & in_n[None, :], sem="relaxed")
    else:
        o_off = (e * K + offs_m[:, None]) * d + offs_n[None, :]
        tl.store(out_ptr + o_off, acc, mask=in_m[:, None] & in_n[None, :])


@triton.jit
def _combine_kernel(
    o_ptr, rowptr_ptr, slots_ptr, y_ptr,  # o [E*K, d] f32, rowptr [N+1], slots [E*K], y [N, d]
    d,
    BN: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    in_n = offs_n < d
    start = tl.load(rowptr_ptr + t)
    end = tl.load(rowptr_ptr + t + 1)
    acc = tl.zeros([BN], dtype=tl.float32)
    for s in range(start, end):  # ascending flat slot = ascending (expert, slot)
        slot = tl.load(slots_ptr + s)
        acc += tl.load(o_ptr + slot * d + offs_n, mask=in_n, other=0.0)
    tl.store(y_ptr + t * d + offs_n, acc, mask=in_n)


def token_slots_csr(idx: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token -> slots map of idx [E, K]: rowptr [N+1] int64, slots [E*K] int64 (flat e*K + j),
    each token's slots in ascending flat order; empty slots sort after every token. Static
    shapes and no host sync, so it can live in a CUDA graph."""
    key = idx.flatten().long()
    key = torch.where(key >= 0, key, num_tokens)  # [E*K]
    slots = torch.argsort(key, stable=True)  # by token, then ascending (expert, slot)
    # scatter_add, not bincount: CUDA's bincount reads the max back to size its output.
    counts = torch.zeros(num_tokens + 1, dtype=torch.long, device=idx.device).scatter_add_(
        0, key, torch.ones_like(key))[:num_tokens]
    rowptr = torch.zeros(num_tokens + 1, dtype=torch.long, device=idx.device)
    rowptr[1:] = torch.cumsum(counts, 0)
    return rowptr, slots


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def expert_mlp_blocks(k_slots: int, d: int, f: int) -> dict[str, int]:
    """Tile sizes by slots per expert: decode-sized K (<= 16) takes thin M tiles and splits the
    weight rows finely (bandwidth-bound); prefill-sized K takes square-ish tiles (compute-bound)."""
    bm = _pow2(k_slots, 16, 64)
    wide = 64 if bm <= 16 else 128
    return {
        "BM": bm,
        "BF": _pow2(f, 16, wide), "BD": _pow2(d, 16, 128 if bm <= 16 else 64),  # kernel 1
        "BN": _pow2(d, 16, wide), "BF2": _pow2(f, 16, 128 if bm <= 16 else 64),  # kernel 2
        "num_warps": 4,
        "num_stages": 3,
    }


def expert_mlp(
    x: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor, w_gate: torch.Tensor,
    w_up: torch.Tensor, w_down: torch.Tensor, activation: str = "silu",
    combine: str = "deterministic",
) -> torch.Tensor:
    """Triton twin of expert_mlp_reference: y [N, d] float32 (contract in README.md)."""
    check_expert_mlp(x, idx, gate, w_gate, w_up, w_down, activation, combine)
    n, d = x.shape
    e, k = idx.shape
    f = w_gate.shape[1]
    x, idx, gate = x.contiguous(), idx.contiguous(), gate.contiguous()
    w_gate, w_up, w_down = w_gate.contiguous(), w_up.contiguous(), w_down.contiguous()
    prec = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 is moot for 16-bit inputs
    c = expert_mlp_blocks(k, d, f)
    tune = {"num_warps": c["num_warps"], "num_stages": c["num_stages"]}
    h = torch.empty((e, k, f), dtype=x.dtype, device=x.device)
    grid1 = (triton.cdiv(k, c["BM"]), triton.cdiv(f, c["BF"]), e)
    _glu_kernel[grid1](x, idx, w_gate, w_up, h, k, d, f, ACT=_ACT[activation], PREC=prec,
                       BM=c["BM"], BF=c["BF"], BD=c["BD"], **tune)
    y = torch.zeros((n, d), dtype=torch.float32, device=x.device)
    atomic = combine == "atomic"
    out = y if atomic else torch.empty((e, k, d), dtype=torch.float32, device=x.device)
    grid2 = (triton.cdiv(k, c["BM"]), triton.cdiv(d, c["BN"]), e)
    _down_kernel[grid2](h, w_down, gate, idx, out, k, d, f, ATOMIC=atomic, PREC=prec,
                        BM=c["BM"], BN=c["BN"], BF=c["BF2"], **tune)
    if not atomic:
        rowptr, slots = token_slots_csr(idx, n)
        bn = _pow2(d, 16, 1024)
        _combine_kernel[(n, triton.cdiv(d, bn))](out, rowptr, slots, y, d, BN=bn)
    return y
