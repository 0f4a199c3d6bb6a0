"""The gRPC server end to end with the real client: streams match the offline engine, many
streams run together, cancellation and deadlines free KV blocks, failures stay contained."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import tiny_config
from serving import ServerThread, gauge, idle

from ecserve.config import EngineConfig, ModelConfig
from ecserve.engine.engine import Engine
from ecserve.engine.llm import LLM
from ecserve.types import SamplingParams
from ecserve.v1 import generation_pb2 as pb

LONG = {"max_new_tokens": 200, "ignore_eos": True}  # the tiny model's context is 256


@pytest.fixture
def model_dir(make_model):
    return make_model()


@pytest.fixture
def server(model_dir):
    engine = Engine(model_dir, EngineConfig(device="cpu"))
    with ServerThread(engine) as s:
        yield s


def slow_steps(s: ServerThread, monkeypatch) -> None:
    """Make every step take a while, so a long generation outlasts a short deadline."""
    monkeypatch.setattr(s.steps, "delay", 0.005)


def test_stream_matches_offline_generation_in_sequence_scope(server, model_dir):
    params = {"max_new_tokens": 24, "temperature": 0.9, "top_k": 50, "seed": 1234,
              "ignore_eos": True}
    offline = LLM(model_dir, EngineConfig(device="cpu")).generate(
        "The quick brown fox", SamplingParams(**params), routing_scope="sequence")[0]
    with server.client() as c, ThreadPoolExecutor(4) as pool:
        # Other traffic at the same time must not change a sequence-scope request's tokens.
        noise = [pool.submit(c.generate, f"noise {i}", max_new_tokens=30, routing_scope="batch")
                 for i in range(3)]
        messages = list(c.stream("The quick brown fox", routing_scope="sequence",
                                 token_ids=True, **params))
        for f in noise:
            f.result()
    ids = [t.id for m in messages for t in m.tokens]
    assert ids == offline.token_ids
    assert "".join(m.text for m in messages) == offline.text
    assert messages[-1].stop_reason == pb.STOP_REASON_MAX_TOKENS
    assert [m.stop_reason for m in messages[:-1]] == [pb.STOP_REASON_NOT_FINISHED] * (
        len(messages) - 1)
    assert messages[-1].generated_token_count == 24 and messages[-1].seed == 1234
    assert messages[-1].input_token_count == len(offline.prompt_token_ids)


def test_unary_equals_the_stream_joined(server):
    opts = {"max_new_tokens": 12, "temperature": 1.0, "seed": 7, "token_ids": True,
            "routing_scope": "sequence"}
    with server.client() as c:
        whole = c.generate([5, 6, 7, 8], **opts)
        parts = list(c.stream([5, 6, 7, 8], **opts))
    assert whole.text == "".join(p.text for p in parts)
    assert [t.id for t in whole.tokens] == [t.id for p in parts for t in p.tokens]
    assert whole.stop_reason == parts[-1].stop_reason == pb.STOP_REASON_MAX_TOKENS
    assert whole.input_token_count == 4 and whole.generated_token_count == 12


def test_sixteen_concurrent_streams_all_finish(server):
    def one(i: int) -> list[pb.GenerateResponse]:
        with server.client() as c:
            return list(c.stream(f"stream {i}", max_new_tokens=20 + i, ignore_eos=True,
                                 temperature=0.8, seed=i))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    for i, msgs in enumerate(results):
        assert msgs[-1].stop_reason == pb.STOP_REASON_MAX_TOKENS
        assert msgs[-1].generated_token_count == 20 + i
    server.wait_until(lambda: idle(server))


def test_cancelling_a_stream_frees_its_kv_blocks(server, monkeypatch):
    slow_steps(server, monkeypatch)
    c = server.client()
    call = c._stub.GenerateStream(pb.GenerateRequest(
        prompt="cancel me", stopping=pb.StoppingCriteria(max_new_tokens=200, ignore_eos=True)))
    it = iter(call)
    next(it)
    next(it)
    server.wait_until(lambda: gauge(server, "ecserve_kv_cache_blocks_used") > 0, timeout=10)
    call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        list(it)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    server.wait_until(lambda: idle(server), timeout=10)
    c.close()


def test_leaving_the_client_loop_early_cancels(server, monkeypatch):
    slow_steps(server, monkeypatch)
    with server.client() as c:
        for i, _ in enumerate(c.stream("stop early", **LONG)):
            if i == 2:
                break
    server.wait_until(lambda: idle(server), timeout=10)


@pytest.mark.parametrize("streaming", [False, True])
def test_deadline_ends_the_call_and_frees_blocks(server, monkeypatch, streaming):
    slow_steps(server, monkeypatch)
    with server.client() as c, pytest.raises(grpc.RpcError) as err:
        if streaming:
            list(c.stream("deadline", timeout=0.3, **LONG))
        else:
            c.generate("deadline", timeout=0.3, **LONG)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    server.wait_until(lambda: idle(server), timeout=10)


def test_time_limit_is_a_stop_reason(server, monkeypatch):
    slow_steps(server, monkeypatch)
    with server.client() as c:
        r = c.generate("time limit", time_limit_ms=200, **LONG)
    assert r.stop_reason == pb.STOP_REASON_TIME_LIMIT
    assert 0 < r.generated_token_count < 200


def test_stop_sequence_and_logprobs_in_the_response(server):
    with server.client() as c:
        free = c.generate("hello world", max_new_tokens=24, temperature=1.0, seed=1,
                          ignore_eos=True)
        stop = free.text[7:10]
        r = c.generate("hello world", max_new_tokens=24, temperature=1.0, seed=1,
                       ignore_eos=True, stop_sequences=[stop], logprobs=True, top_logprobs=2)
    assert r.stop_reason == pb.STOP_REASON_STOP_SEQUENCE and r.stop_sequence == stop
    assert r.text == free.text[:free.text.index(stop)]
    assert len(r.tokens) == r.generated_token_count
    for t in r.tokens:
        assert t.HasField("logprob") and t.logprob <= 0 and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.top_logprobs[0].logprob >= t.logprob


def test_a_failing_step_fails_its_requests_and_the_server_goes_on(server):
    with server.client() as c:
        call = c.stream("doomed", **LONG)
        first = next(call)
        assert first.stop_reason == pb.STOP_REASON_NOT_FINISHED
        server.steps.fail_next()
        rest = []
        with pytest.raises(grpc.RpcError) as err:
            for message in call:
                rest.append(message)
        # The stream's last message says why it ended, then the call fails with INTERNAL.
        assert rest[-1].stop_reason == pb.STOP_REASON_ERROR
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "simulated device error" in err.value.details()
        after = c.generate("still here", max_new_tokens=5)
    assert after.stop_reason == pb.STOP_REASON_MAX_TOKENS
    server.wait_until(lambda: idle(server))


def test_tokenize_and_model_info(server):
    mc = ModelConfig.from_dict(tiny_config())  # what make_model() wrote; a byte tokenizer
    with server.client() as c:
        assert c.tokenize("hi") == [mc.bos_token_id, *b"hi"]
        full = c._stub.Tokenize(pb.TokenizeRequest(text="hi", return_tokens=True))
        info = c.model_info()
    assert list(full.tokens)[1:] == ["h", "i"] and full.token_count == 3
    assert (info.vocab_size, info.num_experts, info.routing_policy, info.group_size) == (
        mc.vocab_size, mc.num_experts, mc.routing.policy, mc.routing.group_size)
    assert info.max_model_len == mc.max_position_embeddings and info.device == "cpu"
    assert info.eos_token_id == mc.eos_token_id and info.max_top_logprobs == 20
