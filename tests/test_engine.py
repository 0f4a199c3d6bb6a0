"""Engine behaviour end to end: stopping, streaming text, queue bound, dtypes, offline API."""

from __future__ import annotations

import pytest
import torch

from ecserve import LLM, EngineConfig, FinishReason, SamplingParams
from ecserve.engine.batcher import QueueFullError
from ecserve.types import Request

CPU = EngineConfig(device="cpu", kv_cache_bytes=1 << 22, max_num_batched_tokens=64)


def test_stop_tokens_and_length(make_model):
    llm = LLM(make_model(), CPU)
    (free,) = llm.generate("stop here", SamplingParams(max_new_tokens=12))
    assert free.finish_reason is FinishReason.LENGTH and len(free.token_ids) == 12
    stop = free.token_ids[4]
    first = free.token_ids.index(stop)
    (stopped,) = llm.generate("stop here", SamplingParams(max_new_tokens=12,
                                                         stop_token_ids=(stop,)))
    assert stopped.finish_reason is FinishReason.STOP_TOKEN
    assert stopped.token_ids == free.token_ids[: first + 1]  # the stop token is kept
    (held,) = llm.generate("stop here", SamplingParams(
        max_new_tokens=12, min_new_tokens=12, stop_token_ids=(stop,)))
    assert held.finish_reason is FinishReason.LENGTH and stop not in held.token_ids


def test_eos_ends_generation_unless_ignored(make_model):
    llm = LLM(make_model(), CPU)
    model, eos = llm.engine.runner.model, llm.engine.model_cfg.eos_token_id
    # Make EOS the favourite next token: the tied head scores it with a scaled copy of the
    # embedding row of the token the model picks first.
    (probe,) = llm.generate("abc", SamplingParams(max_new_tokens=3))
    model.embed[eos] = model.embed[probe.token_ids[0]] * 1.5
    (out,) = llm.generate("abc", SamplingParams(max_new_tokens=8))
    assert out.finish_reason is FinishReason.EOS and out.token_ids == [eos]
    (ign,) = llm.generate("abc", SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert ign.finish_reason is FinishReason.LENGTH and len(ign.token_ids) == 8


def test_streamed_text_equals_decoded_tokens(make_model):
    llm = LLM(make_model(), CPU)
    params = [SamplingParams(max_new_tokens=n, temperature=1.0, seed=n, ignore_eos=True)
              for n in (5, 17, 30)]
    outs = llm.generate(["é≈ unicode ", "b", "plain"], params)
    for o, p in zip(outs, params, strict=True):
        assert len(o.token_ids) == p.max_new_tokens and o.seed == p.seed
        assert o.text == llm.engine.tokenizer.decode(o.token_ids)


def test_many_prompts_beyond_the_queue_bound(make_model):
    cfg = EngineConfig(device="cpu", kv_cache_bytes=1 << 20, max_waiting=3, max_num_seqs=2,
                       max_num_batched_tokens=16)
    llm = LLM(make_model(), cfg)
    outs = llm.generate([f"prompt {i}" for i in range(9)], SamplingParams(max_new_tokens=3))
    assert [o.request_id for o in outs] == [f"llm-{i}" for i in range(9)]
    assert all(len(o.token_ids) == 3 for o in outs)
    engine = llm.engine
    for i in range(3):
        engine.add_request(Request(f"q{i}", (1, 2, 3)))
    with pytest.raises(QueueFullError, match="waiting queue full"):
        engine.add_request(Request("q3", (1, 2, 3)))


def test_unseeded_requests_report_the_seed_that_reproduces_them(make_model):
    llm = LLM(make_model(), CPU)
    p = SamplingParams(max_new_tokens=10, temperature=1.0)
    (a,) = llm.generate("seed?", p, routing_scope="sequence")
    (b,) = llm.generate("seed?", SamplingParams(max_new_tokens=10, temperature=1.0, seed=a.seed),
                        routing_scope="sequence")
    assert a.token_ids == b.token_ids


def test_bfloat16_weights_run_on_cpu(make_model):
    model = make_model()
    outs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = EngineConfig(device="cpu", dtype=dtype, kv_cache_bytes=1 << 22, record_steps=True)
        llm = LLM(model, cfg)
        assert llm.engine.runner.model.embed.dtype == getattr(torch, dtype)
        assert llm.engine.runner.kv[0].k.dtype == getattr(torch, dtype)
        (out,) = llm.generate("bf16 check", SamplingParams(max_new_tokens=4))
        assert len(out.token_ids) == 4
        outs[dtype] = llm.engine.records[0].logits["llm-0"]
    # Same function up to bf16 rounding: the first step's logits agree closely.
    diff = (outs["float32"] - outs["bfloat16"]).abs().max()
    assert diff < 0.05 * outs["float32"].abs().max()
