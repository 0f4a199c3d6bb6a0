"""Bad input through the real gRPC client: every refusal has the right status code and a message
that leads with the proto field's path; refusals leave no trace in the engine; a full queue is
RESOURCE_EXHAUSTED and says so."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from conftest import tiny_config
from serving import ServerThread, idle

from ecserve.client import build_request
from ecserve.config import EngineConfig, ModelConfig, ServerConfig
from ecserve.engine.engine import Engine
from ecserve.model.default import write_model
from ecserve.v1 import generation_pb2 as pb
from ecserve.v1 import generation_pb2_grpc as pb_grpc

CONTEXT = 256  # the tiny model's max_position_embeddings
VOCAB = 258  # byte tokenizer: 256 bytes, BOS 256, EOS 257
MAX_REQUEST_BYTES = 4096  # small, so an oversized request is cheap to build
LIMITS = ServerConfig()  # the per-request limits the servers below keep at their defaults
GENERATE = "/ecserve.v1.GenerationService/Generate"
GENERATE_STREAM = "/ecserve.v1.GenerationService/GenerateStream"
TOKENIZE = "/ecserve.v1.GenerationService/Tokenize"
LONG = {"max_new_tokens": 200, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = ModelConfig.from_dict(tiny_config())
    return write_model(tmp_path_factory.mktemp("errors") / "tiny", cfg, 0)


@pytest.fixture(scope="module")
def server(model_dir) -> Iterator[ServerThread]:
    engine = Engine(model_dir, EngineConfig(device="cpu"))
    with ServerThread(engine, max_request_bytes=MAX_REQUEST_BYTES) as s:
        yield s


@pytest.fixture(scope="module")
def channel(server) -> Iterator[grpc.Channel]:
    with server.client(timeout=30) as c:
        yield c.channel


@pytest.fixture(scope="module")
def stub(channel) -> pb_grpc.GenerationServiceStub:
    return pb_grpc.GenerationServiceStub(channel)


# ---------------------------------------------------------------- helpers


def req(prompt: str | list[int] = "hello", **options) -> pb.GenerateRequest:
    return build_request(prompt, **options)


def with_ids(msg: pb.GenerateRequest, ids: list[int]) -> pb.GenerateRequest:
    msg.prompt_token_ids.extend(ids)
    return msg


def with_scope(msg: pb.GenerateRequest, value: int) -> pb.GenerateRequest:
    msg.routing_scope = value  # proto3 enums are open: an unknown number goes on the wire
    return msg


def splice(msg: pb.GenerateRequest, good: bytes, bad: bytes) -> bytes:
    """`msg` serialized with the bytes `good` (once in it) replaced by as many invalid ones."""
    assert len(good) == len(bad)
    raw = msg.SerializeToString()
    assert raw.count(good) == 1
    return raw.replace(good, bad)


def call(channel: grpc.Channel, raw: bytes, streaming: bool) -> list[pb.GenerateResponse]:
    """Send already-serialized bytes to Generate or GenerateStream."""
    des = pb.GenerateResponse.FromString
    if streaming:
        return list(channel.unary_stream(GENERATE_STREAM, response_deserializer=des)(
            raw, timeout=30))
    return [channel.unary_unary(GENERATE, response_deserializer=des)(raw, timeout=30)]


def refusal(fn: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value


def assert_names(err: grpc.RpcError, field: str) -> None:
    """INVALID_ARGUMENT whose message leads with exactly `field` (not a longer path)."""
    details = err.details()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), details)
    assert details.startswith(field), details
    # "prompt" must not be satisfied by "prompt_token_ids", nor "x" by "x.y" or "x[1]"
    assert not re.match(r"[\w.\[]", details[len(field):]), details
    assert len(details) > len(field) + 5, details  # and says what is wrong


# ---------------------------------------------------------------- the bad-input table

CASES: list[tuple[str, pb.GenerateRequest, str]] = [
    ("no prompt", pb.GenerateRequest(), "prompt"),
    ("no prompt, options only", req("", max_new_tokens=4, temperature=0.5), "prompt"),
    ("prompt and ids", with_ids(req("hi"), [1, 2]), "prompt"),
    ("prompt text over the context", req("x" * 300), "prompt"),
    ("prompt text + max_new_tokens over the context",
     req("x" * (CONTEXT - 56), max_new_tokens=56), "prompt"),  # BOS + 200 + 56 = 257
    ("prompt ids over the context", req([1] * (CONTEXT + 1), max_new_tokens=1),
     "prompt_token_ids"),
    ("prompt ids + max_new_tokens over the context", req([1] * 200, max_new_tokens=57),
     "prompt_token_ids"),
    ("presence_penalty over 2", req(presence_penalty=2.5), "sampling.presence_penalty"),
    ("frequency_penalty NaN", req(frequency_penalty=float("nan")),
     "sampling.frequency_penalty"),
    ("repetition_penalty 0", req(repetition_penalty=0.0), "sampling.repetition_penalty"),
    ("max_new_tokens 0", req(max_new_tokens=0), "stopping.max_new_tokens"),
    ("max_new_tokens negative", req(max_new_tokens=-3), "stopping.max_new_tokens"),
    ("min_new_tokens over max_new_tokens", req(max_new_tokens=4, min_new_tokens=5),
     "stopping.min_new_tokens"),
    ("min_new_tokens negative", req(min_new_tokens=-1), "stopping.min_new_tokens"),
    ("temperature negative", req(temperature=-0.5), "sampling.temperature"),
    ("temperature nan", req(temperature=float("nan")), "sampling.temperature"),
    ("temperature inf", req(temperature=float("inf")), "sampling.temperature"),
    ("temperature -inf", req(temperature=float("-inf")), "sampling.temperature"),
    ("top_p 0", req(top_p=0.0), "sampling.top_p"),
    ("top_p negative", req(top_p=-0.1), "sampling.top_p"),
    ("top_p over 1", req(top_p=1.5), "sampling.top_p"),
    ("top_p nan", req(top_p=float("nan")), "sampling.top_p"),
    ("top_k negative", req(top_k=-1), "sampling.top_k"),
    ("seed 2**63", req(seed=2**63), "sampling.seed"),
    ("seed 2**64-1", req(seed=2**64 - 1), "sampling.seed"),
    ("too many stop sequences",
     req(stop_sequences=[f"s{i}" for i in range(LIMITS.max_stop_sequences + 1)]),
     "stopping.stop_sequences"),
    ("stop sequence too long",
     req(stop_sequences=["ok", "é" * (LIMITS.max_stop_sequence_length + 1)]),
     "stopping.stop_sequences[1]"),
    ("empty stop sequence", req(stop_sequences=["ok", ""]), "stopping.stop_sequences[1]"),
    ("negative prompt id", req([5, -1, 6]), "prompt_token_ids"),
    ("prompt id past the vocabulary", req([5, VOCAB, 6]), "prompt_token_ids"),
    ("stop token past the vocabulary", req(stop_token_ids=[3, VOCAB]),
     "stopping.stop_token_ids"),
    ("negative stop token", req(stop_token_ids=[-2]), "stopping.stop_token_ids"),
    ("top_logprobs over the server's max",
     req(logprobs=True, top_logprobs=LIMITS.max_top_logprobs + 1), "response.top_logprobs"),
    ("top_logprobs without logprobs", req(top_logprobs=2), "response.top_logprobs"),
    ("prompt_top_logprobs over the server's max",
     req(prompt_logprobs=True, prompt_top_logprobs=LIMITS.max_top_logprobs + 1),
     "response.prompt_top_logprobs"),
    ("prompt_top_logprobs without prompt_logprobs", req(prompt_top_logprobs=2),
     "response.prompt_top_logprobs"),
    ("unknown routing scope", with_scope(req(), 7), "routing_scope"),
    ("negative routing scope", with_scope(req(), -1), "routing_scope"),
]

# Bytes no client library would send: invalid UTF-8 in string fields, oversized messages.
RAW_CASES: list[tuple[str, bytes, str]] = [
    ("bad UTF-8 in prompt", splice(req("hello"), b"hello", b"hel\xff\xfe"), "prompt"),
    ("bad UTF-8 in a stop sequence",
     splice(req(stop_sequences=["fine", "STOPX"]), b"STOPX", b"STO\xc3("),
     "stopping.stop_sequences"),
    ("over max_request_bytes: text", req("a" * (MAX_REQUEST_BYTES + 100)).SerializeToString(),
     "prompt"),
    ("over max_request_bytes: ids",  # 200 takes two varint bytes
     req([200] * (MAX_REQUEST_BYTES // 2 + 50)).SerializeToString(), "prompt_token_ids"),
    ("not a GenerateRequest at all", b"\xff\xff\xff", "request"),
]


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(("msg", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_field_is_invalid_argument_naming_it(stub, msg, field, streaming):
    if streaming:
        err = refusal(lambda: list(stub.GenerateStream(msg, timeout=30)))
    else:
        err = refusal(lambda: stub.Generate(msg, timeout=30))
    assert_names(err, field)


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(("raw", "field"), [c[1:] for c in RAW_CASES],
                         ids=[c[0] for c in RAW_CASES])
def test_bad_bytes_are_invalid_argument_naming_the_field(channel, raw, field, streaming):
    assert_names(refusal(lambda: call(channel, raw, streaming)), field)


def test_specific_messages(stub):
    """A few messages in full, so a client (or a person) can act on them."""
    cases = [
        (req("x" * 300), "prompt (301 tokens) + max_new_tokens (16) = 317 exceeds the context "
                         "of 256 tokens"),
        (req([1, -1, 258, 2]), "prompt_token_ids: token id(s) [-1, 258] outside the vocabulary "
                               "[0, 258)"),
        (req(stop_sequences=["a"] * 9),
         "stopping.stop_sequences: 9 given, the server takes at most 8"),
        (req(stop_sequences=["a", "b" * 257]),
         "stopping.stop_sequences[1]: 257 characters, the server takes at most 256"),
        (req(logprobs=True, top_logprobs=21),
         "response.top_logprobs: 21 asked, the server gives at most 20"),
        (with_scope(req(), 7), "routing_scope: unknown value 7"),
    ]
    for msg, expected in cases:
        assert refusal(lambda m=msg: stub.Generate(m, timeout=30)).details() == expected


def test_every_refusal_is_logged(stub, channel, caplog):
    """One log line per refused call, with the code, the peer and the message."""
    tokenize = channel.unary_unary(TOKENIZE,
                                   response_deserializer=pb.TokenizeResponse.FromString)
    bad = splice(pb.TokenizeRequest(text="hello"), b"hello", b"he\xffll")
    with caplog.at_level("INFO", logger="ecserve.requests"):
        refusal(lambda: stub.Generate(req(top_p=1.5), timeout=30))
        refusal(lambda: tokenize(bad, timeout=30))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rejected")]
    assert len(lines) == 2, lines
    assert re.fullmatch(r"rejected INVALID_ARGUMENT from ipv[46]:.+: sampling\.top_p must be in "
                        r"\(0, 1\], got 1\.5", lines[0]), lines[0]
    assert lines[1].startswith("rejected INVALID_ARGUMENT from ") and ": text: " in lines[1]


def test_far_over_max_request_bytes_is_refused_by_grpc(channel):
    raw = req("a" * (4 * MAX_REQUEST_BYTES + 10)).SerializeToString()
    for streaming in (False, True):
        err = refusal(lambda s=streaming: call(channel, raw, s))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        assert "larger than max" in err.details()


def test_tokenize_bad_input_names_text(channel):
    tokenize = channel.unary_unary(TOKENIZE,
                                   response_deserializer=pb.TokenizeResponse.FromString)
    bad = splice(pb.TokenizeRequest(text="hello", return_tokens=True), b"hello", b"he\xffll")
    assert_names(refusal(lambda: tokenize(bad, timeout=30)), "text")
    big = pb.TokenizeRequest(text="a" * (MAX_REQUEST_BYTES + 1)).SerializeToString()
    assert_names(refusal(lambda: tokenize(big, timeout=30)), "text")
    ok = tokenize(pb.TokenizeRequest(text="hé").SerializeToString(), timeout=30)
    assert list(ok.token_ids) == [256, ord("h"), 0xC3, 0xA9]


# ---------------------------------------------------------------- what is accepted

EDGES: list[tuple[str, pb.GenerateRequest]] = [
    ("prompt + max_new_tokens = the context", req("x" * (CONTEXT - 56), max_new_tokens=55)),
    ("ids + max_new_tokens = the context", req([1] * 200, max_new_tokens=56)),
    ("vocabulary edges", req([0, VOCAB - 1], max_new_tokens=2, stop_token_ids=[0, VOCAB - 1])),
    ("max_new_tokens 1, min_new_tokens = max", req(max_new_tokens=1, min_new_tokens=1)),
    ("top_p 1, top_k 1, temperature 2", req(top_p=1.0, top_k=1, temperature=2.0, seed=1)),
    ("largest seed", req(temperature=1.0, seed=2**63 - 1)),
    ("most stop sequences, longest stop sequence",
     req(stop_sequences=[f"s{i}" for i in range(LIMITS.max_stop_sequences - 1)]
         + ["é" * LIMITS.max_stop_sequence_length])),
    ("most top_logprobs", req(logprobs=True, top_logprobs=LIMITS.max_top_logprobs)),
    ("most prompt_top_logprobs",
     req(prompt_logprobs=True, prompt_top_logprobs=LIMITS.max_top_logprobs)),
    ("sequence scope", with_scope(req(), pb.ROUTING_SCOPE_SEQUENCE)),
    ("batch scope", with_scope(req(), pb.ROUTING_SCOPE_BATCH)),
]


@pytest.mark.parametrize("msg", [e[1] for e in EDGES], ids=[e[0] for e in EDGES])
def test_edges_are_accepted(stub, msg):
    out = stub.Generate(msg, timeout=30)
    assert out.stop_reason != pb.STOP_REASON_NOT_FINISHED
    most = msg.stopping.max_new_tokens if msg.stopping.HasField("max_new_tokens") else 16
    assert 1 <= out.generated_token_count <= most


def sized(n: int) -> pb.GenerateRequest:
    """A text request of exactly n bytes on the wire."""
    msg = req("")
    msg.prompt = "a" * (n - msg.ByteSize() - 4)
    msg.prompt += "a" * (n - msg.ByteSize())
    assert msg.ByteSize() == n
    return msg


def test_the_size_limit_is_max_request_bytes_exactly(stub):
    # At the limit the request is judged on its fields (this one is past the context) ...
    err = refusal(lambda: stub.Generate(sized(MAX_REQUEST_BYTES), timeout=30))
    assert_names(err, "prompt")
    assert "exceeds the context" in err.details(), err.details()
    # ... one byte over, on its size, naming the field that makes it big.
    err = refusal(lambda: stub.Generate(sized(MAX_REQUEST_BYTES + 1), timeout=30))
    assert_names(err, "prompt")
    assert f"max_request_bytes={MAX_REQUEST_BYTES}" in err.details(), err.details()


def test_still_serves_after_every_refusal_and_nothing_leaked(server, stub, channel):
    for _, msg, _ in CASES:
        refusal(lambda m=msg: stub.Generate(m, timeout=30))
        refusal(lambda m=msg: list(stub.GenerateStream(m, timeout=30)))
    for _, raw, _ in RAW_CASES:
        refusal(lambda r=raw: call(channel, r, False))
    assert idle(server)
    out = stub.Generate(req("still here", max_new_tokens=8, ignore_eos=True), timeout=30)
    assert out.stop_reason == pb.STOP_REASON_MAX_TOKENS and out.generated_token_count == 8
    msgs = list(stub.GenerateStream(req("and streaming", max_new_tokens=5, ignore_eos=True),
                                    timeout=30))
    assert msgs[-1].stop_reason == pb.STOP_REASON_MAX_TOKENS
    assert msgs[-1].generated_token_count == 5
    server.wait_until(lambda: idle(server), timeout=10)


# ---------------------------------------------------------------- a full queue


@pytest.fixture
def small_queue(model_dir, request) -> Iterator[ServerThread]:
    """A server running one request at a time with a short waiting queue, steps held (every
    step waits until the test opens the gate, so it can keep requests running and waiting for
    as long as it looks at them: deterministic, unlike a slow step)."""
    engine = Engine(model_dir, EngineConfig(device="cpu", max_num_seqs=1, **request.param))
    with ServerThread(engine) as s:
        s.steps.hold()  # after the warm-up
        try:
            yield s
        finally:
            s.steps.open()


def start_running(s: ServerThread, stub, prompt) -> grpc.Future:
    """A long stream, admitted: its first step is in progress (held by the gate)."""
    stream = stub.GenerateStream(req(prompt, **LONG), timeout=60)
    s.wait_until(lambda: s.steps.held == 1, timeout=10)
    return stream


def queued(s: ServerThread, stub, prompt, live: int) -> grpc.Future:
    stream = stub.GenerateStream(req(prompt, **LONG), timeout=60)
    s.wait_until(lambda: s.server.engine.num_live == live, timeout=10)
    return stream


@pytest.mark.parametrize("small_queue", [{"max_waiting": 1}], indirect=True)
def test_full_queue_is_resource_exhausted(small_queue):
    s = small_queue
    with s.client() as c:
        stub = pb_grpc.GenerationServiceStub(c.channel)
        first = start_running(s, stub, "first")
        second = queued(s, stub, "second", live=2)
        try:
            for fn in (lambda: stub.Generate(req("third", max_new_tokens=1), timeout=30),
                       lambda: list(stub.GenerateStream(req("third"), timeout=30))):
                err = refusal(fn)
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
                assert "queue" in err.details() and "retry" in err.details(), err.details()
            assert s.server.engine.num_live == 2  # the refused calls left nothing behind
            # The queued request is still served once the running one is gone.
            first.cancel()
            s.steps.open()
            msg = next(second)
            assert msg.generated_token_count >= 1
        finally:
            first.cancel()
            second.cancel()
        s.wait_until(lambda: idle(s), timeout=10)
        # room again
        out = stub.Generate(req("fourth", max_new_tokens=2, ignore_eos=True), timeout=30)
        assert out.generated_token_count == 2


@pytest.mark.parametrize("small_queue", [{"max_waiting": 8, "max_waiting_tokens": 64}],
                         indirect=True)
def test_full_token_queue_is_resource_exhausted(small_queue):
    s = small_queue
    with s.client() as c:
        stub = pb_grpc.GenerationServiceStub(c.channel)
        # A prompt that never fits the queue is the request's fault, not the server's load.
        assert_names(refusal(lambda: stub.Generate(req([1] * 65), timeout=30)),
                     "prompt_token_ids")
        streams = [start_running(s, stub, [1] * 50)]  # running: not in the queue
        try:
            streams.append(queued(s, stub, [1] * 40, live=2))  # 40 of 64 queued
            err = refusal(lambda: stub.Generate(req([1] * 25, max_new_tokens=1), timeout=30))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
            assert "queue" in err.details() and "64" in err.details(), err.details()
            streams.append(queued(s, stub, [2] * 24, live=3))  # exactly 64 queued
            err = refusal(lambda: list(stub.GenerateStream(req([3]), timeout=30)))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
            assert "queue" in err.details()
        finally:
            for stream in streams:
                stream.cancel()
            s.steps.open()
        s.wait_until(lambda: idle(s), timeout=10)
        out = stub.Generate(req([1] * 64, max_new_tokens=2, ignore_eos=True), timeout=30)
        assert out.generated_token_count == 2



def test_a_cancelled_or_expired_request_leaves_its_line_in_the_log(server, stub, caplog,
                                                                   monkeypatch):
    """One line per finished request, also when the client ended it. Steps are slowed to
    20 ms, so the cancelled request is still running when its cancel arrives (on a loaded
    machine 200 fast steps could finish first, and the line would rightly say `length`)."""
    monkeypatch.setattr(server.steps, "delay", 0.02)

    def ended() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.getMessage().startswith("request ") and ("cancelled" in r.getMessage()
                                                               or "deadline" in r.getMessage())]

    with caplog.at_level("INFO", logger="ecserve.requests"):
        stream = stub.GenerateStream(req(**LONG), timeout=30)
        next(stream)
        stream.cancel()
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(req(**LONG), timeout=0.05)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        end = time.monotonic() + 10
        while len(ended()) < 2 and time.monotonic() < end:
            time.sleep(0.02)
    lines = ended()
    assert len(lines) == 2, lines
    assert any(re.fullmatch(r"request \w+: 6 prompt tokens, \d+ generated, cancelled by the "
                            r"client", line) for line in lines), lines
    assert any(re.fullmatch(r"request \w+: 6 prompt tokens, \d+ generated, deadline exceeded",
                            line) for line in lines), lines
