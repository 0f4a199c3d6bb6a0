"""The KV-cached engine equals a non-cached recompute over the groups it routed (float32).

Four-plus sequences of different lengths join at different steps; a small token budget forces
chunked prefill to run beside decode steps.
"""

from __future__ import annotations

import pytest
import torch
from reference_model import recompute_logits

from ecserve.config import EngineConfig
from ecserve.engine.engine import Engine
from ecserve.types import Request, SamplingParams

# (step at which it joins, prompt length, max_new_tokens, routing scope)
ARRIVALS = [(0, 5, 12, None), (0, 37, 6, None), (2, 70, 8, None), (3, 11, 10, "sequence"),
            (3, 23, 9, None), (6, 50, 7, "sequence"), (9, 3, 5, None)]


def run_staggered(engine: Engine, arrivals=ARRIVALS, seed: int = 0) -> dict[str, list[int]]:
    """Add requests at their steps and run to the end; returns each request's token ids."""
    gen = torch.Generator().manual_seed(seed)
    pending = sorted(enumerate(arrivals), key=lambda a: a[1][0])
    tokens: dict[str, list[int]] = {}
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][1][0] <= step:
            i, (_, plen, new, scope) = pending.pop(0)
            prompt = torch.randint(0, 256, (plen,), generator=gen).tolist()
            engine.add_request(Request(f"r{i}", tuple(prompt), SamplingParams(max_new_tokens=new),
                                       routing_scope=scope))
            tokens[f"r{i}"] = prompt
        for ev in engine.step():
            tokens[ev.request_id].append(ev.token_id)
        step += 1
    return tokens


def check_against_recompute(engine: Engine, tokens: dict[str, list[int]]) -> int:
    groups = [g for rec in engine.records for g in rec.groups()]
    ref = recompute_logits(engine.runner.model, tokens, groups)
    checked = 0
    for rec in engine.records:
        for c in rec.stats.plan.chunks:
            if c.sample:
                got = rec.logits[c.request_id]
                want = ref[(c.request_id, c.start_pos + len(c.token_ids) - 1)]
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
                checked += 1
    return checked


ENGINE = EngineConfig(device="cpu", max_num_batched_tokens=24, max_num_seqs=8, block_size=4,
                      kv_cache_bytes=1 << 22, record_steps=True)


@pytest.mark.parametrize("policy", ["ec", "capped", "threshold", "token_choice"])
def test_cached_engine_equals_recompute(make_model, policy):
    routing = {"policy": policy, "max_experts_per_token": 2 if policy == "capped" else None}
    engine = Engine(make_model(routing=routing), ENGINE)
    tokens = run_staggered(engine)
    # The schedule really mixed things: chunked prefill beside decode, several groups a step.
    plans = [r.stats.plan for r in engine.records]
    assert any(len(p.group_sizes) > 1 for p in plans)
    assert any(any(c.sample for c in p.chunks) and any(not c.sample for c in p.chunks)
               for p in plans)
    assert max(len(p.chunks) for p in plans) >= 4
    checked = check_against_recompute(engine, tokens)
    assert checked == sum(a[2] for a in ARRIVALS)  # every sampled token, prefill and decode
    assert engine.blocks.num_free == engine.blocks.num_blocks


@pytest.mark.parametrize("variant", [
    {"position_encoding": "relative_bias", "routing": {"policy": "ec"}},
    {"num_kv_heads": 4, "shared_expert_ffn_hidden_size": 32, "activation": "gelu",
     "router_bias": True, "tie_word_embeddings": False, "moe_layers": [0, 2, 3]},
])
def test_cached_engine_equals_recompute_variants(make_model, variant):
    engine = Engine(make_model(**variant), ENGINE)
    tokens = run_staggered(engine)
    assert check_against_recompute(engine, tokens) == sum(a[2] for a in ARRIVALS)


def test_recompute_detects_a_wrong_grouping(make_model):
    """The reference is sensitive to grouping: regrouping tokens changes ec logits."""
    engine = Engine(make_model(routing={"policy": "ec"}), ENGINE)
    tokens = run_staggered(engine)
    groups = [g for rec in engine.records for g in rec.groups()]
    merged = [[tok for g in groups for tok in g]]  # one big group instead
    ref = recompute_logits(engine.runner.model, tokens, merged)
    rec = engine.records[-1]
    c = next(c for c in rec.stats.plan.chunks if c.sample)
    want = ref[(c.request_id, c.start_pos + len(c.token_ids) - 1)]
    assert (rec.logits[c.request_id] - want).abs().max() > 1e-3
