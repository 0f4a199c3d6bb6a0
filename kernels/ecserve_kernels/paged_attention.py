"""Paged decode attention (GQA, split-KV) and the KV-cache write, in Triton.

Cache layout: [num_blocks, block_size, KVH, hd], the 4-D view of ecserve's LayerKV
([num_slots, KVH, hd] with slot = block * block_size + offset): `kv.k.view(-1, bs, KVH, hd)`.
A decode program owns one (sequence, KV head, partition) and all H / KVH query heads that share
the KV head, so each cached key and value is read once per step, not once per query head.
Long contexts split over partitions (flash-decoding); a small kernel merges them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import _check_cache


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr,  # q [B,H,hd], caches [nb,bs,KVH,hd], [B,MB], [B]
    out_ptr, m_ptr, l_ptr, acc_ptr,  # out [B,H,hd]; partials m,l [B,H,P], acc [B,H,P,hd] f32
    scale, H, KVH, hd, bs, max_blocks, part_len, P,
    GROUP: tl.constexpr, GP: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
    SINGLE: tl.constexpr, PREC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    p = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b).to(tl.int32)
    start = p * part_len
    end = tl.minimum(tl.minimum(start + part_len, seq_len), max_blocks * bs)  # never past table
    heads = kvh * GROUP + tl.arange(0, GP)  # [GP]: the query heads reading this KV head
    in_h = tl.arange(0, GP) < GROUP
    offs_d = tl.arange(0, BD)
    in_d = offs_d < hd
    q = tl.load(q_ptr + (b * H + heads[:, None]) * hd + offs_d[None, :],
                mask=in_h[:, None] & in_d[None, :], other=0.0)  # [GP, BD]
    m = tl.full([GP], float("-inf"), dtype=tl.float32)
    lsum = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, BD], dtype=tl.float32)
    for t0 in range(start, end, BN):
        offs_t = t0 + tl.arange(0, BN)  # [BN] token positions
        in_t = offs_t < end
        blk = tl.load(tables_ptr + b * max_blocks + offs_t // bs, mask=in_t, other=0)
        slot = blk.to(tl.int64) * bs + offs_t % bs  # [BN]
        kv_off = (slot[:, None] * KVH + kvh) * hd + offs_d[None, :]  # [BN, BD]
        kv_mask = in_t[:, None] & in_d[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale  # [GP, BN] float32
        s = tl.where(in_t[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        pr = tl.exp(s - m_new[:, None])
        lsum = lsum * alpha + tl.sum(pr, axis=1)
        acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v, input_precision=PREC)
        m = m_new
    hmask = in_h[:, None] & in_d[None, :]
    if SINGLE:
        o = acc / lsum[:, None]
        tl.store(out_ptr + (b * H + heads[:, None]) * hd + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=hmask)
    else:
        row = (b * H + heads) * P + p  # [GP]
        tl.store(m_ptr + row, m, mask=in_h)
        tl.store(l_ptr + row, lsum, mask=in_h)
        tl.store(acc_ptr + row[:, None] * hd + offs_d[None, :], acc, mask=hmask)


@triton.jit
def _merge_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr,  # m, l [B*H, P]; acc [B*H, P, hd]; out [B*H, hd]
    hd, P,
    BP: tl.constexpr, BD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_p = tl.arange(0, BP)
    in_p = offs_p < P
    offs_d = tl.arange(0, BD)
    in_d = offs_d < hd
    m = tl.load(m_ptr + row * P + offs_p, mask=in_p, other=float("-inf"))  # [BP]
    w = tl.exp(m - tl.max(m, axis=0))  # empty partitions have m = -inf: weight 0
    lsum = tl.sum(w * tl.load(l_ptr + row * P + offs_p, mask=in_p, other=0.0), axis=0)
    acc = tl.load(acc_ptr + (row * P + offs_p[:, None]) * hd + offs_d[None, :],
                  mask=in_p[:, None] & in_d[None, :], other=0.0)  # [BP, BD]
    o = tl.sum(acc * w[:, None], axis=0) / lsum
    tl.store(out_ptr + row * hd + offs_d, o.to(out_ptr.dtype.element_ty), mask=in_d)


def _default_partitions(q: torch.Tensor, max_len: int, kvh: int) -> int:
    """Enough (sequence, KV head, partition) programs to fill the GPU, >= 256 keys each."""
    if q.device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    want = triton.cdiv(2 * sms, q.shape[0] * kvh)
    return max(1, min(want, triton.cdiv(max_len, 256)))


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float | None = None, num_partitions: int | None = None,
) -> torch.Tensor:
    """Triton twin of paged_decode_attention_reference: out [B, H, hd] in q's dtype.

    num_partitions splits each sequence's keys (default: by the GPU's size and the block
    table's width, never by seq_lens, so no host sync); it changes only float rounding.
    """
    _, bs, kvh, hd = _check_cache(k_cache, v_cache)
    bsz, h, _ = q.shape
    if h % kvh or q.shape[2] != hd:
        raise ValueError(f"q [B, H, hd] must have H a multiple of KVH={kvh} and hd={hd}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    scale = hd**-0.5 if scale is None else scale
    q, tables = q.contiguous(), block_tables.contiguous()
    max_len = tables.shape[1] * bs
    parts = num_partitions or _default_partitions(q, max_len, kvh)
    bn = 64 if hd <= 128 else 32
    part_len = triton.cdiv(triton.cdiv(max_len, parts), bn) * bn  # whole key tiles
    parts = triton.cdiv(max_len, part_len)
    group = h // kvh
    out = torch.empty_like(q)
    single = parts == 1
    shape = (bsz, h, parts)
    m = out if single else torch.empty(shape, dtype=torch.float32, device=q.device)
    lsum = out if single else torch.empty(shape, dtype=torch.float32, device=q.device)
    acc = out if single else torch.empty((*shape, hd), dtype=torch.float32, device=q.device)
    bd = max(16, triton.next_power_of_2(hd))
    _decode_kernel[(bsz, kvh, parts)](
        q, k_cache, v_cache, tables, seq_lens, out, m, lsum, acc,
        scale, h, kvh, hd, bs, tables.shape[1], part_len, parts,
        GROUP=group, GP=max(16, triton.next_power_of_2(group)), BD=bd, BN=bn,
        SINGLE=single, PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )
    if not single:
        _merge_kernel[(bsz * h,)](m, lsum, acc, out, hd, parts,
                                  BP=triton.next_power_of_2(parts), BD=bd)
    return out


@triton.jit
def _kv_write_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr,  # k, v [N, KVH*hd]; caches [slots, KVH*hd]; [N]
    row_len,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(slots_ptr + i).to(tl.int64)
    mask = offs < tl.where(slot >= 0, row_len, 0)  # slot -1: a padding token, written nowhere
    dst = tl.maximum(slot, 0) * row_len + offs
    k = tl.load(k_ptr + i * row_len + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + i * row_len + offs, mask=mask, other=0.0)
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def kv_cache_write(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton twin of kv_cache_write_reference (in place; slots < 0 are skipped)."""
    _, _, kvh, hd = _check_cache(k_cache, v_cache)
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    n = k.shape[0]
    if n == 0:
        return
    row = kvh * hd
    block = min(1024, triton.next_power_of_2(row))
    _kv_write_kernel[(n, triton.cdiv(row, block))](
        k.contiguous(), v.contiguous(), k_cache, v_cache, slot_mapping.contiguous(), row,
        BLOCK=block)
