"""The MoE layer's expert backends (ecserve/model/experts.py) against each other: the CPU ones
that skip empty experts (plain torch, and the fused C++ op) against the batched one the GPU
path runs, and the fused op bit for bit against its plain-torch twin."""

from __future__ import annotations

import itertools

import ecserve_kernels.cpu
import pytest
import torch
from ecserve_kernels.reference import moe_experts_reference

from ecserve.config import ModelConfig, RoutingConfig
from ecserve.model.experts import BatchedExperts, FilledExperts, FusedCpuExperts
from ecserve.model.kernels import Kernels
from ecserve.model.moe import MoELayer

needs_cpu_ops = pytest.mark.skipif(not ecserve_kernels.cpu.available(),
                                   reason=f"CPU ops: {ecserve_kernels.cpu.load()}")


def make_layer(policy: str, e: int = 8, experts=None, activation: str = "silu",
               **routing: float) -> MoELayer:
    cfg = ModelConfig(vocab_size=8, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=48,
                      num_experts=e, expert_ffn_hidden_size=24, activation=activation,
                      routing=RoutingConfig(policy=policy, **routing))
    layer = MoELayer(cfg, layer=1, kernels=Kernels(experts=experts or FilledExperts()))
    gen = torch.Generator().manual_seed(e)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        if policy == "threshold":
            layer.threshold = torch.full((e,), 0.12)
    return layer.requires_grad_(False)


CASES = [("token_choice", dict(top_k=2), (0, 1)),  # batch 1: 2 of 8 experts hold a token
         ("token_choice", dict(top_k=2), (0, 5)),
         ("capped", dict(capacity_factor=2.0), (0, 1, 4)),
         ("ec", dict(capacity_factor=2.0), (0, 8, 16, 21)),  # mixed group sizes
         ("ec", dict(capacity_factor=1.0), (0, 1, 9)),
         ("threshold", dict(), (0, 64)),  # 64 tokens routed on their own
         ("threshold", dict(), (0, 1))]
SKIPPING = [FilledExperts(), pytest.param(FusedCpuExperts(), marks=needs_cpu_ops)]


@pytest.mark.parametrize("backend", SKIPPING, ids=lambda b: b.name)
@pytest.mark.parametrize(("policy", "routing", "groups"), CASES)
def test_skipping_backends_equal_batched_and_read_no_empty_expert(policy, routing, groups,
                                                                   backend):
    layer = make_layer(policy, experts=backend, **routing)
    x = torch.randn(groups[-1], 32, generator=torch.Generator().manual_seed(3))
    idx, gate = layer.route(x, groups)
    want = BatchedExperts()(layer, x, idx, gate)
    got = layer.combine(x, idx, gate)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer(x, groups)[0], got)  # forward takes this path too

    # Poison the experts that hold no token: a path that read them would return NaN.
    empty = [e for e in range(idx.shape[0]) if not (idx[e] >= 0).any()]
    assert empty or policy in ("ec", "threshold")
    with torch.no_grad():
        for w in (layer.w_gate, layer.w_up, layer.w_down):
            w[empty] = float("nan")
    assert torch.equal(layer.combine(x, idx, gate), got)


@needs_cpu_ops
@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize(("policy", "routing", "groups"), CASES)
def test_fused_cpu_op_equals_its_twin_bit_for_bit(policy, routing, groups, activation):
    layer = make_layer(policy, activation=activation, **routing)
    x = torch.randn(groups[-1], 32, generator=torch.Generator().manual_seed(4))
    idx, gate = layer.route(x, groups)
    want = moe_experts_reference(x, idx, gate, layer.w_gate, layer.w_up, layer.w_down,
                                 activation)
    assert torch.equal(FusedCpuExperts()(layer, x, idx, gate), want)


@needs_cpu_ops
def test_fused_cpu_op_with_no_token_on_any_expert_and_odd_widths():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 37, generator=gen)  # d = 37: a 5-wide tail chunk
    w_gate, w_up = torch.randn(2, 19, 37, generator=gen), torch.randn(2, 19, 37, generator=gen)
    w_down = torch.randn(2, 37, 19, generator=gen)
    idx = torch.full((2, 3), -1)
    gate = torch.zeros(2, 3)
    op = torch.ops.ecserve.moe_experts
    assert torch.equal(op(x, idx, gate, w_gate, w_up, w_down, 0), torch.zeros(3, 37))
    idx[1, 0], gate[1, 0] = 2, 0.5
    want = moe_experts_reference(x, idx, gate, w_gate, w_up, w_down, "silu")
    assert torch.equal(op(x, idx, gate, w_gate, w_up, w_down, 0), want)
    assert want[:2].abs().sum() == 0 and want[2].abs().sum() > 0


@needs_cpu_ops
def test_fused_cpu_op_takes_bf16_weights():
    layer = make_layer("token_choice", top_k=2).to(torch.bfloat16)
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(2)).bfloat16()
    idx, gate = layer.route(x, (0, 6))
    want = moe_experts_reference(x, idx, gate, layer.w_gate, layer.w_up, layer.w_down, "silu")
    got = FusedCpuExperts()(layer, x, idx, gate)
    if torch.ops.ecserve.native_bf16():  # AVX512-BF16 sums in the hardware's order
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)
    else:  # bf16 widened to float32: the twin's arithmetic
        assert torch.equal(got, want)
    torch.testing.assert_close(want, BatchedExperts()(layer, x, idx, gate), rtol=0.05,
                               atol=0.05)


@needs_cpu_ops
@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_fused_cpu_op_bf16_at_odd_widths(tokens):
    """Widths that are no multiple of 32 (the bf16 instruction's step) end in a masked tail."""
    from ecserve_kernels.reference import moe_experts_reference

    gen = torch.Generator().manual_seed(tokens)
    e, d, f = 4, 40, 72
    x = torch.randn(tokens, d, generator=gen).bfloat16()
    w_gate, w_up = (torch.randn(e, f, d, generator=gen).bfloat16() for _ in range(2))
    w_down = torch.randn(e, d, f, generator=gen).bfloat16()
    idx = torch.full((e, tokens), -1, dtype=torch.long)
    for t in range(tokens):  # every token on two experts, expert 3 left empty
        for j in (t % 3, (t + 1) % 3):
            idx[j, t] = t
    gate = torch.where(idx >= 0, torch.rand(e, tokens, generator=gen), torch.zeros(()))
    got = torch.ops.ecserve.moe_experts(x, idx, gate, w_gate, w_up, w_down, 0)
    want = moe_experts_reference(x, idx, gate, w_gate, w_up, w_down, "silu")
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@needs_cpu_ops
@pytest.mark.parametrize(("m", "k", "o"), [(1, 256, 512), (3, 40, 37), (8, 100, 5),
                                           (16, 512, 512), (64, 256, 512)])
def test_cpu_linear_bf16_within_tolerance(m, k, o):
    gen = torch.Generator().manual_seed(m + k)
    x, w = torch.randn(m, k, generator=gen).bfloat16(), torch.randn(o, k, generator=gen).bfloat16()
    b = torch.randn(o, generator=gen).bfloat16()
    got = torch.ops.ecserve.linear(x, w, b)
    assert got.dtype == torch.bfloat16
    want = torch.nn.functional.linear(x.float(), w.float(), b.float())
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


@needs_cpu_ops
@pytest.mark.parametrize(("m", "k", "o"),
                         [(1, 256, 512), (3, 300, 37), (8, 16, 5), (9, 40, 70), (64, 32, 48),
                          (16, 512, 512), (17, 512, 512)])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_linear_equals_its_twin_bit_for_bit(m, k, o, bias):
    from ecserve_kernels.reference import cpu_linear_reference

    gen = torch.Generator().manual_seed(m * k)
    x, w = torch.randn(m, k, generator=gen), torch.randn(o, k, generator=gen)
    b = torch.randn(o, generator=gen) if bias else None
    got = torch.ops.ecserve.linear(x, w, b)
    assert torch.equal(got, cpu_linear_reference(x, w, b))
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-4)


@needs_cpu_ops
def test_cpu_ops_stay_one_opaque_call_in_a_compiled_graph():
    layer = make_layer("token_choice", experts=FusedCpuExperts(), top_k=2)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(6))
    idx, gate = layer.route(x, (0, 4), static_shapes=True)
    fn = torch.compile(lambda x, idx, gate: layer.combine(x, idx, gate), fullgraph=True,
                       backend="eager")
    assert torch.equal(fn(x, idx, gate), layer.combine(x, idx, gate))


def test_filled_combine_sums_a_token_in_ascending_expert_order():
    layer = make_layer("token_choice", top_k=8)  # every token in every expert
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    idx, gate = layer.route(x, (0, 3))
    got = layer.combine(x, idx, gate)
    want = torch.zeros(3, 32)
    for e, j in itertools.product(range(idx.shape[0]), range(idx.shape[1])):
        t = int(idx[e, j])
        if t >= 0:
            xt = x[t:t + 1]
            h = layer.act(xt @ layer.w_gate[e].T) * (xt @ layer.w_up[e].T)
            want[t] += gate[e, j] * (h @ layer.w_down[e].T)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_filled_combine_backpropagates_like_the_batched_one():
    layer = make_layer("ec", capacity_factor=2.0).requires_grad_(True)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(9), requires_grad=True)
    idx, gate = layer.route(x, (0, 8))
    grads = []
    for backend in (FilledExperts(), BatchedExperts()):
        layer.zero_grad()
        x.grad = None
        backend(layer, x, idx, gate.detach()).square().sum().backward()
        grads.append((x.grad.clone(), layer.w_up.grad.clone()))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
