"""The compiled decode step (ecserve/engine/compiled_decode.py) against the eager one: the same
greedy tokens, logprobs within 1e-4 and the same routing statistics, on the default model
(threshold routing) and a token-choice model; and the steps it declines run eagerly."""

from __future__ import annotations

import dataclasses

import ecserve_kernels.cpu
import pytest
import torch
from torch._dynamo.utils import counters

from ecserve.config import EngineConfig
from ecserve.engine.compiled_decode import compile_blocker
from ecserve.engine.llm import LLM
from ecserve.types import SamplingParams, TokenEvent

pytestmark = pytest.mark.skipif(not ecserve_kernels.cpu.available(),
                                reason=f"CPU ops: {ecserve_kernels.cpu.load()}")
PROMPTS = 8  # decode batches shrink as sequences finish: every size from 8 to 1 runs


def run(llm: LLM, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[float]], list]:
    logprobs: dict[str, list[float]] = {}

    def on_token(ev: TokenEvent) -> None:
        if ev.logprob is not None:
            logprobs.setdefault(ev.request_id, []).append(ev.logprob)

    # Different lengths, so batches of every size from 8 down to 1 decode.
    params = [SamplingParams(max_new_tokens=8 + 4 * i, temperature=0.0, logprobs=0)
              for i in range(len(prompts))]
    outs = llm.generate(prompts, params, on_token=on_token)
    return ([o.token_ids for o in outs], [logprobs[o.request_id] for o in outs],
            [r.stats.moe for r in llm.engine.records])


def compare(model: str | None, prompts: list[list[int]]) -> None:
    cfg = EngineConfig(device="cpu", max_num_seqs=PROMPTS, record_steps=True)
    eager = LLM(model, cfg)
    compiled = LLM(model, dataclasses.replace(cfg, decode="compiled"))
    assert compiled.engine.runner.compiled is not None
    want_tokens, want_lp, want_stats = run(eager, prompts)
    compiles = counters["stats"]["unique_graphs"]
    got_tokens, got_lp, got_stats = run(compiled, prompts)
    assert compiled.engine.runner.compiled.steps >= 8 + 4 * (PROMPTS - 1) - 1
    assert counters["stats"]["unique_graphs"] == compiles, "steps recompiled start-up's graphs"
    assert got_tokens == want_tokens
    for a, b in zip(got_lp, want_lp, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-4)
    assert len(got_stats) == len(want_stats)
    for step_a, step_b in zip(got_stats, want_stats, strict=True):
        for a, b in zip(step_a, step_b, strict=True):
            assert (a.layer, a.group_sizes, a.capacity_slots) == (
                b.layer, b.group_sizes, b.capacity_slots)
            assert torch.equal(a.tokens_per_expert, b.tokens_per_expert)
            assert torch.equal(a.experts_per_token, b.experts_per_token)
            torch.testing.assert_close(a.gate_sum, b.gate_sum, rtol=1e-5, atol=1e-6)


def test_compiled_decode_equals_eager_on_the_default_model():
    compare(None, [[0, *range(10 + 7 * i, 30 + 9 * i)] for i in range(PROMPTS)])


def test_compiled_decode_equals_eager_under_token_choice(make_model):
    model = make_model(routing={"policy": "token_choice", "top_k": 2})
    compare(str(model), [list(range(3 + i, 12 + 2 * i)) for i in range(PROMPTS)])


def test_group_mixing_policies_and_other_encodings_stay_eager(make_model):
    ec = LLM(make_model(routing={"policy": "ec"}), EngineConfig(device="cpu", decode="compiled"))
    assert ec.engine.runner.compiled is None
    assert "mixes sequences" in (compile_blocker(ec.engine.runner.model) or "")


def test_compiled_decode_compiles_in_bf16(make_model):
    """bf16 attention takes its own path (ecserve.model.attention.sdpa); the step must still
    compile for every table width, not fall back to eager."""
    model = str(make_model(routing={"policy": "token_choice", "top_k": 2}))
    cfg = EngineConfig(device="cpu", dtype="bfloat16", max_num_seqs=4)
    compiled = LLM(model, dataclasses.replace(cfg, decode="compiled"))
    assert compiled.engine.runner.compiled is not None
    prompts = [list(range(3 + i, 12 + 2 * i)) for i in range(4)]
    params = SamplingParams(max_new_tokens=2, temperature=0.0)
    got = [o.token_ids for o in compiled.generate(prompts, params)]
    assert compiled.engine.runner.compiled.steps >= 1
    assert got == [o.token_ids for o in LLM(model, cfg).generate(prompts, params)]
