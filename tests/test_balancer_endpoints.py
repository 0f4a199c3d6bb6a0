"""What load balancers and orchestrators need from a replica: HTTP /healthz and /readyz on the
metrics port (from the moment it binds), the drain delay, and the maximum connection age."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from serving import ServerThread, health, wait_for
from test_server_lifecycle import LoadingServer

from ecserve.config import EngineConfig
from ecserve.engine.engine import Engine


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def model_dir(make_model):
    return make_model()


def test_healthz_and_readyz_from_bind_to_drain(model_dir):
    release = threading.Event()

    def load() -> Engine:
        release.wait(30)
        return Engine(model_dir, EngineConfig(device="cpu"))

    s = LoadingServer(load, drain_delay=1.5)
    try:
        s.begin()
        port = s.server.metrics_port
        assert get(port, "/healthz") == (200, "alive\n")
        assert get(port, "/readyz") == (503, "loading the model\n")
        assert get(port, "/metrics")[0] == 503
        release.set()
        s.started.result(timeout=60)
        assert get(port, "/readyz") == (200, "ready\n")
        code, text = get(port, "/metrics")
        assert code == 200 and "ecserve_requests_running" in text
        assert get(port, "/nothing")[0] == 404

        t0 = time.monotonic()
        drained = s.drain(grace=5)
        wait_for(lambda: health(s.address) == "NOT_SERVING", 5, "NOT_SERVING")
        # The drain delay: not ready, yet a call that still comes (the balancer has not seen
        # the change) is served, not refused.
        assert get(port, "/readyz") == (503, "draining\n")
        with s.client(timeout=10) as c:
            assert c.generate("late", max_new_tokens=2).generated_token_count == 2
        assert time.monotonic() - t0 < 1.5
        drained.result(timeout=30)
        assert time.monotonic() - t0 >= 1.5
    finally:
        release.set()
        s.__exit__(None, None, None)


def test_max_connection_age_sends_goaway_and_its_grace_bounds_old_calls(model_dir):
    engine = Engine(model_dir, EngineConfig(device="cpu"))
    s = ServerThread(engine, max_connection_age=0.5, max_connection_age_grace=0.5)
    s.steps.delay = 0.02  # 100 tokens: 2 s, past the connection's age of 0.5 s
    with s, s.client(timeout=30) as c:
        with pytest.raises(grpc.RpcError) as cut:
            list(c.stream("long", max_new_tokens=100, ignore_eos=True))
        assert cut.value.code() is grpc.StatusCode.UNAVAILABLE
        # The channel reconnects by itself: later calls work.
        assert c.generate("again", max_new_tokens=2).generated_token_count == 2
    # A grace longer than the call: it completes on its old connection.
    s = ServerThread(engine, max_connection_age=0.5, max_connection_age_grace=30)
    s.steps.delay = 0.02
    with s, s.client(timeout=30) as c:
        out = list(c.stream("long", max_new_tokens=100, ignore_eos=True))
        assert out[-1].generated_token_count == 100
