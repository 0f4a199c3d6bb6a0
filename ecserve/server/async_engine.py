"""The engine loop under asyncio: requests join between steps, steps run off the event loop.

The Engine is not thread-safe, so it is touched in two places only, never at once: between
steps on the event loop (new requests, cancellations) and during a step in one worker thread.
gRPC keeps serving (health checks, new calls, sending tokens) while a step computes.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from ecserve.engine.engine import Engine
from ecserve.types import FinishReason, Request, TokenEvent

log = logging.getLogger(__name__)

Item = TokenEvent | Exception  # what a request's queue carries; an Exception ends the request


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ecserve-step")
        self._pending: list[Request] = []  # accepted, enter the engine before the next step
        self._pending_tokens = 0
        self._cancels: set[str] = set()  # to abort before the next step
        self._streams: dict[str, asyncio.Queue[Item]] = {}  # every live request's events
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def num_live(self) -> int:
        """Requests accepted and not finished (pending, waiting or running)."""
        return len(self._streams)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="engine-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def submit(self, request: Request) -> asyncio.Queue[Item]:
        """Accept a request; raises RequestError (bad input) or QueueFullError (overload).

        Checked here, on the event loop, so the caller gets its answer at once; a step running
        in the worker only ever shrinks the waiting queue, so the check stays true until the
        request enters the engine.
        """
        n = len(request.prompt_token_ids)
        self.engine.validate(request)
        self.engine.batcher.check_room(len(self._pending) + 1, self._pending_tokens + n)
        queue: asyncio.Queue[Item] = asyncio.Queue()
        self._streams[request.request_id] = queue
        self._pending.append(request)
        self._pending_tokens += n
        self._wake.set()
        return queue

    def cancel(self, request_id: str, notify: bool = False) -> None:
        """Abort a request at the next step boundary, freeing its KV blocks.

        With `notify` (a server-side cancel) the request's queue gets a final ABORTED event;
        otherwise (the client left) nobody is listening and the queue is dropped now.
        """
        queue = self._streams.get(request_id) if notify else self._streams.pop(request_id, None)
        if queue is None:
            return
        self._cancels.add(request_id)
        self._wake.set()

    def cancel_all(self) -> None:
        for request_id in list(self._streams):
            self.cancel(request_id, notify=True)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._apply()
            while self.engine.has_unfinished():
                try:
                    events = await loop.run_in_executor(self._executor, self.engine.step)
                except Exception as exc:  # the engine failed outside a model step: a bug
                    log.exception("engine step failed outside the model; failing live requests")
                    self._fail_all(exc)
                    break
                self._dispatch(events)
                self._apply()

    def _apply(self) -> None:
        """Between steps: move accepted requests into the engine, apply cancellations."""
        pending, self._pending, self._pending_tokens = self._pending, [], 0
        for request in pending:
            rid = request.request_id
            if rid in self._cancels or rid not in self._streams:
                self._cancels.discard(rid)
                self._finish_cancelled(rid)
                continue
            try:
                self.engine.add_request(request)
            except Exception as exc:  # submit() checked it; defend the loop regardless
                self._end(rid, exc)
        cancels, self._cancels = self._cancels, set()
        for rid in cancels:
            self.engine.abort(rid)
            self._finish_cancelled(rid)

    def _finish_cancelled(self, request_id: str) -> None:
        queue = self._streams.pop(request_id, None)
        if queue is not None:  # a server-side cancel: tell the waiting call
            queue.put_nowait(TokenEvent(request_id, None, "", 0, FinishReason.ABORTED))

    def _dispatch(self, events: list[TokenEvent]) -> None:
        for event in events:
            queue = self._streams.get(event.request_id)
            if queue is None:  # cancelled by its client during the step
                continue
            queue.put_nowait(event)
            if event.finished:
                del self._streams[event.request_id]

    def _end(self, request_id: str, exc: Exception) -> None:
        queue = self._streams.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(exc)

    def _fail_all(self, exc: Exception) -> None:
        for request_id in list(self._streams):
            self.engine.abort(request_id)
            self._end(request_id, exc)
