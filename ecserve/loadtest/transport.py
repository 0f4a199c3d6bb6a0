"""How the load generator reaches a server: gRPC streams, or the OpenAI-compatible HTTP API's
streamed completions (`--protocol http`), each giving the same Chunks, so one workload runs over
both and their figures compare.

The HTTP side is a small HTTP/1.1 client on asyncio streams with a keep-alive pool, rather than
a library: it adds no dependency and almost no client time to what is measured. Tokens per chunk
come from vLLM's `stream_options.continuous_usage_stats` (the running usage on every chunk), as
guidellm counts them.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from ecserve.client import build_request
from ecserve.loadtest.config import LoadTestConfig
from ecserve.loadtest.workload import ModelLimits, RequestSpec
from ecserve.security import ClientSecurity, read_file

FAILED_STOPS = ("STOP_REASON_CANCELLED", "STOP_REASON_ERROR", "abort")


class ServerUnreachable(RuntimeError):
    """The first call (the model's limits) failed: nothing is measured."""


class CallFailed(Exception):
    """A request the server refused or failed: `code` is gRPC's status name, or HTTP_<status>,
    or ERROR for an error event in a stream."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail


@dataclass(frozen=True)
class Chunk:
    """What one streamed message said."""

    input_tokens: int  # the server's prompt token count (0: not said in this message)
    generated: int  # tokens generated so far
    stop_reason: str = ""  # on the last: gRPC's STOP_REASON_* name, or HTTP's finish_reason


class Transport(Protocol):
    async def model_info(self, timeout: float) -> tuple[ModelLimits, dict[str, Any]]: ...

    def stream(self, spec: RequestSpec, cfg: LoadTestConfig, index: int
               ) -> AsyncIterator[Chunk]: ...

    async def close(self) -> None: ...


def transport(cfg: LoadTestConfig, security: ClientSecurity) -> Transport:
    if cfg.protocol == "http":
        return HttpTransport(cfg.target(), security)
    return GrpcTransport(cfg.target(), security)


def _seed(cfg: LoadTestConfig, index: int) -> int | None:
    return cfg.seed + index if cfg.temperature else None  # seed + index: reproducible


def grpc_request(spec: RequestSpec, cfg: LoadTestConfig, index: int) -> Any:
    """A GenerateRequest for exactly spec.output_len tokens (EOS ignored), no ids back."""
    return build_request(spec.prompt, max_new_tokens=spec.output_len, ignore_eos=True,
                         token_ids=False, temperature=cfg.temperature, seed=_seed(cfg, index),
                         routing_scope=cfg.routing_scope)


def http_body(spec: RequestSpec, cfg: LoadTestConfig, index: int) -> dict[str, Any]:
    """The same request as a streamed /v1/completions body, with the usage on every chunk."""
    body: dict[str, Any] = {
        "prompt": list(spec.prompt) if isinstance(spec.prompt, tuple) else spec.prompt,
        "max_tokens": spec.output_len, "ignore_eos": True, "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    if (seed := _seed(cfg, index)) is not None:
        body["seed"] = seed
    if cfg.routing_scope is not None:
        body["routing_scope"] = cfg.routing_scope
    return body


# ---------------------------------------------------------------------- gRPC


class GrpcTransport:
    def __init__(self, address: str, security: ClientSecurity) -> None:
        from ecserve.v1 import generation_pb2_grpc as pb_grpc

        self.address, self.metadata = address, security.metadata or None
        self.channel = security.aio_channel(address)
        self.stub = pb_grpc.GenerationServiceStub(self.channel)

    async def model_info(self, timeout: float) -> tuple[ModelLimits, dict[str, Any]]:
        import grpc
        from google.protobuf.json_format import MessageToDict

        from ecserve.v1 import generation_pb2 as pb

        try:
            info = await self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=timeout,
                                             metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            raise ServerUnreachable(f"cannot reach server at {self.address}: "
                                    f"{e.code().name} {e.details()}") from None
        limits = ModelLimits(
            info.vocab_size, info.max_model_len,
            info.bos_token_id if info.HasField("bos_token_id") else None,
            info.eos_token_id if info.HasField("eos_token_id") else None)
        return limits, MessageToDict(info, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)

    async def stream(self, spec: RequestSpec, cfg: LoadTestConfig, index: int
                     ) -> AsyncIterator[Chunk]:
        import grpc

        from ecserve.v1 import generation_pb2 as pb

        call = self.stub.GenerateStream(grpc_request(spec, cfg, index), timeout=cfg.timeout,
                                        metadata=self.metadata)
        try:
            async for msg in call:
                yield Chunk(msg.input_token_count, msg.generated_token_count,
                            pb.StopReason.Name(msg.stop_reason) if msg.stop_reason else "")
        except grpc.aio.AioRpcError as e:
            raise CallFailed(e.code().name, e.details() or "") from None
        finally:
            call.cancel()  # a no-op once it ended; frees the request when we stop early

    async def close(self) -> None:
        await self.channel.close()


# ---------------------------------------------------------------------- HTTP


class HttpTransport:
    def __init__(self, address: str, security: ClientSecurity) -> None:
        host, _, port = address.rpartition(":")
        self.address, self.host, self.port = address, host.strip("[]"), int(port)
        self.ssl: ssl.SSLContext | None = None
        if security.uses_tls:
            self.ssl = ssl.create_default_context(cadata=read_file(
                security.ca_file, "CA").decode() if security.ca_file else None)
            if security.cert_file and security.key_file:
                self.ssl.load_cert_chain(security.cert_file, security.key_file)
        self.server_name = security.server_name or (self.host if self.ssl else None)
        self.headers = [f"Host: {address}", "Content-Type: application/json",
                        "Accept: text/event-stream"]
        if security.api_key:
            self.headers.append(f"Authorization: Bearer {security.api_key}")
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self._idle:
            reader, writer = self._idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer
        return await asyncio.open_connection(self.host, self.port, ssl=self.ssl,
                                             server_hostname=self.server_name)

    async def _request(self, method: str, path: str, body: bytes = b""
                       ) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """Send a request; (status, reader, writer, chunked) once its headers are read."""
        reader, writer = await self._connect()
        head = "\r\n".join([f"{method} {path} HTTP/1.1", *self.headers,
                            f"Content-Length: {len(body)}", "", ""])
        writer.write(head.encode() + body)
        status_line = await reader.readline()
        if not status_line:
            writer.close()
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split()[1])
        chunked, length = False, None
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "transfer-encoding" and "chunked" in value:
                chunked = True
            elif name == "content-length":
                length = int(value)
        if not chunked:  # a whole body: read it here, so the caller sees one shape
            data = await reader.readexactly(length or 0)
            reader = _Replay(data)  # type: ignore[assignment]
        return status, reader, writer, chunked

    async def _get_json(self, path: str) -> tuple[int, Any]:
        status, reader, writer, chunked = await self._request("GET", path)
        data = await _read_all(reader, chunked)
        writer.close()
        return status, json.loads(data) if data else None

    async def model_info(self, timeout: float) -> tuple[ModelLimits, dict[str, Any]]:
        try:
            status, models = await asyncio.wait_for(self._get_json("/v1/models"), timeout)
        except (OSError, asyncio.TimeoutError, ValueError) as e:
            raise ServerUnreachable(f"cannot reach the HTTP API at {self.address}: {e} (it "
                                    "listens on the server's --http-port, 8000 by default)"
                                    ) from None
        if status != 200 or not models.get("data"):
            raise ServerUnreachable(f"GET /v1/models at {self.address}: HTTP {status} "
                                    f"{models}")
        card = models["data"][0]
        limits = ModelLimits(card["vocab_size"], card["max_model_len"],
                             card.get("bos_token_id"), card.get("eos_token_id"))
        return limits, card

    async def stream(self, spec: RequestSpec, cfg: LoadTestConfig, index: int
                     ) -> AsyncIterator[Chunk]:
        body = http_body(spec, cfg, index)
        deadline = None if cfg.timeout is None else time.monotonic() + cfg.timeout
        status, reader, writer, chunked = await self._request(
            "POST", "/v1/completions", json.dumps(body).encode())
        done = False
        try:
            if status != 200:
                data = await _read_all(reader, chunked)
                try:
                    detail = json.loads(data)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    detail = data.decode(errors="replace")[:300]
                done = True
                raise CallFailed(f"HTTP_{status}", detail)
            async for event in _events(reader, deadline):
                if event == b"[DONE]":  # the body's end follows: read to it, then reuse
                    done = True
                    continue
                msg = json.loads(event)
                if "error" in msg:
                    raise CallFailed("ERROR", msg["error"].get("message", ""))
                usage = msg.get("usage") or {}
                reason = msg["choices"][0].get("finish_reason") if msg["choices"] else None
                yield Chunk(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
                            reason or "")
        finally:
            if done and chunked:
                self._idle.append((reader, writer))
            else:  # stopped early: closing the connection cancels the request
                writer.close()

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


class _Replay:
    """A body already read, as a reader."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self, n: int = -1) -> bytes:
        data, self.data = self.data, b""
        return data


async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The pieces of a chunked body."""
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            await reader.readline()  # the empty trailer
            return
        data = await reader.readexactly(size)
        await reader.readline()
        yield data


async def _read_all(reader: Any, chunked: bool) -> bytes:
    if not chunked:
        return await reader.read()
    return b"".join([piece async for piece in _chunks(reader)])


async def _events(reader: asyncio.StreamReader, deadline: float | None
                  ) -> AsyncIterator[bytes]:
    """The data of each server-sent event of a chunked stream."""
    buffer = b""
    pieces = _chunks(reader)
    while True:
        try:
            piece = await (pieces.__anext__() if deadline is None else asyncio.wait_for(
                pieces.__anext__(), max(deadline - time.monotonic(), 0)))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise CallFailed("DEADLINE_EXCEEDED", "the request's --timeout passed") from None
        buffer += piece
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            if event.startswith(b"data: "):
                yield event[6:]
