"""What a hostile client sends: bodies of every size up to gRPC's own limit, compressed or not,
garbage or almost valid. Each is answered with a precise status, quickly, in time linear in its
size, and health keeps answering meanwhile (issue 14: a 1 MiB body of 0xFF bytes used to hold
the event loop for ~30 s)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from conftest import tiny_config
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving import ServerThread

from ecserve.client import build_request
from ecserve.config import EngineConfig, ModelConfig
from ecserve.engine.engine import Engine
from ecserve.model.default import write_model
from ecserve.server.wire import bad_utf8_field, largest_field
from ecserve.v1 import generation_pb2 as pb
from ecserve.v1 import generation_pb2_grpc as pb_grpc

GENERATE = "/ecserve.v1.GenerationService/Generate"
MIB = 1 << 20


@pytest.mark.parametrize("size", [10, 1000, 100_000, MIB])
@pytest.mark.parametrize("fill", [b"\xff", b"\x80", b"\x0a\xff"])
def test_the_wire_walk_is_linear(size, fill):
    """A run of continuation bytes once built an ever larger varint (quadratic: 300 KB took
    6.6 s); now each varint stops at protobuf's 10 bytes."""
    data = (fill * size)[:size]
    t0 = time.perf_counter()
    bad_utf8_field(data, pb.GenerateRequest.DESCRIPTOR)
    largest_field(data, pb.GenerateRequest.DESCRIPTOR)
    assert time.perf_counter() - t0 < 2.0  # quadratic: minutes at 1 MiB


def test_largest_field_names_the_big_one_without_parsing():
    msg = pb.GenerateRequest(prompt="x" * 5000)
    msg.stopping.stop_sequences.extend(["a", "b"])
    assert largest_field(msg.SerializeToString(), pb.GenerateRequest.DESCRIPTOR) == "prompt"
    assert largest_field(b"", pb.GenerateRequest.DESCRIPTOR) == "request"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerThread]:
    model = write_model(tmp_path_factory.mktemp("hostile") / "tiny",
                        ModelConfig.from_dict(tiny_config()), 0)
    with ServerThread(Engine(model, EngineConfig(device="cpu"))) as s:  # 1 MiB limit
        yield s


class HealthProbe:
    """Health checks every 10 ms on their own channel; the slowest answer."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = health_pb2_grpc.HealthStub(self.channel)
        self.worst = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            out = self.stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert out.status == health_pb2.HealthCheckResponse.SERVING
            self.worst = max(self.worst, time.perf_counter() - t0)
            time.sleep(0.01)

    def __enter__(self) -> HealthProbe:
        self.stub.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connected
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=15)
        self.channel.close()


BODIES = {
    "0xff": lambda n: b"\xff" * n,
    "0x80": lambda n: b"\x80" * n,
    "random": os.urandom,
    "bad utf-8 prompt": lambda n: pb.GenerateRequest(prompt="a" * (n - 8)).SerializeToString()
    .replace(b"a", b"\xff"),
}


@pytest.mark.parametrize("compression", [None, grpc.Compression.Gzip], ids=["plain", "gzip"])
@pytest.mark.parametrize("kind", list(BODIES))
@pytest.mark.parametrize("size", [MIB - 16, MIB + 16, 3 * MIB])
def test_hostile_bodies_get_a_status_and_health_keeps_answering(server, kind, size,
                                                                compression):
    body = BODIES[kind](size)
    with grpc.insecure_channel(server.address, options=[
            ("grpc.max_send_message_length", 8 * MIB)]) as ch, HealthProbe(server.address) as hp:
        call = ch.unary_unary(GENERATE, response_deserializer=pb.GenerateResponse.FromString)
        t0 = time.perf_counter()
        with pytest.raises(grpc.RpcError) as err:
            call(body, timeout=30, compression=compression)
        took = time.perf_counter() - t0
    code = err.value.code()
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, err.value.details())
    if size > MIB:
        assert "max_request_bytes" in err.value.details()
    elif kind == "bad utf-8 prompt":
        assert err.value.details() == "prompt: not valid UTF-8"
    assert took < 10, took
    assert hp.worst < 1.0, f"health took {hp.worst:.2f} s during the call"


def _gauges(s: ServerThread) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{s.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {x.name: x.value for f in text_string_to_metric_families(text) for x in f.samples
            if x.name in ("ecserve_requests_running", "ecserve_requests_waiting",
                          "ecserve_kv_cache_blocks_used")}


def test_cancelled_streams_leave_honest_gauges_when_idle(server):
    """A client that cancels mid-stream and then goes quiet: no step follows, yet the gauges
    say nothing runs and no KV block is held (they used to keep running=1 until the next
    request)."""
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        for _ in range(3):
            stream = stub.GenerateStream(build_request("cancel me", max_new_tokens=200,
                                                       ignore_eos=True), timeout=60)
            next(stream)
            stream.cancel()
    deadline = time.monotonic() + 5
    while (g := _gauges(server)) != {"ecserve_requests_running": 0.0,
                                     "ecserve_requests_waiting": 0.0,
                                     "ecserve_kv_cache_blocks_used": 0.0}:
        assert time.monotonic() < deadline, g
        time.sleep(0.05)


def test_cancelled_calls_do_not_count_against_the_queue(tmp_path):
    """max_waiting=1: a call cancelled while queued frees its place at once, whether the engine
    thread has taken it yet or not, so the client's retry is accepted, not
    RESOURCE_EXHAUSTED (the worker is driven by hand here, to hold each state still)."""
    import asyncio

    from ecserve.server.async_engine import AsyncEngine, _Inbox
    from ecserve.types import Request, SamplingParams

    model = write_model(tmp_path / "m", ModelConfig.from_dict(tiny_config()), 0)
    ae = AsyncEngine(Engine(model, EngineConfig(device="cpu", max_waiting=1)))
    ae._loop = asyncio.new_event_loop()

    def req(rid: str) -> Request:
        return Request(rid, (1, 2, 3), SamplingParams(max_new_tokens=2))

    ae.submit(req("a"))
    ae.cancel("a")  # still in the inbox
    ae.submit(req("b"))
    inbox, ae._inbox = ae._inbox, _Inbox()
    ae._apply(inbox)  # the worker takes b: waiting in the engine
    assert list(ae.engine.seqs) == ["b"]
    ae.cancel("b")  # handed over: the abort waits for the worker
    ae.submit(req("c"))
    inbox, ae._inbox = ae._inbox, _Inbox()
    ae._apply(inbox)
    assert list(ae.engine.seqs) == ["c"]
    ae._loop.close()


IDLE = {"ecserve_requests_running": 0.0, "ecserve_requests_waiting": 0.0,
        "ecserve_kv_cache_blocks_used": 0.0}


def _wait_idle(s: ServerThread, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (g := _gauges(s)) != IDLE:
        assert time.monotonic() < deadline, g
        time.sleep(0.05)


def test_a_cancel_storm_leaves_nothing_behind(server):
    """Four clients start 60 streams between them and cancel each at a random point (before
    the first token, mid-stream, or never: the deadline ends it); then the server is idle,
    holds no block, and still generates."""
    import random

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            for i in range(15):
                call = stub.GenerateStream(build_request(f"storm {seed} {i}", max_new_tokens=100,
                                                         ignore_eos=True),
                                           timeout=rng.choice([0.05, 0.3, 30]))
                try:
                    for _ in range(rng.randrange(0, 20)):
                        next(call)
                except (grpc.RpcError, StopIteration):
                    pass
                call.cancel()

    threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    _wait_idle(server)
    with server.client(timeout=60) as c:
        assert c.generate("after the storm", max_new_tokens=4).generated_token_count == 4


def test_a_client_that_never_reads(server):
    """A stream nobody reads fills gRPC's flow-control window; when the client goes away the
    request ends and its blocks are freed."""
    ch = grpc.insecure_channel(server.address)
    stub = pb_grpc.GenerationServiceStub(ch)
    call = stub.GenerateStream(build_request("never read", max_new_tokens=200, ignore_eos=True),
                               timeout=60)
    time.sleep(1.0)  # generating into a window nobody drains
    call.cancel()
    ch.close()
    _wait_idle(server)
