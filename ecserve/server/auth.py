"""The server's side of TLS, mutual TLS and API keys.

`--tls-cert-file/--tls-key-file` serve TLS; `--tls-client-ca-file` also requires a client
certificate signed by that CA (mutual TLS; others fail the handshake); `--api-key-file`
requires `authorization: Bearer <key>` metadata on every call but those of the services left
open (`--open-services`, default: health, so load balancers and Kubernetes probes need no
key), answering UNAUTHENTICATED otherwise. Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from ecserve.security import read_file

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/",
                       "/grpc.reflection.v1.ServerReflection/")


def server_credentials(cert_file: str, key_file: str, client_ca_file: str | None
                       ) -> grpc.ServerCredentials:
    """TLS with this certificate chain and key; with a client CA, mutual TLS."""
    cert, key = read_file(cert_file, "TLS certificate"), read_file(key_file, "TLS key")
    ca = read_file(client_ca_file, "client CA") if client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)


def bearer_allowed(header: bytes | None, keys: Sequence[bytes]) -> bool:
    """Whether an `authorization` value is `Bearer <one of keys>` (gRPC metadata or HTTP)."""
    if header is None:
        return False
    scheme, _, key = header.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    # Every key compared, match or not: the time taken says nothing about which matched.
    return sum(hmac.compare_digest(key.strip(), k) for k in keys) > 0


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid `authorization: Bearer <key>` (UNAUTHENTICATED)."""

    def __init__(self, keys: Sequence[bytes], open_services: Sequence[str],
                 on_refused: Callable[[], None] | None = None) -> None:
        self.keys = tuple(keys)
        self.open = tuple(p for name in open_services for p in (
            (HEALTH_PREFIX,) if name == "health" else REFLECTION_PREFIXES))
        self.on_refused = on_refused

    def allowed(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        given = next((v for k, v in metadata or () if k == "authorization"), None)
        return bearer_allowed(given.encode() if isinstance(given, str) else given, self.keys)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if details.method.startswith(self.open) or handler is None:
            return handler
        if self.allowed(details.invocation_metadata):
            return handler
        if self.on_refused is not None:
            self.on_refused()
        return _refusal(handler)


def _refusal(handler: Any) -> Any:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED."""
    message = ("missing or invalid API key: send the metadata 'authorization: Bearer <key>' "
               "(ecserve client --api-key-file)")

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raises

    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream, des, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, des, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream, des, ser)
    return grpc.unary_unary_rpc_method_handler(unary, des, ser)


