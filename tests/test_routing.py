"""ecserve.routing against public vectors, slow references and the spec's laws."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_routing import (
    ref_capped_choice,
    ref_expert_choice,
    ref_threshold_choice,
    ref_token_choice,
)

from ecserve.config import PER_TOKEN_POLICIES, POLICIES, RoutingConfig
from ecserve.routing import (
    ROUTING_POLICIES,
    Routing,
    capped_choice,
    expert_choice,
    expert_choice_groups,
    route,
    threshold_choice,
    token_choice,
)

VECTORS = Path(__file__).parent / "data" / "ec_public_vectors.npz"
EXPERTS = (1, 2, 4, 8, 16)
FACTORS = (0.25, 0.5, 1.0, 1.25, 2.0, 3.0, 4.5, 20.0)


def _assert_same(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]):
    assert got[0].dtype == torch.int64 and got[1].dtype == torch.float32
    assert torch.equal(got[0], want[0]), f"idx\n{got[0]}\n!=\n{want[0]}"
    assert torch.equal(got[1], want[1]), f"gate\n{got[1]}\n!=\n{want[1]}"


def _scores(rng: random.Random, n: int, num_experts: int) -> torch.Tensor:
    """Router probabilities, often with exact ties: duplicated token rows or quantised values."""
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    s = torch.softmax(torch.randn(n, num_experts, generator=gen) * rng.choice((0.3, 2.0, 6.0)), -1)
    mode = rng.choice(("plain", "duplicate", "quantise"))
    if mode == "duplicate":
        src = torch.randint(0, n, (n,), generator=gen)
        s = torch.where((torch.rand(n, generator=gen) < 0.5)[:, None], s[src], s)
    elif mode == "quantise":  # few dyadic levels in (0, 1]: ties within and across tokens
        levels = rng.choice((2, 4, 8))
        s = torch.ceil(s * levels) / levels
    return s.contiguous()


def _shapes(seed: int, count: int):
    rng = random.Random(seed)
    for i in range(count):
        # Small groups are where the policies differ most; n = 1 shows up often.
        n = 1 if i % 10 == 0 else rng.choice((rng.randint(1, 12), rng.randint(1, 100)))
        num_experts = rng.choice(EXPERTS)
        yield rng, n, num_experts, _scores(rng, n, num_experts)


# ---------------------------------------------------------------- public vectors


def _vector_cases() -> list[int]:
    with np.load(VECTORS) as d:
        return list(range(int(d["n"])))


@pytest.mark.parametrize("case", _vector_cases())
def test_expert_choice_public_vectors(case: int) -> None:
    with np.load(VECTORS) as d:
        probs, k = d[f"c{case}_probs"], int(d[f"c{case}_capacity"])
        want_idx, want_gate = d[f"c{case}_idx"], d[f"c{case}_gate"]
    for g in range(probs.shape[0]):
        got = expert_choice(torch.from_numpy(probs[g]), k)
        _assert_same(got, (torch.from_numpy(want_idx[g]), torch.from_numpy(want_gate[g])))


# ---------------------------------------------------------------- fast vs reference


@pytest.mark.parametrize("seed", range(6))
def test_expert_choice_matches_reference(seed: int) -> None:
    for rng, n, _, s in _shapes(100 + seed, 80):
        k = rng.choice((1, n, rng.randint(1, n)))
        _assert_same(expert_choice(s, k), ref_expert_choice(s, k))


@pytest.mark.parametrize("seed", range(6))
def test_capped_choice_matches_reference(seed: int) -> None:
    for rng, n, num_experts, s in _shapes(200 + seed, 80):
        c = rng.choice(FACTORS)
        cfg = RoutingConfig(policy="capped", capacity_factor=c,
                            max_experts_per_token=rng.randint(1, num_experts))
        b = cfg.experts_per_token_cap(num_experts)
        k, total = cfg.capacity(n, num_experts), math.ceil(n * c)
        _assert_same(capped_choice(s, k, b, total), ref_capped_choice(s, k, b, total))
        # Arbitrary caps and totals, beyond what a config produces.
        k, b, total = rng.randint(1, n), rng.randint(1, num_experts + 1), rng.randint(0, n * 20)
        _assert_same(capped_choice(s, k, b, total), ref_capped_choice(s, k, b, total))


@pytest.mark.parametrize("seed", range(6))
def test_token_choice_matches_reference(seed: int) -> None:
    for rng, _, num_experts, s in _shapes(300 + seed, 80):
        top_k, renorm = rng.randint(1, num_experts), rng.random() < 0.5
        _assert_same(token_choice(s, top_k, renorm), ref_token_choice(s, top_k, renorm))


def _thresholds(rng: random.Random, s: torch.Tensor) -> torch.Tensor:
    """Per-expert thresholds that split the tokens: often an exact score (ties with >=),
    sometimes above every score (an expert nobody reaches) or 0 (every token passes)."""
    n, num_experts = s.shape
    theta = []
    for e in range(num_experts):
        mode = rng.random()
        if mode < 0.5:
            theta.append(float(s[rng.randrange(n), e]))
        elif mode < 0.6:
            theta.append(1.0 + 1e-3)
        elif mode < 0.7:
            theta.append(0.0)
        else:
            theta.append(rng.random() / num_experts * 2)
    return torch.tensor(theta, dtype=torch.float32)


@pytest.mark.parametrize("seed", range(6))
def test_threshold_choice_matches_reference(seed: int) -> None:
    for rng, _, num_experts, s in _shapes(500 + seed, 80):
        theta, b = _thresholds(rng, s), rng.randint(1, num_experts)
        _assert_same(threshold_choice(s, theta, b), ref_threshold_choice(s, theta, b))


def test_threshold_choice_is_batch_invariant_and_causal() -> None:
    """A token's experts and gates depend on its own scores only: routed in any group (any
    neighbours, any position, alone) it gets the same ones."""
    for rng, n, num_experts, s in _shapes(600, 60):
        theta, b = _thresholds(rng, s), rng.randint(1, num_experts)

        def pairs(scores: torch.Tensor, rows: list[int], theta=theta, b=b) -> dict[int, set]:
            idx, gate = threshold_choice(scores, theta, b)
            out: dict[int, set] = {t: set() for t in rows}
            for e, slot in (idx >= 0).nonzero().tolist():
                out[rows[int(idx[e, slot])]].add((e, float(gate[e, slot])))
            return out

        whole = pairs(s, list(range(n)))
        perm = list(range(n))
        rng.shuffle(perm)
        assert pairs(s[perm], perm) == whole
        for t in range(n):
            assert pairs(s[t:t + 1], [t]) == {t: whole[t]}
        assert pairs(s[: n // 2 + 1], list(range(n // 2 + 1))) == {
            t: whole[t] for t in range(n // 2 + 1)}


def test_threshold_choice_static_width_pads_the_dropless_layout() -> None:
    for rng, n, num_experts, s in _shapes(700, 40):
        theta, b = _thresholds(rng, s), rng.randint(1, num_experts)
        idx, gate = threshold_choice(s, theta, b)
        sidx, sgate = threshold_choice(s, theta, b, static_width=True)
        m = idx.shape[1]
        assert sidx.shape == (num_experts, n) and m <= max(1, n)
        assert torch.equal(sidx[:, :m], idx) and torch.equal(sgate[:, :m], gate)
        assert (sidx[:, m:] == -1).all() and (sgate[:, m:] == 0).all()


def test_threshold_choice_bad_inputs() -> None:
    s = torch.full((4, 3), 1 / 3)
    with pytest.raises(ValueError, match=r"thresholds must be float32 \[3\]"):
        threshold_choice(s, torch.zeros(4), 3)
    with pytest.raises(ValueError, match="thresholds must be float32"):
        threshold_choice(s, torch.zeros(3, dtype=torch.float64), 3)
    with pytest.raises(ValueError, match="max_experts_per_token"):
        threshold_choice(s, torch.zeros(3), 0)
    with pytest.raises(ValueError, match="float32"):
        threshold_choice(s.bfloat16(), torch.zeros(3), 3)


def test_expert_choice_groups_equals_one_group_at_a_time() -> None:
    rng = random.Random(9)
    for g, n, num_experts in ((1, 5, 4), (3, 8, 8), (7, 16, 2)):
        s = torch.stack([_scores(rng, n, num_experts) for _ in range(g)])
        k = rng.randint(1, n)
        idx, gate = expert_choice_groups(s, k)
        assert idx.shape == gate.shape == (g, num_experts, k)
        for i in range(g):
            _assert_same((idx[i], gate[i]), ref_expert_choice(s[i], k))


def test_token_choice_static_width_pads_the_dropless_layout() -> None:
    """The CUDA-graph layout: n slots per expert, the dropless layout's slots first, then empty."""
    for rng, n, num_experts, s in _shapes(400, 40):
        top_k, renorm = rng.randint(1, num_experts), rng.random() < 0.5
        idx, gate = token_choice(s, top_k, renorm)
        sidx, sgate = token_choice(s, top_k, renorm, static_width=True)
        m = idx.shape[1]
        assert sidx.shape == (num_experts, n) and m <= n
        assert torch.equal(sidx[:, :m], idx) and torch.equal(sgate[:, :m], gate)
        assert (sidx[:, m:] == -1).all() and (sgate[:, m:] == 0).all()


def test_capped_long_dependency_chain() -> None:
    # b = 1, capacity 1 and a staircase of scores: each pair's fate hangs on the previous one,
    # the worst case for deciding the sequential greedy in parallel rounds.
    n = num_experts = 16
    s = torch.zeros(n, num_experts)
    for t in range(n):
        s[t, t] = 1.0 - 0.05 * t
        if t + 1 < num_experts:
            s[t, t + 1] = 0.99 - 0.05 * t
    s = s / s.sum(1, keepdim=True)
    for b, k in ((1, 1), (2, 1), (1, 2)):
        _assert_same(capped_choice(s, k, b, 10**6), ref_capped_choice(s, k, b, 10**6))


# ---------------------------------------------------------------- the spec's laws


@pytest.mark.parametrize("num_experts", EXPERTS)
@pytest.mark.parametrize("c", FACTORS)
def test_capped_single_token_takes_its_top_experts(num_experts: int, c: float) -> None:
    s = _scores(random.Random(num_experts * 100 + int(c * 4)), 1, num_experts)
    order = torch.sort(s[0], descending=True, stable=True).indices.tolist()
    for b in range(1, num_experts + 1):
        r = route(s, RoutingConfig(policy="capped", capacity_factor=c, max_experts_per_token=b))
        assert r.idx.shape == (num_experts, 1)
        want = set(order[: min(b, math.ceil(c))])
        assert {e for e in range(num_experts) if r.idx[e, 0] == 0} == want
        assert torch.equal(r.gate[:, 0], torch.where(r.idx[:, 0] == 0, s[0], 0.0))


@pytest.mark.parametrize("num_experts", EXPERTS)
@pytest.mark.parametrize("c", (0.5, 1.0, 1.25, 2.0, 3.0))
def test_capped_with_b_equal_e_and_whole_slots_is_ec(num_experts: int, c: float) -> None:
    rng = random.Random(num_experts * 7 + int(c * 4))
    unit = RoutingConfig(capacity_factor=c).group_unit(num_experts)
    for mult in (1, 2, 5):
        s = _scores(rng, unit * mult, num_experts)
        ec = route(s, RoutingConfig(policy="ec", capacity_factor=c))
        capped = route(s, RoutingConfig(policy="capped", capacity_factor=c))
        _assert_same((capped.idx, capped.gate), (ec.idx, ec.gate))


def test_ec_perfect_balance_and_token_choice_counts() -> None:
    for rng, n, num_experts, s in _shapes(400, 80):
        k = rng.randint(1, n)
        idx, gate = expert_choice(s, k)
        assert idx.shape == (num_experts, k) and bool((idx >= 0).all())
        assert all(len(set(row)) == k for row in idx.tolist())  # k distinct tokens per expert
        assert torch.equal(gate, s.t().gather(1, idx))
        top_k = rng.randint(1, num_experts)
        idx, _ = token_choice(s, top_k, rng.random() < 0.5)
        assert torch.equal(torch.bincount(idx[idx >= 0], minlength=n), torch.full((n,), top_k))
        assert idx.shape[1] == max(1, int((idx >= 0).sum(1).max()))  # dropless, no spare column


def test_token_choice_renormalised_gates_sum_to_one() -> None:
    s = _scores(random.Random(5), 40, 8)
    idx, gate = token_choice(s, 3, renormalize=True)
    per_token = torch.zeros(40).index_add_(0, idx[idx >= 0], gate[idx >= 0])
    torch.testing.assert_close(per_token, torch.ones(40))


# ---------------------------------------------------------------- config plumbing and errors


def test_route_uses_config() -> None:
    s = _scores(random.Random(6), 7, 8)
    r = route(s, RoutingConfig(policy="ec", capacity_factor=2.0))  # k = min(7, ceil(14 / 8)) = 2
    assert isinstance(r, Routing)
    _assert_same((r.idx, r.gate), ref_expert_choice(s, 2))
    r = route(s, RoutingConfig(policy="capped", capacity_factor=2.0, max_experts_per_token=3))
    _assert_same((r.idx, r.gate), ref_capped_choice(s, 2, 3, 14))
    r = route(s, RoutingConfig(policy="token_choice", top_k=3, renormalize=True))
    _assert_same((r.idx, r.gate), ref_token_choice(s, 3, True))


def test_route_computes_capacity_and_total_exactly() -> None:
    # In floats 30 * 0.1 / 3 = 1.0000000000000002 and 10 * 0.7 = 7.000000000000001: exact
    # decimals give k = 1 and total = 7 where float ceil would give 2 and 8.
    s = _scores(random.Random(7), 30, 3)
    assert route(s, RoutingConfig(policy="ec", capacity_factor=0.1)).idx.shape == (3, 1)
    s = _scores(random.Random(8), 10, 2)
    r = route(s, RoutingConfig(policy="capped", capacity_factor=0.7))  # k = 4: 8 slots
    assert r.idx.shape == (2, 4) and int((r.idx >= 0).sum()) == 7


def test_registry_covers_config_policies() -> None:
    assert set(POLICIES) == set(ROUTING_POLICIES)
    assert {p.name for p in ROUTING_POLICIES.values() if p.per_token} == set(PER_TOKEN_POLICIES)


@pytest.mark.parametrize("policy,message", [("threshold", "calibrated thresholds"),
                                            ("bogus", "unknown routing policy 'bogus'")])
def test_route_refuses(policy: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        route(torch.full((4, 2), 0.5), RoutingConfig(policy=policy))


def test_bad_inputs() -> None:
    s = torch.full((8, 4), 0.25)
    with pytest.raises(ValueError, match="capacity 9 exceeds the group's 8 tokens"):
        expert_choice(s, 9)
    with pytest.raises(ValueError, match="capacity 9 exceeds"):
        capped_choice(s, 9, 4, 16)
    for fn in (lambda x: expert_choice(x, 0), lambda x: capped_choice(x, 0, 4, 16)):
        with pytest.raises(ValueError, match="capacity must be >= 1"):
            fn(s)
    with pytest.raises(ValueError, match="max_experts_per_token"):
        capped_choice(s, 2, 0, 16)
    for top_k in (0, 5):
        with pytest.raises(ValueError, match="top_k"):
            token_choice(s, top_k, False)
    for fn in (lambda x: expert_choice(x, 2), lambda x: capped_choice(x, 2, 4, 16),
               lambda x: token_choice(x, 2, False),
               lambda x: route(x, RoutingConfig(policy="ec"))):
        for bad in (s.bfloat16(), s.double()):
            with pytest.raises(ValueError, match="float32"):
                fn(bad)
        for bad in (s[0], s[None]):
            with pytest.raises(ValueError, match=r"\[n, E\]"):
                fn(bad)
        with pytest.raises(ValueError, match=">= 1 token"):
            fn(s[:0])


@pytest.mark.parametrize("policy", ["threshold", "token_choice"])
def test_per_token_policies_compiled_as_the_decode_step_equal_the_reference(policy: str) -> None:
    """The compiled decode step routes with the static-width layout inside one inductor graph
    (ecserve/model/decode.py), its token count symbolic: compiled, it still equals the
    independent reference on random groups, ties included."""
    if policy == "threshold":
        def fn(s: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return threshold_choice(s, theta, 2, static_width=True)
    else:
        def fn(s: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return token_choice(s, 2, True, static_width=True)
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    rng = random.Random(800)
    for _ in range(12):
        n = rng.randint(2, 48)
        s = _scores(rng, n, 8)
        theta = _thresholds(rng, s)
        sidx, sgate = compiled(s, theta)
        idx, gate = (ref_threshold_choice(s, theta, 2) if policy == "threshold"
                     else ref_token_choice(s, 2, True))
        m = idx.shape[1]
        assert torch.equal(sidx[:, :m], idx) and (sidx[:, m:] == -1).all()
        torch.testing.assert_close(sgate[:, :m], gate, rtol=0, atol=0)
        assert (sgate[:, m:] == 0).all()
