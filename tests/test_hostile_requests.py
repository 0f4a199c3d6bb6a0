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
from ecserve.types import FinishReason
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
    """max_waiting=1: a call cancelled while queued frees its place at once, whether the core
    has been sent it yet or not, so the client's retry is accepted, not RESOURCE_EXHAUSTED
    (the front end over a transport that only records, to hold each state still)."""
    import asyncio
    from pathlib import Path

    from ecserve.engine.core import core_ready
    from ecserve.engine.core_protocol import CoreInput
    from ecserve.server.core_transport import Started
    from ecserve.server.front_end import FrontEnd
    from ecserve.types import Request, SamplingParams

    model = write_model(tmp_path / "m", ModelConfig.from_dict(tiny_config()), 0)
    engine = Engine(model, EngineConfig(device="cpu", max_waiting=1))
    frames: list[CoreInput] = []

    class Recorder:
        core_pid = None

        async def start(self, deliver, ended) -> Started:
            return Started(core_ready(engine), engine.tokenizer, Path(model))

        def send(self, frame: CoreInput) -> None:
            frames.append(frame)

        async def stop(self) -> None:
            pass

    def req(rid: str) -> Request:
        return Request(rid, (1, 2, 3), SamplingParams(max_new_tokens=2))

    async def main() -> None:
        front = FrontEnd(Recorder())  # type: ignore[arg-type]
        await front.start()
        front.submit(req("a"))
        front.cancel("a")  # not sent yet: gone before it leaves
        front.submit(req("b"))
        await asyncio.sleep(0)  # the loop's turn ends: b goes out, not admitted yet
        front.cancel("b")  # sent: an abort follows, and its place is free now
        front.submit(req("c"))
        await asyncio.sleep(0)

    asyncio.run(main())
    assert [[r.request_id for r in f.requests] for f in frames] == [["b"], ["c"]]
    assert [f.aborts for f in frames] == [[], [("b", FinishReason.ABORTED)]]


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


# ---------------------------------------------------------------------- the HTTP API


def _http(s: ServerThread, body: bytes, headers: dict[str, str] | None = None,
          path: str = "/v1/completions") -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", s.server.http_port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json",
                                                       **(headers or {})})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


HTTP_BODIES = {
    "malformed JSON": (b'{"prompt": "a", ', 400),
    "not an object": (b'"just a string"', 400),
    "wrong types": (b'{"prompt": {"a": 1}, "max_tokens": "many"}', 400),
    "nested garbage": (b"[" * 100_000, 400),
    "invalid UTF-8": (b'{"prompt": "\xff\xfe"}', 400),
    "10,000 stop strings": (('{"prompt": "a", "stop": [' + ",".join(['"x"'] * 10_000)
                             + "]}").encode(), 400),
    "a huge stop string": (('{"prompt": "a", "stop": "' + "x" * 100_000 + '"}').encode(), 400),
    "a body over the limit": (b'{"prompt": "' + b"a" * (2 * MIB) + b'"}', 413),
    "a huge prompt within the limit": (b'{"prompt": "' + b"a " * 400_000 + b'"}', 400),
}


@pytest.mark.parametrize("kind", list(HTTP_BODIES))
def test_hostile_http_bodies_get_a_status_and_health_keeps_answering(server, kind):
    import json

    body, status = HTTP_BODIES[kind]
    with HealthProbe(server.address) as hp:
        t0 = time.perf_counter()
        got, out = _http(server, body)
        took = time.perf_counter() - t0
    assert got == status, out[:300]
    error = json.loads(out)["error"]
    assert error["code"] == status and error["message"]
    assert took < 10, took
    assert hp.worst < 1.0, f"health took {hp.worst:.2f} s during the call"


def test_a_chunked_body_over_the_limit_is_cut_off(server):
    """No Content-Length to refuse up front: the body is read up to the limit, then 413."""
    import socket

    with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n")
        piece = b"a" * 65536
        try:
            for _ in range(40):  # 2.5 MiB, past the 1 MiB limit
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        except OSError:
            pass  # the server answered and closed while we were still sending
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_a_slow_http_reader_and_a_flood_of_disconnects_leave_nothing_behind(server):
    """One stream nobody reads (the socket's buffers fill), then 40 streams whose clients hang
    up at random points: the server ends each, frees its blocks, and still generates."""
    import random
    import socket

    def start(prompt: str, max_tokens: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", server.server.http_port), timeout=30)
        body = (f'{{"prompt": "{prompt}", "max_tokens": {max_tokens}, "ignore_eos": true, '
                '"stream": true}').encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        return sock

    slow = start("never read", 300)
    time.sleep(1.0)
    slow.close()
    rng = random.Random(0)
    for i in range(40):
        sock = start(f"flood {i}", 100)
        if rng.random() < 0.5:
            sock.recv(rng.choice([1, 200, 2000]))
        sock.close()
    _wait_idle(server)
    assert server.server.engine.num_live == 0
    status, out = _http(server, b'{"prompt": "after the flood", "max_tokens": 4}')
    assert status == 200 and b'"completion_tokens":4' in out
