"""Requests the engine cannot serve are refused with the field named."""

from __future__ import annotations

import pytest

from ecserve.config import EngineConfig
from ecserve.engine.engine import Engine, RequestError
from ecserve.types import Request, SamplingParams


@pytest.fixture
def engine(make_model) -> Engine:
    # 8 blocks of 16 tokens: a request needing more than 128 KV slots can never fit.
    cfg = EngineConfig(device="cpu", kv_cache_bytes=8 * 16 * 2 * 4 * 2 * 16 * 4)
    return Engine(make_model(), cfg)


@pytest.mark.parametrize("request_,match", [
    (Request("a", ()), "prompt: empty"),
    (Request("a", (1, 258)), r"prompt: token id\(s\) \[258\] outside the vocabulary \[0, 258\)"),
    (Request("a", (1,), SamplingParams(stop_token_ids=(-1,))), r"stop_token_ids: \[-1\]"),
    (Request("a", (1,), routing_scope="global"), "routing_scope: 'global' is not one of"),
    (Request("a", (1,) * 200, SamplingParams(max_new_tokens=100)),
     r"prompt \(200 tokens\) \+ max_new_tokens \(100\) = 300 exceeds the context of 256"),
    (Request("a", (1,) * 100, SamplingParams(max_new_tokens=100)),
     "needs 13 KV blocks but the whole cache has 8"),
])
def test_refused(engine, request_, match):
    with pytest.raises(RequestError, match=match):
        engine.add_request(request_)
    assert not engine.has_unfinished()


def test_duplicate_request_id(engine):
    engine.add_request(Request("a", (1, 2)))
    with pytest.raises(RequestError, match="request_id 'a' is already in use"):
        engine.add_request(Request("a", (1, 2)))


@pytest.mark.parametrize("kw,match", [
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"min_new_tokens": 5, "max_new_tokens": 4}, r"min_new_tokens must be in \[0, max_new"),
    ({"temperature": -0.1}, "temperature must be >= 0"),
    ({"temperature": float("nan")}, "temperature must be >= 0"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.01}, r"top_p must be in \(0, 1\]"),
    ({"seed": -1}, r"seed must be in \[0, 2\*\*63\)"),
])
def test_sampling_params_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_engine_limits_are_checked(make_model):
    with pytest.raises(ValueError, match="max_num_batched_tokens=4 must be >= max_num_seqs"):
        Engine(make_model(), EngineConfig(device="cpu", max_num_batched_tokens=4))
    with pytest.raises(ValueError, match="KV cache budget of 100 bytes holds no block"):
        Engine(make_model(), EngineConfig(device="cpu", kv_cache_bytes=100))
    with pytest.raises(ValueError, match="max_model_len=512 exceeds the model's"):
        Engine(make_model(), EngineConfig(device="cpu", max_model_len=512))
