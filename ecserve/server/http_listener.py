"""uvicorn, embedded: the HTTP API's listener on the server's own event loop.

The socket is bound here, before the model loads (a port in use fails the start with one line,
where uvicorn would exit the process), and uvicorn never sees the process's signals: SIGTERM
starts the server's drain, which finishes live HTTP streams as it does gRPC calls and only then
closes this listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Generator
from typing import Any

import uvicorn

log = logging.getLogger("ecserve.server")
CLOSE_TIMEOUT_S = 5.0  # after the drain, connections still open get this long, then are cut


class HttpListener:
    def __init__(self, app: Any, host: str, port: int, *, reuse_port: bool = False,
                 cert_file: str | None = None, key_file: str | None = None,
                 client_ca_file: str | None = None, what: str = "the HTTP API",
                 flag: str = "--http-port") -> None:
        host = host.strip("[]")
        try:
            self.sock = _bind(host, port, reuse_port)
        except OSError as e:
            raise OSError(f"cannot serve {what} on {host}:{port}: {e.strerror} (another "
                          f"server? {flag} chooses another, 0 any)") from None
        self.port = self.sock.getsockname()[1]
        self.scheme = "https" if cert_file else "http"
        config = uvicorn.Config(
            app, lifespan="off", access_log=False, log_config=None, server_header=False,
            http="httptools" if _has("httptools") else "h11",
            timeout_graceful_shutdown=int(CLOSE_TIMEOUT_S),
            ssl_certfile=cert_file, ssl_keyfile=key_file, ssl_ca_certs=client_ca_file,
            ssl_cert_reqs=ssl.CERT_REQUIRED if client_ca_file else ssl.CERT_NONE)
        # uvicorn says "Started server process" and the like at INFO; the server says its own.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        self._server = _QuietServer(config)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._server.serve(sockets=[self.sock]))

    async def stop(self) -> None:
        """Close the port and the idle connections; wait for open responses (the drain has
        ended them already) up to CLOSE_TIMEOUT_S."""
        if self._task is None:
            self.sock.close()
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), CLOSE_TIMEOUT_S + 2)
        except asyncio.TimeoutError:
            self._task.cancel()
        self.sock.close()


class _QuietServer(uvicorn.Server):
    """uvicorn's Server without its signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
