"""Request validation: the engine refuses what it cannot serve with a RequestError naming the
field, leaves its state untouched, and SamplingParams rejects bad values up front."""

from __future__ import annotations

import pytest

from ecserve.config import EngineConfig
from ecserve.engine.engine import Engine, RequestError
from ecserve.types import FinishReason, Request, SamplingParams

# The tiny model (conftest): 4 layers, 2 KV heads of 16 dims, float32, so one 16-token KV
# block takes 2 (K and V) * 4 * 16 * 2 * 16 * 4 bytes.
BLOCK_BYTES = 2 * 4 * 16 * 2 * 16 * 4
NUM_BLOCKS = 4  # 64 KV slots: the tiny model's 256-token context does not fit


@pytest.fixture
def engine(make_model) -> Engine:
    return Engine(make_model(), EngineConfig(device="cpu", kv_cache_bytes=NUM_BLOCKS * BLOCK_BYTES))


def run(engine: Engine) -> dict[str, list]:
    events: dict[str, list] = {}
    while engine.has_unfinished():
        for ev in engine.step():
            events.setdefault(ev.request_id, []).append(ev)
    return events


def refused(engine: Engine, request: Request) -> str:
    before = (dict(engine.seqs), len(engine.batcher.waiting), engine.blocks.num_free)
    with pytest.raises(RequestError) as err:
        engine.add_request(request)
    # nothing was queued, registered or allocated
    assert (dict(engine.seqs), len(engine.batcher.waiting), engine.blocks.num_free) == before
    return str(err.value)


def test_the_budget_gives_the_expected_cache(engine):
    assert engine.blocks.num_blocks == NUM_BLOCKS and engine.blocks.block_size == 16
    assert engine.max_model_len == 256


def test_request_error_is_a_value_error():
    assert issubclass(RequestError, ValueError)


def test_refused_requests_are_not_queued(engine):
    refused(engine, Request("r", ()))
    assert not engine.has_unfinished() and engine.step() == []


def test_empty_prompt(engine):
    assert refused(engine, Request("r", ())) == (
        "prompt: empty (a prompt needs at least one token)")


def test_prompt_ids_outside_the_vocabulary(engine):
    msg = refused(engine, Request("r", (1, -1, 258, 2, 300)))
    assert msg == "prompt: token id(s) [-1, 258, 300] outside the vocabulary [0, 258)"


def test_at_most_five_bad_ids_are_listed(engine):
    msg = refused(engine, Request("r", tuple(range(300, 310))))
    assert "[300, 301, 302, 303, 304]" in msg and "305" not in msg


def test_vocabulary_edges_are_accepted(engine):
    engine.add_request(Request("r", (0, 257), SamplingParams(max_new_tokens=1)))
    assert engine.has_unfinished()


def test_stop_token_outside_the_vocabulary(engine):
    msg = refused(engine, Request("r", (1,), SamplingParams(stop_token_ids=(5, 258))))
    assert msg == "stop_token_ids: [258] outside the vocabulary [0, 258)"


def test_bad_routing_scope(engine):
    msg = refused(engine, Request("r", (1,), routing_scope="global"))
    assert msg == "routing_scope: 'global' is not one of batch, sequence"


def test_duplicate_request_id(engine):
    engine.add_request(Request("r", (1, 2), SamplingParams(max_new_tokens=3)))
    with pytest.raises(RequestError, match=r"^request_id 'r' is already in use$"):
        engine.add_request(Request("r", (5,), SamplingParams(max_new_tokens=1)))
    # the first request is untouched and runs to its own length
    events = run(engine)
    assert [e.index for e in events["r"]] == [0, 1, 2]
    assert events["r"][-1].finish_reason is FinishReason.LENGTH


def test_finished_and_aborted_ids_can_be_reused(engine):
    engine.add_request(Request("r", (1, 2), SamplingParams(max_new_tokens=1)))
    run(engine)
    engine.add_request(Request("r", (1, 2), SamplingParams(max_new_tokens=1)))
    assert engine.abort("r")
    engine.add_request(Request("r", (1, 2), SamplingParams(max_new_tokens=1)))
    assert len(run(engine)["r"]) == 1


def test_over_the_context(make_model):
    # a KV cache big enough for the whole context, so only the context limit applies
    eng = Engine(make_model(), EngineConfig(device="cpu", kv_cache_bytes=16 * BLOCK_BYTES))
    msg = refused(eng, Request("r", (1,) * 200, SamplingParams(max_new_tokens=57)))
    assert msg == ("prompt (200 tokens) + max_new_tokens (57) = 257 exceeds the context of "
                   "256 tokens")
    eng.add_request(Request("ok", (1,) * 200, SamplingParams(max_new_tokens=56)))  # = 256


def test_a_prompt_past_the_context_is_refused_for_the_context_not_the_queue(make_model):
    """Raising max_waiting_tokens could never serve it: the message must name the context."""
    cfg = EngineConfig(device="cpu", max_model_len=32, max_waiting_tokens=16,
                       kv_cache_bytes=NUM_BLOCKS * BLOCK_BYTES)
    msg = refused(Engine(make_model(), cfg), Request("r", (1,) * 500, SamplingParams()))
    assert msg.endswith(f"= {500 + SamplingParams().max_new_tokens} exceeds the context of 32 "
                        "tokens")


def test_engine_max_model_len_is_the_context(make_model):
    cfg = EngineConfig(device="cpu", max_model_len=32, kv_cache_bytes=NUM_BLOCKS * BLOCK_BYTES)
    eng = Engine(make_model(), cfg)
    msg = refused(eng, Request("r", (1,) * 30, SamplingParams(max_new_tokens=3)))
    assert msg.endswith("= 33 exceeds the context of 32 tokens")


def test_more_kv_than_the_whole_cache(engine):
    # the last sampled token is never written to the cache: 65 tokens need 64 slots
    engine.add_request(Request("fits", (1,) * 60, SamplingParams(max_new_tokens=5)))
    msg = refused(engine, Request("r", (1,) * 60, SamplingParams(max_new_tokens=6)))
    assert msg == ("prompt + max_new_tokens needs 5 KV blocks but the whole cache has 4; "
                   "lower max_new_tokens or raise the KV cache budget")
    assert list(run(engine)) == ["fits"]  # a request using the whole cache completes


def test_a_refusal_leaves_the_engine_serving(engine):
    for bad in (Request("a", ()), Request("b", (999,)), Request("c", (1,), routing_scope="x")):
        with pytest.raises(RequestError):
            engine.add_request(bad)
    engine.add_request(Request("ok", (1, 2, 3), SamplingParams(max_new_tokens=4)))
    events = run(engine)
    assert list(events) == ["ok"] and len(events["ok"]) == 4
    assert engine.blocks.num_free == engine.blocks.num_blocks


# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize("kw,pattern", [
    ({"max_new_tokens": 0}, r"^max_new_tokens must be >= 1, got 0$"),
    ({"max_new_tokens": -3}, r"^max_new_tokens must be >= 1, got -3$"),
    ({"min_new_tokens": 5, "max_new_tokens": 4},
     r"^min_new_tokens must be in \[0, max_new_tokens=4\], got 5$"),
    ({"min_new_tokens": -1}, r"^min_new_tokens must be in \[0, max_new_tokens=16\], got -1$"),
    ({"temperature": -0.5}, r"^temperature must be >= 0, got -0\.5$"),
    ({"temperature": float("inf")}, r"^temperature must be >= 0, got inf$"),
    ({"temperature": float("nan")}, r"^temperature must be >= 0, got nan$"),
    ({"top_p": 0.0}, r"^top_p must be in \(0, 1\], got 0\.0$"),
    ({"top_p": 1.5}, r"^top_p must be in \(0, 1\], got 1\.5$"),
    ({"top_p": -0.1}, r"^top_p must be in \(0, 1\], got -0\.1$"),
    ({"top_k": -1}, r"^top_k must be >= 0 \(0 disables it\), got -1$"),
    ({"seed": 2**63}, r"^seed must be in \[0, 2\*\*63\), got 9223372036854775808$"),
])
def test_sampling_params_errors_name_the_field(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        SamplingParams(**kw)


def test_sampling_params_edges_are_accepted():
    p = SamplingParams(max_new_tokens=1, min_new_tokens=1, temperature=0.0, top_p=1.0, top_k=0,
                       seed=0)
    assert p.greedy
    assert not SamplingParams(temperature=1e-6, top_p=1e-9, seed=2**63 - 1).greedy


def test_engine_limits_are_checked(make_model):
    with pytest.raises(ValueError, match="max_num_batched_tokens=4 must be >= max_num_seqs"):
        Engine(make_model(), EngineConfig(device="cpu", max_num_batched_tokens=4))
    with pytest.raises(ValueError, match="KV cache budget of 100 bytes holds no block"):
        Engine(make_model(), EngineConfig(device="cpu", kv_cache_bytes=100))
