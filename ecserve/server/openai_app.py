"""The OpenAI-compatible HTTP API: an ASGI app over the same engine as the gRPC servicer.

A plain ASGI app rather than a framework: the API is nine routes, and owning the body read
and the disconnect watch is what lets a body over the limit get 413 before it is buffered and a
client that leaves cancel its request at once (streaming or not), freeing its KV blocks, as a
gRPC cancel does. Served by uvicorn on the server's own event loop (server/http_listener.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import msgspec

from ecserve import __version__
from ecserve.config import ServerConfig
from ecserve.engine.limits import QueueFullError, RequestError
from ecserve.metrics import Metrics
from ecserve.server.auth import bearer_allowed
from ecserve.server.chat_template import ChatTemplate
from ecserve.server.front_end import FrontEnd
from ecserve.server.live import Item
from ecserve.server.openai_params import (
    ApiError,
    Body,
    Call,
    Kind,
    api_message,
    chat_prompt,
    parse_call,
)
from ecserve.server.openai_shapes import Shaper
from ecserve.server.request_log import log_finished, log_rejected
from ecserve.types import FinishReason, TokenEvent

log = logging.getLogger("ecserve.server")
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
       (b"x-accel-buffering", b"no")]  # proxies must not hold the stream back
PARSE_INLINE_BYTES = 64 << 10  # larger bodies are parsed (and tokenized) in a worker thread
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class _Disconnected(Exception):
    """The client closed the connection."""


class OpenAIApp:
    """The routes. `engine`, `metrics` and `draining` are set by the Server, as on the gRPC
    servicer; `ready` says whether new work is taken (for /health)."""

    def __init__(self, cfg: ServerConfig, ready: Callable[[], tuple[bool, str]],
                 keys: Sequence[bytes] = ()) -> None:
        self.cfg, self.ready, self.keys = cfg, ready, tuple(keys)
        self.engine: FrontEnd | None = None
        self.metrics: Metrics | None = None
        self.template: ChatTemplate | None = None
        self.draining = False
        self._token_text: Callable[[int], str] | None = None
        # path -> (method, handler, needs the API key)
        self.routes: dict[str, tuple[str, Callable[..., Awaitable[None]], bool]] = {
            "/v1/completions": ("POST", functools.partial(self._generate, "completion"), True),
            "/v1/chat/completions": ("POST", functools.partial(self._generate, "chat"), True),
            "/v1/models": ("GET", self._models, True),
            "/tokenize": ("POST", self._tokenize, True),
            "/detokenize": ("POST", self._detokenize, True),
            "/health": ("GET", self._health, False),
            "/version": ("GET", self._version, False),
            "/metrics": ("GET", self._metrics, False),
        }

    def attach(self, live: FrontEnd, template: ChatTemplate | None) -> None:
        """Serving from now on."""
        decode = live.info.tokenizer.decode
        self._token_text = functools.lru_cache(maxsize=1 << 17)(lambda i: decode([i]))
        self.template = template
        self.engine = live

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        try:
            route = self.routes.get(scope["path"])
            if route is None:
                raise ApiError(404, f"no route {scope['path']} (the API: "
                                    f"{', '.join(self.routes)})")
            method, handler, needs_key = route
            if scope["method"] != method:
                raise ApiError(405, f"{scope['path']} takes {method}, not {scope['method']}",
                               headers=[("allow", method)])
            if needs_key and self.keys and not bearer_allowed(
                    _header(scope, b"authorization"), self.keys):
                raise ApiError(401, "missing or invalid API key: send the header "
                                    "'Authorization: Bearer <key>'")
            await handler(scope, receive, send)
        except ApiError as e:
            await self._refuse(scope, send, e)
        except _Disconnected:
            pass

    async def _refuse(self, scope: Scope, send: Send, e: ApiError) -> None:
        if e.status != 404 or scope["path"].startswith("/v1/"):
            if self.metrics is not None:
                self.metrics.reject(str(e.status), "http")
            client = scope.get("client")
            log_rejected(str(e.status), f"{client[0]}:{client[1]}" if client else "?",
                         e.message)
        headers = [(k.encode(), v.encode()) for k, v in e.headers]
        await _respond(send, e.status, _encode(e.body()), JSON + headers)

    def _serving(self) -> FrontEnd:
        if self.draining:
            raise ApiError(503, "server is draining (shutting down); retry on another replica")
        if self.engine is None:
            raise ApiError(503, "model is still loading; retry shortly")
        if self.engine.lost is not None:
            raise ApiError(503, f"the engine stopped ({self.engine.lost}); retry on another "
                                "replica")
        return self.engine

    async def _body(self, scope: Scope, receive: Receive) -> Any:
        """The JSON body; 413 past max_request_bytes (before reading it, when the length is
        declared), 400 if it is not JSON."""
        limit = self.cfg.max_request_bytes
        over = f"over the server's max_request_bytes={limit}"
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is {int(declared)} bytes, {over}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is more than {limit} bytes, {over}")
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        if not raw:
            raise ApiError(400, "the body is empty: send a JSON object")
        try:
            return _decode(raw)
        except msgspec.DecodeError as e:
            raise ApiError(400, f"the body is not valid JSON ({e})") from None
        except RecursionError:  # msgspec's answer to [[[[... (tests/test_hostile_requests.py)
            raise ApiError(400, "the body is not valid JSON (nested too deeply)") from None

    # ------------------------------------------------------------------ generation

    async def _generate(self, kind: Kind, scope: Scope, receive: Receive, send: Send) -> None:
        live = self._serving()
        raw = await self._body(scope, receive)
        info = live.info

        def parse() -> Call:
            return parse_call(raw, kind, self.cfg, info.model_name, info.max_model_len,
                              info.encode, self.template)

        large = int(_header(scope, b"content-length") or 0) > PARSE_INLINE_BYTES
        call = await asyncio.to_thread(parse) if large else parse()
        queues = self._submit(live, call)
        assert self._token_text is not None
        shaper = Shaper(call, self._token_text)
        # The work runs as a task of its own, raced against the client's disconnect: a client
        # that leaves cancels it at once, whatever it was waiting for.
        work = asyncio.ensure_future(self._run(shaper, queues, send))
        gone = asyncio.ensure_future(_disconnect(receive))
        try:
            await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                work.result()  # its ApiError is answered by __call__
        finally:
            if not work.done():  # the client left (or this handler was cancelled)
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
            failed = work.done() and not work.cancelled() and work.exception() is not None
            outcome = ("cancelled: another choice of its call failed" if failed else
                       "cancelled by the client" if gone.done() else "cancelled")
            gone.cancel()
            for request, st in zip(call.requests, shaper.choices, strict=True):
                if st.finish is None:
                    live.cancel(request.request_id)  # frees its blocks
                    log_finished(request, st.generated, outcome)

    def _submit(self, live: FrontEnd, call: Call) -> list[asyncio.Queue[Item]]:
        """Every choice's request, or none: a refusal cancels those already taken."""
        queues: list[asyncio.Queue[Item]] = []
        try:
            for request in call.requests:
                queues.append(live.submit(request))
        except (RequestError, QueueFullError) as e:
            for request in call.requests[:len(queues)]:
                live.cancel(request.request_id)
            if isinstance(e, QueueFullError):
                raise ApiError(429, str(e), headers=[("retry-after", "1")]) from None
            raise api_message(e, call.kind) from None
        if self.metrics is not None:
            self.metrics.receive("http", len(queues))
        return queues

    async def _run(self, shaper: Shaper, queues: list[asyncio.Queue[Item]],
                   send: Send) -> None:
        call = shaper.call
        if call.stream:
            await self._stream(shaper, queues, send)
        else:
            async for index, events, failure in _items(queues):
                shaper.feed(index, events)
                if failure is not None:
                    raise ApiError(500, f"generation failed: {failure}")
            await _respond(send, 200, _encode(shaper.response()), JSON)
        for request, st in zip(call.requests, shaper.choices, strict=True):
            if st.finish is not None:
                log_finished(request, st.generated, st.finish.value)

    async def _stream(self, shaper: Shaper, queues: list[asyncio.Queue[Item]],
                      send: Send) -> None:
        """Server-sent events: a chunk per choice and batch of events, an error as an event,
        the usage chunk when asked, then [DONE]."""
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        want_logprobs = shaper.call.logprobs is not None
        async for index, events, failure in _items(queues):
            out = []
            if events:
                text, entries = shaper.feed(index, events)
                if text or entries or events[-1].finished or want_logprobs:
                    out.append(_event(shaper.chunk(index, text, entries)))
            if failure is not None:
                out.append(_event(ApiError(500, f"generation failed: {failure}").body()))
            await send({"type": "http.response.body", "body": b"".join(out),
                        "more_body": True})
            if failure is not None:
                break
        tail = [_event(shaper.usage_chunk())] if shaper.call.include_usage else []
        await send({"type": "http.response.body", "body": b"".join([*tail, b"data: [DONE]\n\n"]),
                    "more_body": False})

    # ------------------------------------------------------------------ the rest

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        info = self._serving().info
        mc = info.model_cfg
        # ecserve's extras after vLLM's fields: what a load generator needs to build prompts.
        card = {"id": info.model_name, "object": "model", "created": 0, "owned_by": "ecserve",
                "root": info.model_name, "parent": None, "max_model_len": info.max_model_len,
                "vocab_size": mc.vocab_size, "bos_token_id": mc.bos_token_id,
                "eos_token_id": mc.eos_token_id}
        await _respond(send, 200, _encode({"object": "list", "data": [card]}), JSON)

    async def _tokenize(self, scope: Scope, receive: Receive, send: Send) -> None:
        """vLLM's /tokenize: a prompt, or chat messages rendered with the template."""
        live = self._serving()
        body = Body(await self._body(scope, receive))
        info = live.info
        if body.get("messages") is not None:
            ids = list(chat_prompt(body, self.template, info.encode))
        else:
            prompt = body.string("prompt")
            if prompt is None:
                raise ApiError(400, "prompt: required (or messages)", "prompt")
            special = body.boolean("add_special_tokens", True)
            ids = info.encode(prompt) if special else info.tokenizer.encode(prompt)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": info.max_model_len,
                               "tokens": ids, "token_strs": None}
        if body.boolean("return_token_strs"):
            assert self._token_text is not None
            out["token_strs"] = [self._token_text(i) for i in ids]
        await _respond(send, 200, _encode(out), JSON)

    async def _detokenize(self, scope: Scope, receive: Receive, send: Send) -> None:
        live = self._serving()
        body = Body(await self._body(scope, receive))
        ids = body.ints("tokens")
        vocab = live.info.model_cfg.vocab_size
        if bad := [i for i in ids if not 0 <= i < vocab]:
            raise ApiError(400, f"tokens: id(s) {bad[:5]} outside the vocabulary [0, {vocab})",
                           "tokens")
        await _respond(send, 200, _encode({"prompt": live.info.tokenizer.decode(ids)}), JSON)

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        ok, why = self.ready()
        await _respond(send, 200 if ok else 503, (why + "\n").encode(),
                       [(b"content-type", b"text/plain; charset=utf-8")])

    async def _version(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _respond(send, 200, _encode({"version": __version__}), JSON)

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.metrics is None:
            raise ApiError(503, "the model is still loading")
        body, kind = self.metrics.render((_header(scope, b"accept") or b"").decode("latin-1"))
        await _respond(send, 200, body, [(b"content-type", kind.encode())])


# ---------------------------------------------------------------------- helpers


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((v for k, v in scope["headers"] if k == name), None)


async def _respond(send: Send, status: int, body: bytes,
                   headers: Sequence[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})
    await send({"type": "http.response.body", "body": body})


def _event(data: Any) -> bytes:
    return b"data: " + _encode(data) + b"\n\n"


async def _disconnect(receive: Receive) -> None:
    """Returns when the client has gone (the body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _ended(item: Item) -> bool:
    return isinstance(item, Exception) or item.finished


async def _take(queue: asyncio.Queue[Item]) -> list[Item]:
    """What the queue holds, waiting for at least one item: a slow reader gets what piled up
    in one chunk."""
    items = [await queue.get()]
    while not queue.empty() and not _ended(items[-1]):
        items.append(queue.get_nowait())
    return items


async def _items(queues: list[asyncio.Queue[Item]]
                 ) -> AsyncIterator[tuple[int, list[TokenEvent], Exception | None]]:
    """(choice, its new events, the error that ended it) until every choice has ended."""
    def split(items: list[Item]) -> tuple[list[TokenEvent], Exception | None]:
        events = [i for i in items if isinstance(i, TokenEvent)]
        failure = next((i for i in items if isinstance(i, Exception)), None)
        if failure is None and events and events[-1].finish_reason is FinishReason.ERROR:
            failure = RuntimeError(events[-1].detail or "the step running it failed")
        return events, failure

    if len(queues) == 1:  # the common case, without a task per wait
        while True:
            items = await _take(queues[0])
            yield 0, *split(items)
            if _ended(items[-1]):
                return
    pending = {asyncio.ensure_future(_take(q)): i for i, q in enumerate(queues)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                items = task.result()
                yield i, *split(items)
                if not _ended(items[-1]):
                    pending[asyncio.ensure_future(_take(queues[i]))] = i
    finally:
        for task in pending:
            task.cancel()
