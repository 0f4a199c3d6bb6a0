"""What the front end needs of a transport to the engine core, and the thread transport.

A transport starts the core, carries CoreInput frames to it and hands each CoreOutput back on
the event loop; it says when the core is gone. Two exist: ThreadTransport (below: the core
loop on a thread of the server's process, `--engine-core thread`) and ProcessTransport
(server/core_process.py: the core in a process of its own, over ZMQ).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from ecserve.engine.core import EngineCore, core_ready
from ecserve.engine.core_protocol import CoreInput, CoreOutput, CoreReady
from ecserve.engine.engine import Engine
from ecserve.tokenizer import Tokenizer

log = logging.getLogger("ecserve.server")
T = TypeVar("T")
Deliver = Callable[[CoreOutput], None]  # called on the event loop, once per output frame
Ended = Callable[[str], None]  # called on the event loop when the core is gone, with why


class EngineCoreDied(RuntimeError):
    """The engine core ended (or stopped reading) while serving."""


@dataclass(frozen=True)
class Started:
    """What a transport learns when its core has loaded the model."""

    ready: CoreReady
    tokenizer: Tokenizer
    model_dir: Path


class CoreTransport(Protocol):
    core_pid: int | None  # the core's own process, if it has one

    async def start(self, deliver: Deliver, ended: Ended) -> Started: ...

    def send(self, frame: CoreInput) -> None:
        """Never waits; raises EngineCoreDied if the core no longer reads."""

    async def stop(self) -> None:
        """After the stop frame was sent: wait for the core to end."""


class ThreadTransport:
    """The core loop (ecserve.engine.core.EngineCore, as in the core's process) on a thread of
    this process. Frames are handed over as objects, not encoded."""

    core_pid = None

    def __init__(self, engine: Engine | Callable[[], Engine]) -> None:
        """engine: the engine, or a loader run on a daemon thread by start()."""
        self._source = engine
        self._thread: threading.Thread | None = None
        self.core: EngineCore | None = None

    async def start(self, deliver: Deliver, ended: Ended) -> Started:
        loop = asyncio.get_running_loop()
        source = self._source
        engine = source if isinstance(source, Engine) else await in_daemon_thread(source)
        self.core = EngineCore(engine, lambda out: loop.call_soon_threadsafe(deliver, out))
        self._thread = threading.Thread(target=self._run, args=(loop, ended),
                                        name="ecserve-engine", daemon=True)
        self._thread.start()
        log.info("engine core running on a thread of this process")
        return Started(core_ready(engine), engine.tokenizer, engine.model_dir)

    def _run(self, loop: asyncio.AbstractEventLoop, ended: Ended) -> None:
        assert self.core is not None
        try:
            self.core.loop()
        except BaseException as e:  # a bug outside the model step: no further step runs
            log.exception("the engine core's loop failed")
            loop.call_soon_threadsafe(ended, f"the engine core's loop failed: "
                                             f"{type(e).__name__}: {e}")

    def send(self, frame: CoreInput) -> None:
        if self._thread is None or not self._thread.is_alive():
            raise EngineCoreDied("the engine core's thread has ended")
        assert self.core is not None
        self.core.inputs.put(frame)

    async def stop(self) -> None:
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)


async def in_daemon_thread(fn: Callable[[], T]) -> T:
    """Run `fn` in a daemon thread: unlike the loop's executor, a SIGTERM during a long model
    load does not have to wait for the load to finish before the process can exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(value: T | None, error: BaseException | None) -> None:
        if future.done():  # cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)  # type: ignore[arg-type]

    def run() -> None:
        try:
            value = fn()
        except BaseException as e:
            loop.call_soon_threadsafe(settle, None, e)
        else:
            loop.call_soon_threadsafe(settle, value, None)

    threading.Thread(target=run, name="ecserve-load", daemon=True).start()
    return await future
