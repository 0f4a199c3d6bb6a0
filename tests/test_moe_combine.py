"""The CPU combine that skips empty experts against the batched one the GPU path runs."""

from __future__ import annotations

import itertools

import pytest
import torch

from ecserve.config import ModelConfig, RoutingConfig
from ecserve.model.moe import MoELayer


def make_layer(policy: str, e: int = 8, **routing: float) -> MoELayer:
    cfg = ModelConfig(vocab_size=8, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=48,
                      num_experts=e, expert_ffn_hidden_size=24,
                      routing=RoutingConfig(policy=policy, **routing))
    layer = MoELayer(cfg, layer=1)
    gen = torch.Generator().manual_seed(e)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return layer.requires_grad_(False)


CASES = [("token_choice", dict(top_k=2), (0, 1)),  # batch 1: 2 of 8 experts hold a token
         ("token_choice", dict(top_k=2), (0, 5)),
         ("capped", dict(capacity_factor=2.0), (0, 1, 4)),
         ("ec", dict(capacity_factor=2.0), (0, 8, 16, 21)),  # mixed group sizes
         ("ec", dict(capacity_factor=1.0), (0, 1, 9))]


@pytest.mark.parametrize(("policy", "routing", "groups"), CASES)
def test_filled_combine_equals_batched_and_reads_no_empty_expert(policy, routing, groups):
    layer = make_layer(policy, **routing)
    x = torch.randn(groups[-1], 32, generator=torch.Generator().manual_seed(3))
    idx, gate = layer.route(x, groups)
    want = layer._combine_batched(x, idx, gate)
    got = layer.combine(x, idx, gate)  # on a CPU: the filled slots only
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer(x, groups)[0], got)  # forward takes this path too

    # Poison the experts that hold no token: a path that read them would return NaN.
    empty = [e for e in range(idx.shape[0]) if not (idx[e] >= 0).any()]
    assert empty or policy == "ec"
    with torch.no_grad():
        for w in (layer.w_gate, layer.w_up, layer.w_down):
            w[empty] = float("nan")
    assert torch.equal(layer.combine(x, idx, gate), got)


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
    for combine in (layer.combine, layer._combine_batched):
        layer.zero_grad()
        x.grad = None
        combine(x, idx, gate.detach()).square().sum().backward()
        grads.append((x.grad.clone(), layer.w_up.grad.clone()))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
