"""Test harness: a real ecserve gRPC server on 127.0.0.1:0, in a thread with its own loop."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc

from ecserve.client import Client
from ecserve.config import ServerConfig
from ecserve.engine.engine import Engine
from ecserve.server.app import Server
from ecserve.server.core_transport import CoreTransport


class ServerThread:
    """Start with `with ServerThread(engine) as s:`; `s.client()` talks to it over gRPC,
    `s.http_url` over HTTP. A ProcessTransport serves from an engine-core process; an Engine
    (or a loader) from the core loop on a thread of this one."""

    def __init__(self, engine: Engine | Callable[[], Engine] | CoreTransport,
                 **server_cfg: Any) -> None:
        self.engine = engine if isinstance(engine, Engine) else None
        self._core = engine
        self.cfg = ServerConfig(**{"host": "127.0.0.1", "port": 0, "metrics_port": 0,
                                   "http_port": 0, **server_cfg})
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: Server | None = None
        self.started: Future[int] | None = None

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self.server = self.call(self._make())
        self.started = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop)
        self.port = self.started.result(timeout=120)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None and not self.server.servicer.draining:
            self.drain(grace=5.0).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    async def _make(self) -> Server:
        return Server(self._core, self.cfg)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        """The OpenAI-compatible API's base URL (…/v1 is the openai client's base_url)."""
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.http_port}"

    def client(self, timeout: float | None = 60) -> Client:
        return Client(self.address, timeout=timeout)

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        """Run `coro` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    def drain(self, grace: float) -> Future[None]:
        assert self.server is not None
        return asyncio.run_coroutine_threadsafe(self.server.drain(grace), self.loop)

    def wait_until(self, condition: Callable[[], bool], timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > end:
                raise TimeoutError("condition not met in time")
            time.sleep(0.01)


def health(address: str, service: str = "") -> str:
    """The reported status, or the gRPC status code's name when the call itself fails."""
    with Client(address, timeout=2) as c:
        try:
            return c.health(service)
        except grpc.RpcError as e:
            return e.code().name


def serve_process(log_path: Path, *args: str, new_session: bool = False,
                  environ: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`python -m ecserve serve ARGS` in the background, its unbuffered output in log_path;
    new_session: in a process group of its own (to signal the whole group); environ: its
    environment (default: this process's)."""
    if not {"--http-port", "--no-http"} & set(args):  # never the fixed default port in tests
        args = (*args, "--http-port", "0")
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "ecserve", "serve", *args], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=new_session,
                                env={**(os.environ if environ is None else environ),
                                     "PYTHONUNBUFFERED": "1"})


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class BackgroundStream:
    """One generation streamed by a daemon thread; `messages` fills as tokens arrive."""

    def __init__(self, address: str, prompt: str, max_new_tokens: int) -> None:
        self.messages: list[Any] = []
        self.first = threading.Event()

        def read() -> None:
            with Client(address, timeout=120) as c:
                for m in c.stream(prompt, max_new_tokens=max_new_tokens, ignore_eos=True):
                    self.messages.append(m)
                    self.first.set()

        self.thread = threading.Thread(target=read, daemon=True)
        self.thread.start()
