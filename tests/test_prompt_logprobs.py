"""prompt_logprobs: each prompt token scored through the engine's own prefill steps, equal to a
direct (non-cached) model call with the same routing groups; and the per-sequence prefill chunk
cap that scores a prompt the way decode steps would group it."""

from __future__ import annotations

import pytest
import torch
from reference_model import recompute_logits
from serving import ServerThread

from ecserve.config import EngineConfig
from ecserve.engine.engine import Engine
from ecserve.engine.llm import LLM
from ecserve.types import Request, SamplingParams

TOP = 3


def run(engine: Engine, prompts: dict[str, tuple[int, ...]], scope: str | None = None,
        top: int | None = TOP, arrivals: dict[str, int] | None = None) -> dict[str, tuple]:
    """Each request's prompt_logprobs (from its first event); engine.generated gets each
    request's tokens, prompt and generated."""
    out: dict[str, tuple] = {}
    engine.generated = {rid: list(p) for rid, p in prompts.items()}  # type: ignore[attr-defined]
    pending = dict(prompts)
    step = 0
    while pending or engine.has_unfinished():
        for rid in [r for r in pending if (arrivals or {}).get(r, 0) <= step]:
            engine.add_request(Request(rid, pending.pop(rid),
                                       SamplingParams(max_new_tokens=3, prompt_logprobs=top),
                                       routing_scope=scope))
        for ev in engine.step():
            engine.generated[ev.request_id].append(ev.token_id)  # type: ignore[attr-defined]
            if ev.index == 0 and ev.token_id is not None:
                out[ev.request_id] = ev.prompt_logprobs
        step += 1
    return out


def check_against_direct_call(engine: Engine, prompts: dict[str, tuple[int, ...]],
                              got: dict[str, tuple]) -> int:
    """Every prompt token's logprob and top alternatives equal the recompute's, over the groups
    the engine routed."""
    groups = [g for rec in engine.records for g in rec.groups()]
    ref = recompute_logits(engine.runner.model, engine.generated, groups)  # type: ignore[attr-defined]
    checked = 0
    for rid, prompt in prompts.items():
        lps = got[rid]
        assert len(lps) == len(prompt) and lps[0] is None
        for pos in range(1, len(prompt)):
            want = torch.log_softmax(ref[(rid, pos - 1)].double(), -1)
            lp, top = lps[pos]
            assert lp == pytest.approx(float(want[prompt[pos]]), abs=1e-4)
            want_top = torch.topk(want, TOP)
            assert [i for i, _ in top] == want_top.indices.tolist()
            assert [v for _, v in top] == pytest.approx(want_top.values.tolist(), abs=1e-4)
            checked += 1
    return checked


PROMPTS = {"a": tuple(range(3, 40)), "b": tuple((7 * i) % 250 for i in range(61)),
           "c": (5, 6), "d": tuple((3 * i + 1) % 250 for i in range(23))}


@pytest.mark.parametrize("policy", ["ec", "capped", "threshold"])
@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_prompt_logprobs_equal_a_direct_call_with_the_same_grouping(make_model, policy, scope):
    # A small step budget cuts the prompts into chunks beside other requests' decode tokens.
    engine = Engine(make_model(routing={"policy": policy}),
                    EngineConfig(device="cpu", max_num_batched_tokens=16, max_num_seqs=4,
                                 block_size=4, kv_cache_bytes=1 << 22, record_steps=True))
    got = run(engine, PROMPTS, scope, arrivals={"b": 2, "d": 3})
    assert any(len(c.token_ids) > 1 and not c.sample for r in engine.records
               for c in r.stats.plan.chunks)  # chunked prefill happened
    assert check_against_direct_call(engine, PROMPTS, got) == sum(len(p) - 1
                                                                  for p in PROMPTS.values())


@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_one_token_per_sequence_per_step_forms_decode_groups(make_model, scope):
    """max_prefill_chunk=1: every step takes one prompt token of each live sequence, so the
    groups are those of decode steps (batch scope: one group of B; sequence scope: groups of
    one), and the scores still equal the direct call over those groups."""
    engine = Engine(make_model(routing={"policy": "ec"}),
                    EngineConfig(device="cpu", max_prefill_chunk=1, max_num_seqs=4,
                                 kv_cache_bytes=1 << 22, record_steps=True))
    prompts = {k: v[:20] for k, v in PROMPTS.items() if k != "c"} | {"c": tuple(range(9, 29))}
    got = run(engine, prompts, scope)
    for rec in engine.records:
        plan = rec.stats.plan
        assert all(len(c.token_ids) == 1 for c in plan.chunks)
        want = (len(plan.chunks),) if scope == "batch" else (1,) * len(plan.chunks)
        assert plan.group_sizes == want
    assert {len(r.stats.plan.chunks) for r in engine.records} == {4}  # lock-step
    assert check_against_direct_call(engine, prompts, got) == 4 * 19


def test_sequence_scope_chunks_stay_on_fixed_boundaries_with_a_cap(make_model):
    engine = Engine(make_model(), EngineConfig(device="cpu", max_prefill_chunk=3,
                                               record_steps=True))
    engine.add_request(Request("x", tuple(range(1, 21)), SamplingParams(max_new_tokens=1),
                               routing_scope="sequence"))
    while engine.has_unfinished():
        engine.step()
    starts = [c.start_pos for r in engine.records for c in r.stats.plan.chunks]
    assert starts == [0, 3, 6, 9, 12, 15, 18]


def test_without_prompt_logprobs_nothing_extra_is_computed(make_model):
    engine = Engine(make_model(), EngineConfig(device="cpu", record_steps=True))
    engine.add_request(Request("x", tuple(range(1, 30)), SamplingParams(max_new_tokens=2)))
    events = []
    while engine.has_unfinished():
        events += engine.step()
    assert all(e.prompt_logprobs == () for e in events)
    assert not any(c.score_prompt for r in engine.records for c in r.stats.plan.chunks)


def test_llm_returns_prompt_logprobs_and_zero_alternatives(make_model):
    llm = LLM(make_model(), EngineConfig(device="cpu"))
    (out,) = llm.generate(["hello world"], SamplingParams(max_new_tokens=1, prompt_logprobs=0))
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids) == 12  # BOS + 11 bytes
    assert out.prompt_logprobs[0] is None
    assert all(lp < 0 and top == () for lp, top in out.prompt_logprobs[1:])


def test_grpc_prompt_tokens_in_the_first_message(make_model):
    engine = Engine(make_model(), EngineConfig(device="cpu"))
    with ServerThread(engine) as s, s.client() as c:
        ids = [256, *b"def f(x):"]
        msgs = list(c.stream(ids, max_new_tokens=4, prompt_logprobs=True,
                             prompt_top_logprobs=2))
        whole = c.generate(ids, max_new_tokens=4, prompt_logprobs=True)
    first = msgs[0].prompt_tokens
    assert [t.id for t in first] == ids and all(not m.prompt_tokens for m in msgs[1:])
    assert not first[0].HasField("logprob") and not first[0].top_logprobs
    assert all(t.HasField("logprob") and len(t.top_logprobs) == 2 for t in first[1:])
    assert first[2].text == "e"
    assert [t.logprob for t in whole.prompt_tokens[1:]] == pytest.approx(
        [t.logprob for t in first[1:]], abs=1e-6)
    assert all(not t.top_logprobs for t in whole.prompt_tokens)
