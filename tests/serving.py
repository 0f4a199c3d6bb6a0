"""Test harness: a real ecserve gRPC server on 127.0.0.1:0, in a thread with its own loop, and
`ecserve serve` in a process of its own; either on the engine-core placement the tests ask for.

ECSERVE_TEST_ENGINE_CORE (read here only) picks where the engine core of these servers runs:
unset or empty, as each test wrote it (ServerThread steps an Engine on a thread of this process,
`ecserve serve` in a process of its own); `thread` or `process`, every server started through
this module there: a ServerThread handed an Engine (or a loader) serves the same model and
EngineConfig from an engine-core process (`process`), and `ecserve serve` gets `--engine-core`
with the value. A transport handed to ServerThread, or an `--engine-core` already given, is
kept: such tests are about one placement. .ci/run runs the server suites once more on the
placement each does not default to.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
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
import pytest

from ecserve.client import Client
from ecserve.config import EngineConfig, ServerConfig
from ecserve.engine.core import CoreSpec
from ecserve.engine.core_protocol import CoreInput
from ecserve.engine.engine import Engine
from ecserve.model.default import default_model_dir
from ecserve.server.app import Server
from ecserve.server.core_process import ProcessTransport
from ecserve.server.core_transport import (
    CoreTransport,
    Deliver,
    Ended,
    Started,
    ThreadTransport,
    in_daemon_thread,
)

ENGINE_CORE = os.environ.get("ECSERVE_TEST_ENGINE_CORE", "")
if ENGINE_CORE not in ("", "thread", "process"):
    raise ValueError(f"ECSERVE_TEST_ENGINE_CORE={ENGINE_CORE!r}: use thread, process or nothing")
# One torch thread in the core process: the test process (its front end) needs the other core.
CORE_SPEC = CoreSpec(torch_threads=1)


def serve_args(*args: str) -> list[str]:
    """`serve ARGS` for `ecserve` (or `python -m ecserve`), on the placement
    ECSERVE_TEST_ENGINE_CORE names unless ARGS name one."""
    if ENGINE_CORE and "--engine-core" not in args:
        args = (*args, "--engine-core", ENGINE_CORE)
    return ["serve", *args]


class StepControl:
    """Hooks around each model step (Runner.execute) of the engine a ServerThread serves: a
    delay, a gate, one injected failure. Built of multiprocessing primitives (spawn's, as the
    engine-core process is spawned), they reach an engine in that process as on a thread."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._delay = ctx.Value("d", 0.0)
        self._held = ctx.Value("i", 0)  # steps waiting at the gate now
        self._open = ctx.Event()
        self._open.set()
        self._permits = ctx.Semaphore(0)
        self._fail = ctx.Event()

    @property
    def delay(self) -> float:
        """Seconds each step sleeps first (set with monkeypatch.setattr to undo it)."""
        return self._delay.value

    @delay.setter
    def delay(self, seconds: float) -> None:
        self._delay.value = seconds

    @property
    def held(self) -> int:
        """Steps waiting at the gate now: a request admitted while steps are held has one."""
        return self._held.value

    def hold(self) -> None:
        """From now on each step waits until allow() or open() lets it run (30 s at most)."""
        self._open.clear()

    def allow(self, n: int = 1) -> None:
        for _ in range(n):
            self._permits.release()

    def open(self) -> None:
        self._open.set()

    def fail_next(self) -> None:
        """The next step raises RuntimeError("simulated device error")."""
        self._fail.set()

    def wrap(self, execute: Callable[..., Any]) -> Callable[..., Any]:
        def controlled(*args: Any) -> Any:
            if (delay := self._delay.value) > 0:
                time.sleep(delay)
            if not self._open.is_set():
                with self._held.get_lock():
                    self._held.value += 1
                try:
                    end = time.monotonic() + 30
                    while not self._open.is_set() and not self._permits.acquire(timeout=0.01):
                        if time.monotonic() > end:
                            raise TimeoutError("the test never let this step run")
                finally:
                    with self._held.get_lock():
                        self._held.value -= 1
            if self._fail.is_set():
                self._fail.clear()
                raise RuntimeError("simulated device error")
            return execute(*args)

        return controlled


def load_controlled(model: str | None, cfg: EngineConfig, steps: StepControl
                    ) -> tuple[Engine, None]:
    """The engine-core process's loader (module level: spawn pickles it): the engine with
    `steps` around its model step."""
    engine = Engine(model, cfg)
    engine.runner.execute = steps.wrap(engine.runner.execute)  # type: ignore[method-assign]
    return engine, None


def core_process_like(engine: Engine, steps: StepControl) -> ProcessTransport:
    """An engine-core process loading what `engine` was loaded from, as `engine` was."""
    model = (None if engine.model_name == "default" and engine.model_dir == default_model_dir()
             else str(engine.model_dir))  # the default model is served by the name "default"
    return ProcessTransport(functools.partial(load_controlled, model, engine.cfg, steps),
                            CORE_SPEC, model)


class LoaderThenProcess(ProcessTransport):
    """The process placement of a loader: the test's loader runs first (tests hold the server
    in its loading state with it), then an engine-core process loads the model of the engine
    it returned. A ProcessTransport only for Server, which would run any other callable on a
    thread: everything goes to the ProcessTransport that start() makes."""

    def __init__(self, load: Callable[[], Engine], steps: StepControl) -> None:
        self._load, self._steps = load, steps
        self._core: ProcessTransport | None = None

    @property
    def core_pid(self) -> int | None:
        return self._core.core_pid if self._core is not None else None

    async def start(self, deliver: Deliver, ended: Ended) -> Started:
        self._core = core_process_like(await in_daemon_thread(self._load), self._steps)
        return await self._core.start(deliver, ended)

    def send(self, frame: CoreInput) -> None:
        assert self._core is not None
        self._core.send(frame)

    async def stop(self) -> None:
        if self._core is not None:
            await self._core.stop()


class ServerThread:
    """Start with `with ServerThread(engine) as s:`; `s.client()` talks to it over gRPC,
    `s.http_url` over HTTP. A transport is served as given (ProcessTransport: from an
    engine-core process); an Engine (or a loader) from the core loop on a thread of this
    process, or from an engine-core process loading the same model and EngineConfig when
    ECSERVE_TEST_ENGINE_CORE=process. `s.steps` controls the model steps of the latter two."""

    def __init__(self, engine: Engine | Callable[[], Engine] | CoreTransport,
                 **server_cfg: Any) -> None:
        self._patch = pytest.MonkeyPatch()  # the step hooks on an engine of this process
        self._steps: StepControl | None = None
        self.engine: Engine | None = None  # the engine stepped in this process, if any
        self._core: Engine | Callable[[], Engine] | CoreTransport = engine
        if not isinstance(engine, (ProcessTransport, ThreadTransport)):
            self._steps = steps = StepControl()
            if ENGINE_CORE == "process":
                self._core = (core_process_like(engine, steps) if isinstance(engine, Engine)
                              else LoaderThenProcess(engine, steps))
            elif isinstance(engine, Engine):
                self.engine = self._controlled(engine)
            else:
                self._core = lambda: self._controlled(engine())
        self.cfg = ServerConfig(**{"host": "127.0.0.1", "port": 0, "metrics_port": 0,
                                   "http_port": 0, **server_cfg})
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: Server | None = None
        self.started: Future[int] | None = None

    def _controlled(self, engine: Engine) -> Engine:
        self._patch.setattr(engine.runner, "execute", self.steps.wrap(engine.runner.execute))
        return engine

    @property
    def steps(self) -> StepControl:
        if self._steps is None:
            raise RuntimeError("step hooks need a ServerThread given an Engine or a loader")
        return self._steps

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
        self._patch.undo()  # the engine may serve again (a module's engine, a second server)

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


def gauge(s: ServerThread, name: str) -> float:
    """One sample of the server's metrics: the engine's figures come with each step and each
    finished request, on either placement."""
    assert s.server is not None and s.server.metrics is not None
    value = s.server.metrics.registry.get_sample_value(name)
    assert value is not None, name
    return value


def idle(s: ServerThread) -> bool:
    """Nothing live in the front end; nothing running, waiting or holding a KV block in the
    engine, as the metrics say (either placement)."""
    assert s.server is not None and s.server.engine is not None
    return s.server.engine.num_live == 0 and all(gauge(s, name) == 0 for name in (
        "ecserve_requests_running", "ecserve_requests_waiting", "ecserve_kv_cache_blocks_used"))


def health(address: str, service: str = "") -> str:
    """The reported status, or the gRPC status code's name when the call itself fails."""
    with Client(address, timeout=2) as c:
        try:
            return c.health(service)
        except grpc.RpcError as e:
            return e.code().name


def serve_process(log_path: Path, *args: str, new_session: bool = False,
                  environ: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`python -m ecserve serve ARGS` (serve_args: on the placement asked for) in the
    background, its unbuffered output in log_path; new_session: in a process group of its own
    (to signal the whole group); environ: its environment (default: this process's)."""
    if not {"--http-port", "--no-http"} & set(args):  # never the fixed default port in tests
        args = (*args, "--http-port", "0")
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "ecserve", *serve_args(*args)],
                                stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=new_session,
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
