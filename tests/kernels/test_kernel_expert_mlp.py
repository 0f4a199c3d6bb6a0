"""Fused expert MLP: the Triton kernel (both combine modes) against its twin, and the twin
against MoELayer.combine (the engine's own path) on a random layer."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton runs on the CPU only interpreted; set before jit
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ecserve_kernels as K

from ecserve.config import ModelConfig, RoutingConfig
from ecserve.model.experts import BatchedExperts
from ecserve.model.moe import MoELayer
from ecserve.routing import expert_choice

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not K.HAS_TRITON, reason="triton is not installed")
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.float16: {"rtol": 1e-2, "atol": 1e-2},
       torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


def make_case(n: int, d: int, f: int, e: int, k: int, dtype: torch.dtype, empty: int, seed: int):
    """Random x and weights; idx [E, k] by expert choice over one group of n tokens (k <= n),
    with `empty` slots per expert emptied (-1, gate 0) from the end."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    w_gate = torch.randn(e, f, d, generator=gen) * d**-0.5
    w_up = torch.randn(e, f, d, generator=gen) * d**-0.5
    w_down = torch.randn(e, d, f, generator=gen) * f**-0.5
    scores = torch.softmax(torch.randn(n, e, generator=gen), dim=-1)
    idx, gate = expert_choice(scores, k)
    if empty:
        idx[:, k - empty:], gate[:, k - empty:] = -1, 0.0
    cast = [t.to(DEV, dtype) for t in (x, w_gate, w_up, w_down)]
    return cast[0], idx.to(DEV), gate.to(DEV), *cast[1:]


# (n, d, f, E, k, empty): n = 1 (decode, dense mixture); k = 1; k = n; empty slots; odd sizes
SHAPES = [(1, 32, 48, 4, 1, 0), (8, 32, 16, 4, 1, 0), (8, 64, 48, 4, 8, 0),
          (24, 48, 40, 3, 12, 3), (40, 16, 96, 8, 10, 10), (70, 32, 32, 2, 35, 1)]


@needs_triton
@pytest.mark.parametrize("combine", ["deterministic", "atomic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n", "d", "f", "e", "k", "empty"), SHAPES)
def test_triton_matches_twin(n, d, f, e, k, empty, dtype: torch.dtype, combine: str):
    args = make_case(n, d, f, e, k, dtype, empty, seed=n + k)
    y = K.expert_mlp(*args, combine=combine)
    assert y.dtype == torch.float32 and y.shape == (n, d)
    torch.testing.assert_close(y, K.expert_mlp_reference(*args), **TOL[dtype])


@needs_triton
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_triton_gelu(activation: str):
    args = make_case(16, 32, 48, 4, 6, torch.float32, 1, seed=5)
    torch.testing.assert_close(K.expert_mlp(*args, activation=activation),
                               K.expert_mlp_reference(*args, activation="gelu"),
                               **TOL[torch.float32])


@needs_triton
def test_deterministic_combine_is_bitwise_reproducible():
    # Several groups side by side, as MoELayer concatenates them: tokens take many slots.
    parts = [make_case(12, 32, 32, 4, 6, torch.float32, 0, seed=s) for s in (1, 2)]
    x = torch.cat([parts[0][0], parts[1][0]])
    idx = torch.cat([parts[0][1], parts[1][1] + 12], dim=1)
    gate = torch.cat([parts[0][2], parts[1][2]], dim=1)
    args = (x, idx, gate, *parts[0][3:])
    first = K.expert_mlp(*args)
    for _ in range(2):
        assert torch.equal(K.expert_mlp(*args), first)
    torch.testing.assert_close(first, K.expert_mlp_reference(*args), **TOL[torch.float32])


@needs_triton
def test_unpicked_tokens_get_zero():
    x, idx, gate, *w = make_case(10, 32, 16, 2, 2, torch.float32, 0, seed=3)
    picked = torch.zeros(10, dtype=torch.bool, device=DEV)
    picked[idx[idx >= 0]] = True
    for combine in ("deterministic", "atomic"):
        y = K.expert_mlp(x, idx, gate, *w, combine=combine)
        assert torch.all(y[~picked] == 0)


def test_twin_rejects_bad_arguments():
    x, idx, gate, *w = make_case(4, 16, 24, 2, 2, torch.float32, 0, seed=0)
    with pytest.raises(ValueError, match="activation"):
        K.expert_mlp_reference(x, idx, gate, *w, activation="relu")
    with pytest.raises(ValueError, match="combine"):
        K.expert_mlp_reference(x, idx, gate, *w, combine="sorted")
    with pytest.raises(ValueError, match="w_down"):
        K.expert_mlp_reference(x, idx, gate, w[0], w[1], w[0])


def make_layer(e: int, c: float, activation: str, dtype: torch.dtype) -> MoELayer:
    cfg = ModelConfig(vocab_size=8, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=48,
                      num_experts=e, expert_ffn_hidden_size=24, activation=activation,
                      routing=RoutingConfig(policy="ec", capacity_factor=c, group_size=8))
    layer = MoELayer(cfg, layer=1)
    gen = torch.Generator().manual_seed(e)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return layer.to(dtype).requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("e", "c", "activation", "groups"),
                         [(4, 2.0, "silu", (0, 8, 16, 21)), (8, 1.0, "gelu", (0, 1, 9)),
                          (4, 4.0, "silu", (0, 1))])
def test_twin_matches_moe_layer_combine(e, c, activation, groups, dtype: torch.dtype):
    layer = make_layer(e, c, activation, dtype)
    x = torch.randn(groups[-1], 32, generator=torch.Generator().manual_seed(7)).to(dtype)
    scores = layer.scores(x)
    idx_parts, gate_parts = [], []
    for a, b in itertools.pairwise(groups):  # as MoELayer.forward does
        i, g = expert_choice(scores[a:b], layer.routing.capacity(b - a, e))
        idx_parts.append(i + a)
        gate_parts.append(g)
    idx, gate = torch.cat(idx_parts, 1), torch.cat(gate_parts, 1)
    idx[0, -1], gate[0, -1] = -1, 0.0  # an empty slot, as capped routing leaves them
    want = BatchedExperts()(layer, x, idx, gate)  # the layout the GPU path runs
    got = K.expert_mlp_reference(x, idx, gate, layer.w_gate, layer.w_up, layer.w_down,
                                 activation=activation)
    assert torch.equal(got, want)  # same GEMMs, same float32 order: bit for bit


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("n", "d", "f", "e", "k"), [(2048, 1024, 512, 64, 64),
                                                     (16, 2048, 1408, 64, 1),
                                                     (256, 4096, 1024, 8, 64),
                                                     (64, 1024, 768, 16, 8)])
def test_gpu_real_shapes_bf16(n: int, d: int, f: int, e: int, k: int):
    args = make_case(n, d, f, e, k, torch.bfloat16, int(k > 1), seed=k)
    want = K.expert_mlp_reference(*args)
    for combine in ("deterministic", "atomic"):
        torch.testing.assert_close(K.expert_mlp(*args, combine=combine), want,
                                   **TOL[torch.bfloat16])
    first = K.expert_mlp(*args)
    assert torch.equal(K.expert_mlp(*args), first)
