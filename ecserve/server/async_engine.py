"""The engine loop beside asyncio: one worker thread steps the engine back to back, the event
loop accepts requests and streams their tokens.

The Engine is not thread-safe, so only the worker thread touches it: new requests and
cancellations are handed over through a locked inbox and applied between steps. The worker
never waits for the event loop, so gRPC work (sending tokens, accepting calls, health checks)
runs beside the model instead of in the gaps between steps.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ecserve.engine.engine import Engine, EngineObserver
from ecserve.server.live import EngineInfo, Item, Traffic, deliver
from ecserve.types import FinishReason, Request, TokenEvent

log = logging.getLogger(__name__)
__all__ = ["AsyncEngine", "Item"]


@dataclass
class _Inbox:
    """What the event loop hands the worker; guarded by AsyncEngine._lock."""

    requests: list[Request] = field(default_factory=list)
    tokens: int = 0  # prompt tokens of `requests`
    cancels: dict[str, int] = field(default_factory=dict)  # request id -> its prompt tokens
    stop: bool = False


class AsyncEngine:
    """The engine on a worker thread of the server's process (`ecserve serve --engine-core
    thread`, and the tests): a LiveEngine."""

    core_pid = None  # the engine runs in this process

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.info = EngineInfo(engine.model_name, engine.model_cfg, engine.tokenizer,
                               engine.max_model_len, engine.dtype_name, str(engine.device),
                               engine.runner.held_experts(), engine.model_dir)
        self._lock = threading.Lock()
        self._inbox = _Inbox()
        self._work = threading.Event()  # set when the inbox has something
        self._streams: dict[str, asyncio.Queue[Item]] = {}  # live requests (event loop only)
        self._prompt_tokens: dict[str, int] = {}  # of the live requests (event loop only)
        self._loop: asyncio.AbstractEventLoop | None = None
        # Called on the event loop, once, when the engine can run no further step.
        self.on_lost: Callable[[str], None] | None = None
        self._lost_reported = False
        self._thread = threading.Thread(target=self._run, name="ecserve-engine", daemon=True)

    @property
    def observer(self) -> EngineObserver | None:
        return self.engine.observer

    @observer.setter
    def observer(self, observer: EngineObserver | None) -> None:
        self.engine.observer = observer  # called on the worker thread, as Metrics allows

    @property
    def lost(self) -> str | None:
        return self.engine.lost

    def expert_traffic(self) -> Traffic | None:
        runner = self.engine.runner
        return runner.expert_traffic() if runner.expert_traffic() else None

    @property
    def num_live(self) -> int:
        """Requests accepted and not finished (in the inbox, waiting or running)."""
        return len(self._streams)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    async def stop(self) -> None:
        with self._lock:
            self._inbox.stop = True
        self._work.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def submit(self, request: Request) -> asyncio.Queue[Item]:
        """Accept a request; raises RequestError (bad input) or QueueFullError (overload).

        Checked here, on the event loop, so the caller gets its answer at once. Reading the
        engine's queue length while the worker steps is safe: a step only shrinks it.
        """
        n = len(request.prompt_token_ids)
        self.engine.validate(request)
        with self._lock:
            inbox = self._inbox
            # Cancels the worker has not applied yet no longer count: a client that cancels
            # and retries is not refused for its own dead call.
            self.engine.batcher.check_room(
                len(inbox.requests) + 1 - len(inbox.cancels),
                inbox.tokens + n - sum(inbox.cancels.values()))
            inbox.requests.append(request)
            inbox.tokens += n
        queue: asyncio.Queue[Item] = asyncio.Queue()
        self._streams[request.request_id] = queue
        self._prompt_tokens[request.request_id] = n
        self._work.set()
        return queue

    def cancel(self, request_id: str, notify: bool = False) -> None:
        """Abort a request at the next step boundary, freeing its KV blocks.

        With `notify` (a server-side cancel) the request's queue gets a final ABORTED event;
        otherwise (the client left) nobody is listening and the queue is dropped now.
        """
        if request_id not in self._streams:
            return
        if not notify:
            del self._streams[request_id]
        tokens = self._prompt_tokens.pop(request_id, 0)
        with self._lock:
            inbox = self._inbox
            queued = next((i for i, r in enumerate(inbox.requests)
                           if r.request_id == request_id), None)
            if queued is None:  # handed over: the worker aborts it between steps
                inbox.cancels[request_id] = tokens
            else:  # still in the inbox: gone at once
                del inbox.requests[queued]
                inbox.tokens -= tokens
        if queued is None:
            self._work.set()
        else:
            self._finish_cancelled([request_id])

    def cancel_all(self) -> None:
        for request_id in list(self._streams):
            self.cancel(request_id, notify=True)

    # ---------------------------------------------------------------- worker thread

    def _run(self) -> None:
        while True:
            # Woken by the inbox, or every second to notice a runner lost while idle.
            self._work.wait(timeout=1.0)
            self._report_lost()
            with self._lock:
                inbox, self._inbox = self._inbox, _Inbox()
                self._work.clear()
            if inbox.stop:
                return
            self._apply(inbox)
            # Step back to back; stop to apply the inbox as soon as something arrives.
            while self.engine.has_unfinished() and not self._work.is_set():
                self._step()

    def _apply(self, inbox: _Inbox) -> None:
        # Cancels first: submit() already gave their queue places to the new requests.
        cancelled = [rid for rid in inbox.cancels if self.engine.abort(rid)]
        for request in inbox.requests:
            try:
                self.engine.add_request(request)
            except Exception as exc:  # submit() checked it; defend the loop regardless
                self._post(self._end, request.request_id, exc)
        if cancelled:
            self._post(self._finish_cancelled, cancelled)

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as exc:  # the engine failed outside a model step: a bug
            log.exception("engine step failed outside the model; failing live requests")
            for rid in list(self.engine.seqs):
                self.engine.abort(rid)
            self._post(self._fail_all, exc)
            return
        if events:
            self._post(self._dispatch, events)
        self._report_lost()

    def _report_lost(self) -> None:
        lost = self.engine.lost
        if lost is not None and not self._lost_reported:
            self._lost_reported = True
            if self.on_lost is not None:
                self._post(self.on_lost, lost)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn, *args)

    # ---------------------------------------------------------------- event loop

    def _dispatch(self, events: list[TokenEvent]) -> None:
        for rid in deliver(self._streams, events):
            self._prompt_tokens.pop(rid, None)

    def _finish_cancelled(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            queue = self._streams.pop(rid, None)
            self._prompt_tokens.pop(rid, None)
            if queue is not None:  # a server-side cancel: tell the waiting call
                queue.put_nowait(TokenEvent(rid, None, "", 0, FinishReason.ABORTED))

    def _end(self, request_id: str, exc: Exception) -> None:
        queue = self._streams.pop(request_id, None)
        self._prompt_tokens.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(exc)

    def _fail_all(self, exc: Exception) -> None:
        for request_id in list(self._streams):
            self._end(request_id, exc)
