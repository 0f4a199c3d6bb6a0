"""The transport to an engine core in its own process (ecserve/engine/core.py), over ZMQ.

The core process runs the batcher, the model and the sampler in a busy loop, so neither it
nor the server's front end waits for the other's GIL. Everything the event loop hands over
between two of its iterations goes out as one CoreInput frame; each engine step comes back as
one CoreOutput frame, read by one task on the event loop.

The core's death is seen at once (a thread waits on the process): the front end ends live
requests with an error naming it, and the server reports NOT_SERVING and exits non-zero.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import zmq
import zmq.asyncio

from ecserve.config import ConfigError
from ecserve.engine.core import CORE_IGNORES, CoreSpec, EngineLoader, run_core
from ecserve.engine.core_protocol import Codec, CoreInput, CoreReady
from ecserve.model.checkpoint import CheckpointError
from ecserve.model.default import default_model_dir
from ecserve.server.core_transport import Deliver, Ended, EngineCoreDied, Started
from ecserve.tokenizer import load_tokenizer

log = logging.getLogger("ecserve.server")
STOP_TIMEOUT_S = 30.0  # after the stop frame, the core's exit is awaited this long, then killed
# A model that fails to load is raised again as its own kind where the front end knows it, as a
# ConfigError for other bad input (the command prints one line), else as a RuntimeError (a bug).
_ERRORS: dict[str, type[Exception]] = {c.__name__: c for c in (
    CheckpointError, ConfigError, OSError, FileNotFoundError, PermissionError,
    IsADirectoryError, NotADirectoryError)}


# Cores still running when the interpreter exits (a caller that never called stop()): killed,
# since the core ignores SIGTERM and multiprocessing's own exit hook would wait for it forever.
_STARTED: weakref.WeakSet[multiprocessing.process.BaseProcess] = weakref.WeakSet()


@atexit.register
def _kill_orphans() -> None:
    for proc in list(_STARTED):
        if proc.exitcode is None:
            proc.kill()


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ with `env` set, for children started inside."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _children_ignore(signals: set[signal.Signals]) -> Iterator[None]:
    """Children started inside inherit `signals` ignored. Ctrl-C and `kill` of the process
    group reach the engine core too: it ignores them once it runs (run_core), but a child still
    starting Python would die of one with a traceback. A signal sent to this process meanwhile
    is held, and handled once its handler is back."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread handles signals (and may set their handlers)
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    handlers = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class ProcessTransport:
    """The engine core in a child process."""

    def __init__(self, load: EngineLoader, spec: CoreSpec, model: str | None) -> None:
        """load: builds the engine in the core process (spawned: it must be picklable)."""
        self.load, self.spec = load, spec
        self.model_dir = Path(model) if model else default_model_dir()
        self._codec = Codec()
        self._ready: CoreReady | None = None
        self._dir = ""  # the sockets' directory, made by start()
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def core_pid(self) -> int | None:
        return self._ready.pid if self._ready is not None else None

    async def start(self, deliver: Deliver, ended: Ended) -> Started:
        """Start the core process and wait until it has loaded the model (or failed to)."""
        loop = self._loop = asyncio.get_running_loop()
        self._ended = ended
        self._exited: asyncio.Future[str] = loop.create_future()  # set by the watcher thread
        self._dir = tempfile.mkdtemp(prefix="ecserve-core-")
        in_addr, out_addr = f"ipc://{self._dir}/in", f"ipc://{self._dir}/out"
        self._ctx = zmq.asyncio.Context()
        self._in = self._ctx.socket(zmq.PUSH)  # sends queue here until the core binds
        self._in.setsockopt(zmq.LINGER, 0)
        self._in.connect(in_addr)
        self._out = self._ctx.socket(zmq.PULL)
        self._out.setsockopt(zmq.LINGER, 0)
        self._out.connect(out_addr)
        # spawn: a fresh interpreter, never a fork of this one's gRPC and OpenMP threads.
        proc = multiprocessing.get_context("spawn").Process(
            target=run_core, args=(self.load, self.spec, in_addr, out_addr, os.getpid()),
            name="ecserve-engine-core", daemon=False)
        # The child unpickles run_core, and so imports torch, before run_core runs: its
        # environment (the OpenMP policy) must be in place at the start.
        with _children_ignore(CORE_IGNORES), _environment(dict(self.spec.env)):
            proc.start()
        self._proc = proc
        _STARTED.add(proc)
        threading.Thread(target=self._watch, name="ecserve-core-watch", daemon=True).start()
        first = asyncio.ensure_future(self._out.recv())
        await asyncio.wait([first, self._exited], return_when=asyncio.FIRST_COMPLETED)
        if not first.done():
            first.cancel()
            raise EngineCoreDied(f"{self._exited.result()} while loading the model; its log "
                                 "above says why")
        hello = self._codec.hello(first.result())
        if hello.ready is None:
            await self._join(5.0)
            kind = _ERRORS.get(hello.error_type,
                               ConfigError if hello.user_error else RuntimeError)
            raise kind(hello.error)
        self._ready = r = hello.ready
        mc = r.model_cfg
        tokenizer = load_tokenizer(self.model_dir, mc.tokenizer, mc.bos_token_id, mc.eos_token_id)
        self._reader = asyncio.ensure_future(self._read(deliver))
        log.info("engine core running in process %d", r.pid)
        return Started(r, tokenizer, self.model_dir)

    def send(self, frame: CoreInput) -> None:
        try:
            # Never waits: the socket connected first, so frames queue until the core reads.
            self._in.send(self._codec.encode(frame), copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:  # a thousand frames unread: the core is stuck
            raise EngineCoreDied("the engine core stopped reading its input") from None

    async def stop(self) -> None:
        """After the stop frame: reap the core (killed if it does not stop in time)."""
        if self._reader is not None:
            self._reader.cancel()
        if self._proc is not None and not self._exited.done():
            if self._ready is None:  # still loading (a signal during start-up): no drain
                self._proc.kill()
            await self._join(STOP_TIMEOUT_S)
        if self._dir:
            self._in.close()
            self._out.close()
            self._ctx.term()
            shutil.rmtree(self._dir, ignore_errors=True)

    async def _join(self, timeout: float) -> None:
        """Wait for the core to exit (the watcher thread reaps it), killing it after timeout."""
        assert self._proc is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), timeout)
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
            log.warning("the engine core did not stop within %.0f s; killing it", timeout)
            self._proc.kill()
            await self._exited

    def _watch(self) -> None:
        """A thread, the only one to wait on the process: tells the event loop it ended."""
        assert self._proc is not None
        self._proc.join()
        reason = _exit_reason(self._proc.pid, self._proc.exitcode)
        self._loop.call_soon_threadsafe(self._core_ended, reason)

    def _core_ended(self, reason: str) -> None:
        self._exited.set_result(reason)
        self._ended(reason)

    async def _read(self, deliver: Deliver) -> None:
        while True:
            frame = await self._out.recv(copy=False)
            try:
                out = self._codec.output(frame.buffer)
            except Exception:  # a bug here must not leave every stream waiting forever
                log.exception("could not decode the engine core's output")
                self._ended("the front end could not read the engine core's output")
                return
            deliver(out)


def _exit_reason(pid: int | None, code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the engine core process (pid {pid}) was killed by {name}"
    return f"the engine core process (pid {pid}) exited with code {code}"
