"""The server's life: NOT_SERVING while the model loads, SERVING once it is warm, NOT_SERVING and
refusing new calls while it drains, live streams finishing (or cancelled with a final message
when the grace period runs out), and a clean exit on SIGTERM; `ecserve health` on top."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving import (
    BackgroundStream,
    ServerThread,
    health,
    idle,
    serve_args,
    serve_process,
    wait_for,
)

from ecserve.client import Client, build_request
from ecserve.config import EngineConfig
from ecserve.engine.engine import Engine
from ecserve.parallel.group import free_port
from ecserve.v1 import generation_pb2 as pb
from ecserve.v1 import generation_pb2_grpc as pb_grpc

SERVICE = "ecserve.v1.GenerationService"


# ---------------------------------------------------------------- helpers


def refused(fn: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value


def assert_refused_every_call(stub: pb_grpc.GenerationServiceStub, words: str) -> None:
    """Every GenerationService method answers UNAVAILABLE with a message containing `words`."""
    calls = [
        lambda: stub.Generate(build_request("new", max_new_tokens=2), timeout=10),
        lambda: list(stub.GenerateStream(build_request("new", max_new_tokens=2), timeout=10)),
        lambda: stub.Tokenize(pb.TokenizeRequest(text="new"), timeout=10),
        lambda: stub.ModelInfo(pb.ModelInfoRequest(), timeout=10),
    ]
    for fn in calls:
        err = refused(fn)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
        assert words in err.details(), err.details()


@pytest.fixture
def model_dir(make_model):
    return make_model()


# ---------------------------------------------------------------- loading


class LoadingServer(ServerThread):
    """ServerThread whose start is not waited for, so a test can look at it while it loads."""

    def begin(self) -> None:
        self._thread.start()
        self.server = self.call(self._make())
        self.started = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop)
        wait_for(lambda: self.server.port != 0, 10, "the server to bind")
        self.port = self.server.port


def test_not_serving_while_the_model_loads_then_serving(model_dir):
    loading, release = threading.Event(), threading.Event()

    def load() -> Engine:
        loading.set()
        if not release.wait(30):
            raise TimeoutError("the test never released the loader")
        return Engine(model_dir, EngineConfig(device="cpu"))

    s = LoadingServer(load)
    try:
        s.begin()
        assert loading.wait(10)
        wait_for(lambda: health(s.address) != "UNAVAILABLE", 10, "the health service")
        with s.client(timeout=10) as c:
            watch = health_pb2_grpc.HealthStub(c.channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert health(s.address) == health(s.address, SERVICE) == "NOT_SERVING"
            cli = subprocess.run(
                [sys.executable, "-m", "ecserve", "health", "--address", s.address,
                 "--timeout", "2"], capture_output=True, text=True, timeout=30)
            assert (cli.returncode, cli.stdout.strip()) == (1, "NOT_SERVING"), cli.stderr
            assert_refused_every_call(pb_grpc.GenerationServiceStub(c.channel), "loading")
            assert not s.started.done()

            release.set()
            assert s.started.result(timeout=60) == s.port
            # The watcher sees the switch without asking again.
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
            assert health(s.address) == health(s.address, SERVICE) == "SERVING"
            out = c.generate("loaded", max_new_tokens=3, ignore_eos=True)
            assert out.stop_reason == pb.STOP_REASON_MAX_TOKENS
    finally:
        release.set()
        s.__exit__(None, None, None)


# ---------------------------------------------------------------- drain


@pytest.fixture
def server(model_dir) -> Iterator[ServerThread]:
    with ServerThread(Engine(model_dir, EngineConfig(device="cpu"))) as s:
        yield s


def test_drain_refuses_new_calls_and_lets_live_streams_finish(server):
    s = server
    s.steps.hold()  # each step waits for allow() or open()
    with s.client(timeout=30) as c:
        stub = pb_grpc.GenerationServiceStub(c.channel)
        try:
            s.steps.allow(1)  # the prefill step, which samples the first token
            stream = stub.GenerateStream(
                build_request("drain me", max_new_tokens=20, ignore_eos=True, token_ids=True),
                timeout=30)
            messages = [next(stream)]
            assert messages[0].generated_token_count == 1
            grace = 10.0
            t0 = time.monotonic()
            drained = s.drain(grace)

            wait_for(lambda: health(s.address) == "NOT_SERVING", 5, "NOT_SERVING")
            assert health(s.address, SERVICE) == "NOT_SERVING"
            assert_refused_every_call(stub, "draining")
            # the live stream is still there, waiting for its next step
            assert s.server.engine.num_live == 1 and not drained.done()

            s.steps.open()
            messages += list(stream)
            drained.result(timeout=grace)
        finally:
            s.steps.open()
    assert time.monotonic() - t0 < grace
    last = messages[-1]
    assert last.stop_reason == pb.STOP_REASON_MAX_TOKENS
    assert last.generated_token_count == 20
    assert sum(len(m.tokens) for m in messages) == 20
    assert all(m.stop_reason == pb.STOP_REASON_NOT_FINISHED for m in messages[:-1])
    assert idle(s)
    assert health(s.address) == "UNAVAILABLE"  # stopped: nothing listens any more


def test_drain_past_the_grace_period_cancels_with_a_final_message(server, monkeypatch):
    s = server
    monkeypatch.setattr(s.steps, "delay", 0.02)  # 200 tokens take >= 4 s
    with s.client(timeout=30) as c:
        stream = c.stream("never finishes in time", max_new_tokens=200, ignore_eos=True,
                          token_ids=True)
        messages = [next(stream)]
        grace = 0.5
        t0 = time.monotonic()
        drained = s.drain(grace)
        messages += list(stream)  # ends normally: a final message, not an error
        drained.result(timeout=10)
        took = time.monotonic() - t0
    last = messages[-1]
    assert last.stop_reason == pb.STOP_REASON_CANCELLED
    assert 1 <= last.generated_token_count < 200
    assert sum(len(m.tokens) for m in messages) == last.generated_token_count
    assert all(m.stop_reason == pb.STOP_REASON_NOT_FINISHED for m in messages[:-1])
    assert grace <= took < grace + 3
    assert idle(s)


# ---------------------------------------------------------------- the real process


def test_sigterm_drains_the_server_process(make_model, tmp_path):
    # 12 layers: 200 tokens take a couple of seconds on a CPU, ages to look at the drain in
    model = make_model(num_layers=12)
    port = free_port()
    address = f"127.0.0.1:{port}"
    grace = 20
    log_path = tmp_path / "serve.log"
    proc = serve_process(log_path, "--model", str(model), "--host", "127.0.0.1", "--port",
                         str(port), "--metrics-port", "0", "--device", "cpu", "--grace-period",
                         str(grace))

    def log_text() -> str:
        return log_path.read_text()

    try:
        end = time.monotonic() + 60
        while health(address) != "SERVING":
            assert proc.poll() is None, f"server exited {proc.returncode}:\n{log_text()}"
            assert time.monotonic() < end, f"server never reported SERVING:\n{log_text()}"
            time.sleep(0.1)

        messages: list[pb.GenerateResponse] = []
        first, done = threading.Event(), threading.Event()
        errors: list[BaseException] = []

        def read() -> None:
            try:
                with Client(address, timeout=60) as c:
                    for m in c.stream("sigterm", max_new_tokens=200, ignore_eos=True,
                                      token_ids=True):
                        messages.append(m)
                        first.set()
            except BaseException as e:
                errors.append(e)
            finally:
                first.set()
                done.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert first.wait(30) and not errors, errors
        assert not done.is_set(), "the stream finished before the test could look at it"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)

        wait_for(lambda: health(address) == "NOT_SERVING", 5, f"NOT_SERVING:\n{log_text()}")
        with Client(address, timeout=10) as c:
            assert_refused_every_call(pb_grpc.GenerationServiceStub(c.channel), "draining")
        assert not done.is_set(), "the stream was over before the drain could be seen"
        assert proc.poll() is None, "the server exited with a stream still live"

        reader.join(timeout=grace)
        assert not reader.is_alive() and not errors, errors
        assert proc.wait(timeout=grace) == 0, log_text()
        assert time.monotonic() - t0 < grace
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    last = messages[-1]
    assert last.stop_reason == pb.STOP_REASON_MAX_TOKENS, log_text()
    assert last.generated_token_count == 200
    assert sum(len(m.tokens) for m in messages) == 200
    assert health(address) == "UNAVAILABLE"  # the port is closed


# ---------------------------------------------------------------- `ecserve health`


def health_cli(address: str, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "ecserve", "health", "--address", address, "--timeout", "2",
         *extra], capture_output=True, text=True, timeout=30)
    return out, time.monotonic() - t0


def test_health_cli_against_a_serving_server(server):
    for extra in ((), ("--service", SERVICE)):
        out, _ = health_cli(server.address, *extra)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "SERVING"
    out, _ = health_cli(server.address, "--service", "no.such.Service")
    assert out.returncode == 1 and "NOT_FOUND" in out.stderr, (out.stdout, out.stderr)


def test_health_cli_with_nothing_listening():
    out, took = health_cli(f"127.0.0.1:{free_port()}")
    assert out.returncode != 0
    assert out.stderr.startswith("ecserve: error: UNAVAILABLE"), out.stderr
    assert "Traceback" not in out.stderr
    assert took < 10


def _serve_process(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "ecserve",
                           *serve_args("--no-warmup", "--http-port", "0", *args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _one_clean_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("ecserve: error:")]
    assert len(errors) == 1, res.stderr
    for bad in ("Traceback", "Event loop is closed", "serving model"):
        assert bad not in res.stderr, res.stderr
    return errors[0]


def test_a_model_that_fails_to_load_is_one_line_and_exit_2(tmp_path):
    line = _one_clean_error(_serve_process("--model", str(tmp_path / "missing"), "--port", "0",
                                           "--no-metrics"))
    assert f"{tmp_path / 'missing' / 'config.json'}: no such file" in line


def test_a_port_in_use_is_refused_at_start_naming_it(make_model):
    """Another server on the port (one that allows sharing, as gRPC's default did): refused
    unless --reuse-port; the metrics port too, before the model loads."""
    import socket

    model = make_model()
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        line = _one_clean_error(_serve_process("--model", str(model), "--port", str(port),
                                               "--no-metrics"))
        assert f"cannot listen on 127.0.0.1:{port}" in line and "--reuse-port" in line
        line = _one_clean_error(_serve_process("--model", str(model), "--port", "0",
                                               "--metrics-port", str(port)))
        assert f"cannot serve metrics on 127.0.0.1:{port}" in line


def test_a_second_signal_ends_the_drain_at_once(make_model, tmp_path):
    """Ctrl-C twice, as with other servers: the drain stops waiting, live streams get their
    final CANCELLED message, and the process exits 0 long before the grace period."""
    model = make_model(num_layers=12, max_position_embeddings=4096)
    port = free_port()
    address = f"127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    proc = serve_process(log_path, "--model", str(model), "--port", str(port), "--no-metrics",
                         "--device", "cpu", "--grace-period", "120")
    try:
        wait_for(lambda: health(address) == "SERVING", 60, "SERVING")
        stream = BackgroundStream(address, "twice", 4000)
        assert stream.first.wait(30)
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: health(address) == "NOT_SERVING", 5, "NOT_SERVING")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0, log_path.read_text()
        assert time.monotonic() - t0 < 10
        stream.thread.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert stream.messages[-1].stop_reason == pb.STOP_REASON_CANCELLED
    assert "second signal: ending the drain now" in log_path.read_text()
