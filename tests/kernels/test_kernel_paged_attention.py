"""Paged decode attention and the KV-cache write: the Triton kernels against their twins, and
the twins against ecserve's Attention (the engine's own decode path)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # Triton runs on the CPU only interpreted; set before jit
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ecserve_kernels as K

from ecserve.config import ModelConfig
from ecserve.model.attention import Attention, LayerKV
from ecserve.model.batch import ForwardBatch
from ecserve.types import ScheduledChunk, StepPlan

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not K.HAS_TRITON, reason="triton is not installed")
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.float16: {"rtol": 1e-2, "atol": 1e-2},
       torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


def make_case(b: int, h: int, kvh: int, hd: int, bs: int, max_blocks: int, dtype: torch.dtype,
              seed: int, lens: list[int] | None = None):
    """q, caches [nb, bs, KVH, hd] (nb = b * max_blocks + 3, shuffled tables), lens [B]."""
    gen = torch.Generator().manual_seed(seed)
    nb = b * max_blocks + 3
    q = torch.randn(b, h, hd, generator=gen)
    kc = torch.randn(nb, bs, kvh, hd, generator=gen)
    vc = torch.randn(nb, bs, kvh, hd, generator=gen)
    tables = torch.randperm(nb, generator=gen)[: b * max_blocks].view(b, max_blocks)
    if lens is None:
        lens = torch.randint(1, max_blocks * bs + 1, (b,), generator=gen).tolist()
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q, kc, vc = (t.to(DEV, dtype) for t in (q, kc, vc))
    return q, kc, vc, tables.to(DEV), seq_lens.to(DEV)


# (B, H, KVH, hd, bs, max_blocks, lens, partitions): MHA and GQA groups 2, 4, 8; hd not a power
# of two; block sizes 1 to 16; lengths 1, a block boundary, the full table; split-KV
SHAPES = [(1, 4, 4, 16, 16, 2, [1], None), (2, 8, 2, 32, 8, 4, [8, 32], None),
          (3, 8, 1, 24, 4, 9, None, None), (2, 16, 2, 16, 1, 40, [40, 7], None),
          (4, 8, 2, 64, 16, 5, None, 3), (2, 4, 1, 16, 8, 20, [160, 1], 4)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("b", "h", "kvh", "hd", "bs", "mb", "lens", "parts"), SHAPES)
def test_decode_matches_twin(b, h, kvh, hd, bs, mb, lens, parts, dtype: torch.dtype):
    q, kc, vc, tables, seq_lens = make_case(b, h, kvh, hd, bs, mb, dtype, seed=b * h, lens=lens)
    out = K.paged_decode_attention(q, kc, vc, tables, seq_lens, 0.3, num_partitions=parts)
    assert out.dtype == dtype and out.shape == q.shape
    want = K.paged_decode_attention_reference(q, kc, vc, tables, seq_lens, 0.3)
    torch.testing.assert_close(out, want, **TOL[dtype])


@needs_triton
def test_partitions_change_only_rounding():
    q, kc, vc, tables, lens = make_case(2, 4, 2, 16, 4, 30, torch.float32, 3, lens=[120, 33])
    outs = [K.paged_decode_attention(q, kc, vc, tables, lens, None, p) for p in (1, 2, 5)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-5)


def write_case(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    kc = torch.randn(6, 4, 2, 16, generator=gen).to(DEV, dtype)
    vc = torch.randn(6, 4, 2, 16, generator=gen).to(DEV, dtype)
    k = torch.randn(5, 2, 16, generator=gen).to(DEV, dtype)
    v = torch.randn(5, 2, 16, generator=gen).to(DEV, dtype)
    slots = torch.tensor([0, 7, -1, 13, 23], device=DEV)  # -1: padding, written nowhere
    return k, v, kc, vc, slots


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_write_matches_twin(dtype: torch.dtype):
    k, v, kc, vc, slots = write_case(dtype)
    kc2, vc2 = kc.clone(), vc.clone()
    K.kv_cache_write(k, v, kc, vc, slots)
    K.kv_cache_write_reference(k, v, kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_kv_write_twin():
    k, v, kc, vc, slots = write_case(torch.float32)
    before = kc.clone()
    K.kv_cache_write_reference(k, v, kc, vc, slots)
    flat = kc.view(-1, 2, 16)
    assert torch.equal(flat[13], k[3]) and torch.equal(vc.view(-1, 2, 16)[23], v[4])
    untouched = torch.ones(24, dtype=torch.bool)
    untouched[[0, 7, 13, 23]] = False
    assert torch.equal(flat[untouched.to(DEV)], before.view(-1, 2, 16)[untouched.to(DEV)])


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_matches_ecserve_attention_decode(impl: str):
    """One decode token per sequence through ecserve's Attention, against project + write +
    paged decode attention + wo on the LayerKV's 4-D view."""
    if impl == "triton" and not K.HAS_TRITON:
        pytest.skip("triton is not installed")
    cfg = ModelConfig(vocab_size=8, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, ffn_hidden_size=48, num_experts=4, expert_ffn_hidden_size=24)
    attn = Attention(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    bs, nb = 4, 10
    cache = torch.randn(2, nb * bs, 2, 16, generator=gen)  # earlier tokens' K and V
    chunks = (ScheduledChunk("a", (1,), 5, (2, 5), True), ScheduledChunk("b", (2,), 0, (0,), True),
              ScheduledChunk("c", (3,), 9, (7, 1, 3), True))
    batch = ForwardBatch.from_plan(StepPlan(chunks, (3,)), cfg, bs, torch.device("cpu"))
    x = torch.randn(3, 32, generator=gen)
    want = attn(x, batch, LayerKV(cache[0].clone(), cache[1].clone()))

    write = K.kv_cache_write if impl == "triton" else K.kv_cache_write_reference
    decode = K.paged_decode_attention if impl == "triton" else K.paged_decode_attention_reference
    q, k, v = attn.project(x, batch.rope)
    kc, vc = (c.clone().view(nb, bs, 2, 16) for c in cache)
    write(k, v, kc, vc, batch.slot_mapping)
    tables = torch.tensor([[2, 5, 0], [0, 0, 0], [7, 1, 3]])
    lens = torch.tensor([6, 1, 10])
    out = decode(q, kc, vc, tables, lens)  # [3, H, hd]
    got = F.linear(out.reshape(3, -1), attn.wo)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("b", "h", "kvh", "hd", "bs", "mb"), [(64, 32, 8, 128, 16, 128),
                                                               (1, 32, 8, 128, 16, 512),
                                                               (8, 16, 16, 64, 32, 64)])
def test_gpu_real_shapes_bf16(b: int, h: int, kvh: int, hd: int, bs: int, mb: int):
    q, kc, vc, tables, lens = make_case(b, h, kvh, hd, bs, mb, torch.bfloat16, seed=b)
    want = K.paged_decode_attention_reference(q, kc, vc, tables, lens)
    torch.testing.assert_close(K.paged_decode_attention(q, kc, vc, tables, lens), want,
                               **TOL[torch.bfloat16])
    k, v = torch.randn(2, b, kvh, hd, device=DEV, dtype=torch.bfloat16)
    slots = (tables[:, 0].long() * bs + lens.long() % bs)
    kc2, vc2 = kc.clone(), vc.clone()
    K.kv_cache_write(k, v, kc, vc, slots)
    K.kv_cache_write_reference(k, v, kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
