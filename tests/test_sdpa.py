"""ecserve.model.attention.sdpa: one bf16 query row on a CPU takes float32 matmuls instead of
PyTorch's attention kernel; it must stay the same function (within bf16's rounding)."""

import pytest
import torch
import torch.nn.functional as F

from ecserve.model.attention import sdpa


def _inputs(dtype: torch.dtype, queries: int = 1):
    gen = torch.Generator().manual_seed(queries)
    s, h, kvh, length, hd = 5, 8, 2, 40, 16
    q = torch.randn(s, h, queries, hd, generator=gen)
    k, v = (torch.randn(s, kvh, length, hd, generator=gen) for _ in range(2))
    seen = torch.randint(1, length + 1, (s,), generator=gen)
    mask = (torch.arange(length)[None, :] < seen[:, None])[:, None, None, :].expand(
        s, 1, queries, length)
    return q.to(dtype), k.to(dtype), v.to(dtype), mask


@pytest.mark.parametrize("additive", [False, True])
def test_bf16_decode_row_matches_float32_attention(additive):
    q, k, v, mask = _inputs(torch.bfloat16)
    if additive:  # a relative-position bias with the padding at -inf (T5-style models)
        bias = torch.randn(mask.shape[0], q.shape[1], 1, mask.shape[-1],
                           generator=torch.Generator().manual_seed(9))
        mask = bias.masked_fill(~mask, -torch.inf)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                          enable_gqa=True)
    got = sdpa(q, k, v, mask.to(torch.bfloat16) if additive else mask)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(("dtype", "queries"), [(torch.float32, 1), (torch.bfloat16, 3)])
def test_float32_and_prefill_keep_pytorchs_kernel(dtype, queries):
    q, k, v, mask = _inputs(dtype, queries)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.equal(sdpa(q, k, v, mask), want)
