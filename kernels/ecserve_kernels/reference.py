"""Plain-torch twins of the Triton kernels: same signatures, obviously correct, no triton needed.

Each twin is the contract of its kernel (README.md): the kernel must match it within the
documented tolerance. They run on any device, and are what the engine's own paths are tested
against (tests/kernels/).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")  # gelu = gelu_tanh (tanh approximation)
COMBINES = ("deterministic", "atomic")


def glu_act(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(h)
    if activation in ("gelu", "gelu_tanh"):
        return F.gelu(h, approximate="tanh")
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


# ---------------------------------------------------------------- EC router selection


def _check_select(scores: torch.Tensor, k: int) -> tuple[int, int, int]:
    if scores.dtype != torch.float32 or scores.dim() != 3:
        raise ValueError(f"scores must be float32 [G, n, E], got {scores.dtype} "
                         f"{tuple(scores.shape)}")
    g, n, e = scores.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    return g, n, e


def _finish_select(
    idx: torch.Tensor, gate: torch.Tensor, group_k: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty the slots that hold a -inf (padding) token or lie past the group's own k."""
    empty = torch.isneginf(gate)  # [G, E, k]
    if group_k is not None:
        slot = torch.arange(idx.shape[-1], device=idx.device)
        empty = empty | (slot[None, None, :] >= group_k.to(idx.device)[:, None, None])
    return idx.masked_fill(empty, -1), gate.masked_fill(empty, 0.0)


def ec_select_reference(
    scores: torch.Tensor, k: int, group_k: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert, the k best tokens of each group (ties: lower token index first).

    scores [G, n, E] float32 -> idx [G, E, k] int64 (token index local to its group, -1 empty),
    gate [G, E, k] float32 (the chosen token's score, 0 for an empty slot), slots by descending
    score. Ragged groups: pad tokens with -inf scores (never chosen while a real token remains;
    chosen pads become empty slots) and pass group_k [G] (each group's own k <= k).
    """
    _check_select(scores, k)
    gate, idx = torch.sort(scores.transpose(1, 2), dim=-1, descending=True, stable=True)
    return _finish_select(idx[..., :k].contiguous(), gate[..., :k].contiguous(), group_k)


def ec_select_topk(
    scores: torch.Tensor, k: int, group_k: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """ec_select_reference through torch.topk on exact int64 keys (score bits, then n-1-token).

    torch.topk has no tie order of its own; keys that are all distinct make it exact. NaN scores
    are not supported (nor by any other implementation here).
    """
    _, n, _ = _check_select(scores, k)
    s = scores.transpose(1, 2) + 0.0  # [G, E, n]; + 0.0 turns -0.0 into +0.0 (they tie)
    bits = s.contiguous().view(torch.int32).long()
    # Monotone float -> int map: negative floats order reversed, so flip their magnitude bits.
    key = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    tok = torch.arange(n, device=scores.device)
    key = (key << 32) | (n - 1 - tok)  # distinct; equal scores: lower token is larger
    top = torch.topk(key, k, dim=-1, sorted=True).values  # [G, E, k]
    idx = (n - 1) - (top & 0xFFFFFFFF)
    return _finish_select(idx, s.gather(-1, idx), group_k)


# ---------------------------------------------------------------- fused expert MLP


def check_expert_mlp(
    x: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor, w_gate: torch.Tensor,
    w_up: torch.Tensor, w_down: torch.Tensor, activation: str, combine: str,
) -> None:
    if x.dim() != 2 or idx.dim() != 2 or idx.shape != gate.shape:
        raise ValueError(f"need x [N, d], idx and gate [E, K]; got {tuple(x.shape)}, "
                         f"{tuple(idx.shape)}, {tuple(gate.shape)}")
    e, _ = idx.shape
    d = x.shape[1]
    f = w_gate.shape[1]
    want = {"w_gate": (e, f, d), "w_up": (e, f, d), "w_down": (e, d, f)}
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if tuple(w.shape) != want[name] or w.dtype != x.dtype:
            raise ValueError(f"{name} must be {x.dtype} {want[name]}, got {w.dtype} "
                             f"{tuple(w.shape)}")
    if idx.dtype not in (torch.int32, torch.int64) or gate.dtype != torch.float32:
        raise ValueError(f"idx must be int32/int64 and gate float32, got {idx.dtype}, "
                         f"{gate.dtype}")
    glu_act(x.new_zeros(1), activation)
    if combine not in COMBINES:
        raise ValueError(f"unknown combine {combine!r}; expected one of {COMBINES}")


def expert_mlp_reference(
    x: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor, w_gate: torch.Tensor,
    w_up: torch.Tensor, w_down: torch.Tensor, activation: str = "silu",
    combine: str = "deterministic",
) -> torch.Tensor:
    """y[t] = sum over slots (e, j) with idx[e, j] = t of gate[e, j] * GLU_e(x[t]), in float32.

    x [N, d]; idx [E, K] (token row, -1 = empty slot); gate [E, K] float32; w_gate, w_up [E, f, d];
    w_down [E, d, f] -> y [N, d] float32. GLU_e(x) = w_down[e] @ (act(w_gate[e] @ x) * w_up[e] @ x)
    with h rounded to x's dtype. Slots are summed per token in ascending (expert, slot) order,
    whatever `combine` says (the twin has one order; the atomic kernel may use any).
    """
    check_expert_mlp(x, idx, gate, w_gate, w_up, w_down, activation, combine)
    idx = idx.long()
    valid = idx >= 0  # [E, K]
    xs = x[idx.clamp(min=0)] * valid[..., None].to(x.dtype)  # [E, K, d]; empty slots read zeros
    h = glu_act(torch.bmm(xs, w_gate.transpose(1, 2)), activation)  # [E, K, f]
    h = h * torch.bmm(xs, w_up.transpose(1, 2))
    out = torch.bmm(h, w_down.transpose(1, 2)).float() * gate[..., None]  # [E, K, d]
    flat = idx.flatten()
    keep = valid.flatten()
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    if x.device.type == "cpu":
        # CPU index_add_ adds rows in source order: expert-major, the spec's ascending order.
        y.index_add_(0, flat[keep], out.flatten(0, 1)[keep])
        return y
    # Elsewhere index_add_ may use atomics: add one slot column at a time, ascending expert.
    slot_of = torch.full((x.shape[0], idx.shape[0]), -1, dtype=torch.long, device=x.device)
    # A token takes at most one slot per expert in a group; several groups never share a token.
    e_ix = torch.arange(idx.shape[0], device=x.device)[:, None].expand_as(idx)
    slot_of[flat[keep], e_ix.flatten()[keep]] = torch.arange(flat.numel(), device=x.device)[keep]
    rows = out.flatten(0, 1)
    for e in range(idx.shape[0]):
        s = slot_of[:, e]
        y += torch.where(s[:, None] >= 0, rows[s.clamp(min=0)], 0.0)
    return y


# ---------------------------------------------------------------- paged KV cache


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int, int]:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must be [num_blocks, block_size, KVH, hd], got "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    nb, bs, kvh, hd = k_cache.shape
    return nb, bs, kvh, hd


def kv_cache_write_reference(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k_cache[slot // bs, slot % bs] = k[i] (same for v) for slot = slot_mapping[i] >= 0.

    k, v [N, KVH, hd]; caches [num_blocks, block_size, KVH, hd] (in place); slot_mapping [N] int.
    """
    _check_cache(k_cache, v_cache)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def paged_decode_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float | None = None, num_partitions: int | None = None,
) -> torch.Tensor:
    """One query token per sequence over its first seq_lens[b] cached keys, in float32.

    q [B, H, hd]; caches [num_blocks, block_size, KVH, hd]; block_tables [B, max_blocks] int;
    seq_lens [B] int (>= 1) -> out [B, H, hd] in q's dtype. Head h reads KV head h // (H / KVH).
    scale defaults to hd ** -0.5; num_partitions is the kernel's tuning knob, ignored here.
    """
    del num_partitions
    _, bs, kvh, hd = _check_cache(k_cache, v_cache)
    b, h, _ = q.shape
    scale = hd**-0.5 if scale is None else scale
    seq_lens = seq_lens.to(q.device).clamp(max=block_tables.shape[1] * bs)  # as the kernel
    length = max(int(seq_lens.max()), 1)
    pos = torch.arange(length, device=q.device)  # [L]
    blocks = block_tables.long().gather(
        1, (pos // bs).clamp(max=block_tables.shape[1] - 1).expand(b, -1))  # [B, L]
    slots = blocks * bs + pos % bs
    kk = k_cache.view(-1, kvh, hd)[slots].float().repeat_interleave(h // kvh, dim=2)  # [B,L,H,hd]
    vv = v_cache.view(-1, kvh, hd)[slots].float().repeat_interleave(h // kvh, dim=2)
    s = torch.einsum("bhd,blhd->bhl", q.float(), kk) * scale  # [B, H, L]
    s = s.masked_fill((pos[None, :] >= seq_lens[:, None])[:, None, :], -math.inf)
    out = torch.einsum("bhl,blhd->bhd", torch.softmax(s, dim=-1), vv)
    return out.to(q.dtype)


# ---------------------------------------------------------------- CPU ops (cpu/ops.cpp)


def chunked_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] . b [O, K] -> float32 [M, O] in the CPU ops' order: 16 lane sums over K in
    chunks of 16 (tail zero-padded), each product rounded before it is added, then the lanes
    folded in halves (16 -> 8 -> 4 -> 2 -> 1)."""
    k = a.shape[1]
    pad = -k % 16
    a = F.pad(a.float(), (0, pad)).view(a.shape[0], 1, -1, 16)  # [M, 1, C, 16]
    b = F.pad(b.float(), (0, pad)).view(1, b.shape[0], -1, 16)  # [1, O, C, 16]
    acc = torch.zeros(a.shape[0], b.shape[1], 16)
    for c in range(a.shape[2]):
        acc = acc + a[:, :, c] * b[:, :, c]
    while acc.shape[-1] > 1:
        half = acc.shape[-1] // 2
        acc = acc[..., :half] + acc[..., half:]
    return acc[..., 0]


def cpu_linear_reference(x: torch.Tensor, w: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch.ops.ecserve.linear's twin: x [M, K] @ w [O, K].T (+ bias) in x's dtype; past 8
    rows and 2^22 multiply-adds the op is F.linear. In bf16 the twin is F.linear, which the
    op matches within bf16 tolerance (AVX512-BF16 rounds in the hardware's order)."""
    m, (o, k) = x.shape[0], w.shape
    if (m > 8 and m * o * k > 1 << 22) or x.dtype != torch.float32:
        return F.linear(x, w, bias)
    y = chunked_dot(x, w)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


def moe_experts_reference(x: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor,
                          w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                          activation: str) -> torch.Tensor:
    """torch.ops.ecserve.moe_experts' twin: y [N, d] float32, the sum over filled slots
    (idx [E, K] >= 0) of gate * GLU_e(x[token]), each token's terms in ascending expert
    order. The hidden activations stay float32, rounded to bf16 before the down projection
    where the weights are bf16. Bit for bit in float32; with bf16 weights on AVX512-BF16 the op
    sums in the hardware's order, so within bf16 tolerance."""
    y = torch.zeros(x.shape[0], x.shape[1])
    for e in range(idx.shape[0]):
        filled = idx[e] >= 0
        tok = idx[e][filled]
        if tok.numel() == 0:
            continue
        xs = x[tok]
        h = glu_act(chunked_dot(xs, w_gate[e]), activation) * chunked_dot(xs, w_up[e])
        if w_down.dtype == torch.bfloat16:
            h = h.bfloat16()
        y.index_add_(0, tok, chunked_dot(h, w_down[e]) * gate[e][filled][:, None])
    return y
