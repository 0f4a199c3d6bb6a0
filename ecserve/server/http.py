"""The server's HTTP port: Prometheus' /metrics, and /healthz and /readyz for balancers and
orchestrators that do not speak gRPC health checks.

Bound with the gRPC port, before the model loads: /healthz answers 200 while the process can
serve at all (503 once the engine is lost: restart it); /readyz answers 200 only while the
server takes new work (503 while the model loads, while draining, and once the engine is
lost), with the reason in the body. /metrics answers 503 until the model has loaded.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("ecserve.server")

# (HTTP status, body, content type) for a path's GET
Page = tuple[int, bytes, str]
TEXT = "text/plain; charset=utf-8"


class HttpEndpoints:
    """The HTTP server on its own thread. `ready` and `alive` return (ok, why); `metrics`
    returns the exposition for an Accept header, or None before the model has loaded."""

    def __init__(self, host: str, port: int, ready: Callable[[], tuple[bool, str]],
                 alive: Callable[[], tuple[bool, str]],
                 metrics: Callable[[str], tuple[bytes, str] | None]) -> None:
        pages: dict[str, Callable[[str], Page]] = {
            "/healthz": lambda _: _status(*alive()),
            "/readyz": lambda _: _status(*ready()),
            "/metrics": lambda accept: _metrics(metrics(accept)),
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                page = pages.get(self.path.split("?", 1)[0])
                code, body, kind = (page(self.headers.get("Accept", "")) if page is not None
                                    else (404, b"not found: /metrics, /healthz, /readyz\n", TEXT))
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # probes every few seconds: not worth a log line each

        server_cls = _Server6 if ":" in host else ThreadingHTTPServer
        self.server = server_cls((host.strip("[]"), port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        name="ecserve-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _status(ok: bool, why: str) -> Page:
    return (200 if ok else 503), (why + "\n").encode(), TEXT


def _metrics(rendered: tuple[bytes, str] | None) -> Page:
    if rendered is None:
        return 503, b"the model is still loading\n", TEXT
    return 200, *rendered
