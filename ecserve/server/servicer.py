"""The GenerationService handlers: decode and validate, hand the engine a Request, stream back.

Requests arrive as raw bytes (the handlers are registered without a deserializer) so a bad
message is answered with INVALID_ARGUMENT naming its field, not gRPC's generic error.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import NoReturn, TypeVar

import grpc
from google.protobuf.message import Message

from ecserve.config import ServerConfig
from ecserve.engine.limits import QueueFullError, RequestError
from ecserve.metrics import Metrics
from ecserve.server.convert import (
    SCOPE_ENUMS,
    InvalidArgument,
    ResponseBuilder,
    parse,
    proto_message,
    to_request,
)
from ecserve.server.front_end import FrontEnd
from ecserve.server.live import EngineInfo, Item
from ecserve.server.request_log import log_finished, log_rejected
from ecserve.types import FinishReason, Request
from ecserve.v1 import generation_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
M = TypeVar("M", bound=Message)
PARSE_INLINE_BYTES = 64 << 10  # larger bodies are parsed in a worker thread


class GenerationServicer:
    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.engine: FrontEnd | None = None  # set once the model is loaded and warm
        self.metrics: Metrics | None = None
        self.draining = False  # set on SIGTERM: refuse new calls, let live ones finish

    def handler(self) -> grpc.GenericRpcHandler:
        ser = {name: getattr(pb, name).SerializeToString for name in
               ("GenerateResponse", "TokenizeResponse", "ModelInfoResponse")}
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Generate": grpc.unary_unary_rpc_method_handler(
                self.generate, response_serializer=ser["GenerateResponse"]),
            "GenerateStream": grpc.unary_stream_rpc_method_handler(
                self.generate_stream, response_serializer=ser["GenerateResponse"]),
            "Tokenize": grpc.unary_unary_rpc_method_handler(
                self.tokenize, response_serializer=ser["TokenizeResponse"]),
            "ModelInfo": grpc.unary_unary_rpc_method_handler(
                self.model_info, response_serializer=ser["ModelInfoResponse"]),
        })

    # ------------------------------------------------------------------ generation

    async def generate(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        live, request, builder, queue = await self._accept(raw, context)
        events, done = [], False
        try:
            while not done:
                item = await queue.get()
                await self._raise_error(item, context)
                assert not isinstance(item, Exception)
                events.append(item)
                done = item.finished
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed
            self._log_unfinished(request, sum(e.token_id is not None for e in events), context)
            raise
        finally:
            if not done:  # free the request's blocks
                live.cancel(request.request_id)
        response = builder.build(events)
        self._log(request, builder)
        if builder.finish is FinishReason.ERROR:
            await context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {builder.detail}")
        return response

    async def generate_stream(
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        live, request, builder, queue = await self._accept(raw, context)
        done = False
        try:
            while not done:
                items = [await queue.get()]
                while not queue.empty():  # a slow reader gets what piled up in one message
                    items.append(queue.get_nowait())
                for item in items:
                    await self._raise_error(item, context)
                events = [i for i in items if not isinstance(i, Exception)]
                done = events[-1].finished
                yield builder.build(events)
        except asyncio.CancelledError:
            self._log_unfinished(request, builder.generated, context)
            raise
        finally:
            if not done:
                live.cancel(request.request_id)
        self._log(request, builder)
        if builder.finish is FinishReason.ERROR:
            await context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {builder.detail}")

    async def _accept(
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> tuple[FrontEnd, Request, ResponseBuilder, asyncio.Queue[Item]]:
        live = await self._refuse_if_not_serving(context)
        info = live.info
        try:
            msg = await self._parse(pb.GenerateRequest, raw)
            request = to_request(msg, uuid.uuid4().hex[:16], info.encode, self.cfg)
            queue = live.submit(request)
        except InvalidArgument as e:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RequestError as e:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT,
                               proto_message(e, bool(msg.prompt_token_ids)))
        except QueueFullError as e:
            await self._reject(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        if self.metrics is not None:
            self.metrics.receive("grpc")
        return live, request, ResponseBuilder(request, msg.response, info.tokenizer.decode), queue

    async def _parse(self, cls: type[M], raw: bytes) -> M:
        """parse(), off the event loop for a large body: naming a bad field walks it in
        Python, and health checks must keep answering meanwhile."""
        if len(raw) <= PARSE_INLINE_BYTES:
            return parse(cls, raw, self.cfg.max_request_bytes)
        return await asyncio.to_thread(parse, cls, raw, self.cfg.max_request_bytes)

    async def _raise_error(self, item: Item, context: grpc.aio.ServicerContext) -> None:
        if isinstance(item, Exception):
            await context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {item}")

    def _log(self, request: Request, builder: ResponseBuilder) -> None:
        log_finished(request, builder.generated,
                   builder.finish.value if builder.finish else "unfinished")

    def _log_unfinished(self, request: Request, generated: int,
                        context: grpc.aio.ServicerContext) -> None:
        """The line of a request its client ended: cancelled, or past its deadline (gRPC
        cancels the handler either way; the time left tells them apart)."""
        left = context.time_remaining()
        log_finished(request, generated, "deadline exceeded" if left is not None and left <= 0
                   else "cancelled by the client")

    # ------------------------------------------------------------------ the rest

    async def tokenize(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        info = (await self._refuse_if_not_serving(context)).info
        try:
            msg = await self._parse(pb.TokenizeRequest, raw)
        except InvalidArgument as e:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        ids = info.encode(msg.text)
        out = pb.TokenizeResponse(token_ids=ids, token_count=len(ids))
        if msg.return_tokens:
            out.tokens.extend(info.tokenizer.decode([i]) for i in ids)
        return out

    async def model_info(self, raw: bytes, context: grpc.aio.ServicerContext
                         ) -> pb.ModelInfoResponse:
        return model_info((await self._refuse_if_not_serving(context)).info, self.cfg)

    async def _refuse_if_not_serving(self, context: grpc.aio.ServicerContext) -> FrontEnd:
        if self.draining:
            await self._reject(context, grpc.StatusCode.UNAVAILABLE,
                               "server is draining (shutting down); retry on another replica")
        if self.engine is None:
            await self._reject(context, grpc.StatusCode.UNAVAILABLE,
                               "model is still loading; retry shortly")
        if self.engine.lost is not None:
            await self._reject(context, grpc.StatusCode.UNAVAILABLE,
                               f"the engine stopped ({self.engine.lost}); retry on "
                               "another replica")
        return self.engine

    async def _reject(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode,
                      message: str) -> NoReturn:
        if self.metrics is not None:
            self.metrics.reject(code.name, "grpc")
        log_rejected(code.name, context.peer(), message)
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")


def model_info(engine: EngineInfo, cfg: ServerConfig) -> pb.ModelInfoResponse:
    mc, r = engine.model_cfg, engine.model_cfg.routing
    out = pb.ModelInfoResponse(
        model_name=engine.model_name,
        model_type=mc.model_type, vocab_size=mc.vocab_size, max_model_len=engine.max_model_len,
        num_layers=mc.num_layers, moe_layers=list(mc.moe_layers or ()),
        num_experts=mc.num_experts, routing_policy=r.policy,
        capacity_factor=r.capacity_factor, group_size=r.group_size,
        default_routing_scope=SCOPE_ENUMS[r.scope], dtype=engine.dtype_name,
        device=engine.device, max_new_tokens_default=cfg.default_max_new_tokens,
        max_stop_sequences=cfg.max_stop_sequences,
        max_stop_sequence_length=cfg.max_stop_sequence_length,
        max_top_logprobs=cfg.max_top_logprobs, max_request_bytes=cfg.max_request_bytes,
    )
    if mc.eos_token_id is not None:
        out.eos_token_id = mc.eos_token_id
    if mc.bos_token_id is not None:
        out.bos_token_id = mc.bos_token_id
    return out
