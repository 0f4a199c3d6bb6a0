"""The server's one front end: every protocol (the gRPC servicer, the HTTP API) hands it
Requests and reads their events back; it alone owns what lives between them and the engine.

It owns the request streams, the text stage (detokenizing, stop sequences), the request limits
and one count of queue room, cancels, the lost-engine state and the metrics observer. Under it a
transport (server/core_transport.py) carries the same core frames either to a thread of this
process that runs the production core loop (`--engine-core thread`), or over ZMQ to the engine
core's own process (the default): one CoreInput for everything an event loop turn handed over,
one CoreOutput per engine step back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ecserve.engine.core_protocol import CoreInput, CoreOutput, CoreReady
from ecserve.engine.engine import EngineObserver
from ecserve.engine.limits import RequestError
from ecserve.engine.text import TextStage
from ecserve.server.core_transport import CoreTransport, EngineCoreDied
from ecserve.server.live import EngineInfo, Item, Traffic, deliver
from ecserve.types import FinishReason, Request, TokenEvent

log = logging.getLogger("ecserve.server")


class FrontEnd:
    """Requests in, events out, over one engine core wherever it runs."""

    def __init__(self, transport: CoreTransport) -> None:
        self.transport = transport
        self.info: EngineInfo
        self.observer: EngineObserver | None = None  # the metrics, once serving starts
        self.on_lost: Callable[[str], None] | None = None  # called on the event loop, once
        self._lost: str | None = None
        self._ready: CoreReady | None = None
        self._streams: dict[str, asyncio.Queue[Item]] = {}  # live requests
        self._waiting: dict[str, int] = {}  # sent and not yet admitted: id -> prompt tokens
        self._pending = CoreInput()  # sent with the event loop's next turn
        self._flush_scheduled = False
        self._stopping = False
        self._traffic: Traffic = {}

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the engine core and wait until it has loaded the model (or failed to)."""
        self._loop = asyncio.get_running_loop()
        started = await self.transport.start(self._handle, self._core_ended)
        self._ready = r = started.ready
        self.info = EngineInfo(r.model_name, r.model_cfg, started.tokenizer,
                               r.limits.max_model_len, r.dtype, r.device, r.held_experts,
                               started.model_dir, r.limits.num_blocks)
        self._text = TextStage(started.tokenizer)

    async def stop(self) -> None:
        """After the drain: stop the core (it leaves its loop between steps)."""
        self._stopping = True
        if self._ready is not None:
            self._pending.stop = True
            self._flush()
        await self.transport.stop()

    def _core_ended(self, reason: str) -> None:
        """The transport's word that the core is gone (its process exited, its thread died)."""
        if not self._stopping and self._ready is not None:
            self._lose(reason)

    # ---------------------------------------------------------------- what protocols call

    @property
    def lost(self) -> str | None:
        return self._lost

    @property
    def num_live(self) -> int:
        """Requests accepted and not finished."""
        return len(self._streams)

    @property
    def core_pid(self) -> int | None:
        """The engine core's process, when it has one of its own."""
        return self.transport.core_pid

    def expert_traffic(self) -> Traffic | None:
        return self._traffic if self._ready is not None and self._ready.expert_parallel else None

    def submit(self, request: Request) -> asyncio.Queue[Item]:
        """Accept a request; raises RequestError (bad input) or QueueFullError (overload),
        checked here, at once, against the core's limits and the requests it has not admitted
        yet (one count for every protocol)."""
        assert self._ready is not None
        rid, n = request.request_id, len(request.prompt_token_ids)
        if rid in self._streams:
            raise RequestError("request_id", f" {rid!r} is already in use")
        limits = self._ready.limits
        limits.validate(request)
        limits.check_room(len(self._waiting), sum(self._waiting.values()), 1, n)
        self._text.add(request)
        queue: asyncio.Queue[Item] = asyncio.Queue()
        self._streams[rid] = queue
        self._waiting[rid] = n
        self._pending.requests.append(request)
        self._schedule_flush()
        return queue

    def cancel(self, request_id: str, notify: bool = False) -> None:
        """Abort a request (the core frees its blocks between steps); its queue place is free
        at once. With `notify` (a server-side cancel) its queue gets a final ABORTED event;
        otherwise (the client left) nobody is listening."""
        queue = self._streams.pop(request_id, None)
        if queue is None:
            return
        self._forget(request_id)
        if notify:
            queue.put_nowait(TokenEvent(request_id, None, "", 0, FinishReason.ABORTED))
        self._abort(request_id, FinishReason.ABORTED)

    def cancel_all(self) -> None:
        for request_id in list(self._streams):
            self.cancel(request_id, notify=True)

    # ---------------------------------------------------------------- to the core

    def _abort(self, request_id: str, reason: FinishReason) -> None:
        pending = self._pending
        queued = next((i for i, r in enumerate(pending.requests)
                       if r.request_id == request_id), None)
        if queued is not None:  # not sent yet: never reaches the core
            del pending.requests[queued]
            return
        pending.aborts.append((request_id, reason))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """One frame for everything this turn of the event loop handed over."""
        self._flush_scheduled = False
        pending, self._pending = self._pending, CoreInput()
        if not pending:
            return
        try:
            self.transport.send(pending)
        except EngineCoreDied as e:  # the core stopped reading its input
            self._lose(str(e))

    # ---------------------------------------------------------------- from the core

    def _handle(self, out: CoreOutput) -> None:
        """One output frame, on the event loop."""
        try:
            self._apply(out)
        except Exception:  # a bug here must not leave every stream waiting forever
            log.exception("could not handle the engine core's output")
            self._lose("the front end could not read the engine core's output")

    def _apply(self, out: CoreOutput) -> None:
        for rid in out.admitted:  # in the running batch now: no longer in the queue
            self._waiting.pop(rid, None)
        events, stopped = self._text.process(out.events)
        for rid in deliver(self._streams, events):
            self._waiting.pop(rid, None)
        for rid in stopped:  # the text reached a stop sequence: the core still runs it
            self._abort(rid, FinishReason.STOP_SEQUENCE)
        for rid, why in out.refused:
            self._end(rid, RuntimeError(f"the engine core refused the request: {why}"))
        if out.traffic is not None:
            self._traffic = out.traffic
        if self.observer is not None:
            for stats in out.finished:
                self.observer.request_done(stats)
            if out.step is not None:
                self.observer.step_done(out.step)
        if out.lost is not None:
            self._lose(out.lost)

    def _forget(self, request_id: str) -> None:
        self._waiting.pop(request_id, None)
        self._text.drop(request_id)

    def _end(self, request_id: str, error: Exception) -> None:
        queue = self._streams.pop(request_id, None)
        self._forget(request_id)
        if queue is not None:
            queue.put_nowait(error)

    def _lose(self, reason: str) -> None:
        """No further step will run: fail every live request, once, and say so."""
        if self._lost is not None:
            return
        self._lost = reason
        log.critical("engine core lost: %s", reason)
        error = EngineCoreDied(reason)
        for request_id in list(self._streams):
            self._end(request_id, error)
        if self.on_lost is not None:
            self.on_lost(reason)
