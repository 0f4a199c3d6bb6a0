"""The server process: gRPC with health and reflection, model start-up, and the drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ecserve.config import ServerConfig
from ecserve.engine.core import CoreSpec, EngineLoader
from ecserve.engine.engine import Engine
from ecserve.metrics import Metrics
from ecserve.security import read_api_keys
from ecserve.server.auth import ApiKeyInterceptor, server_credentials
from ecserve.server.chat_template import ChatTemplate, load_chat_template, read_option
from ecserve.server.core_process import ProcessTransport
from ecserve.server.core_transport import CoreTransport, ThreadTransport
from ecserve.server.front_end import FrontEnd
from ecserve.server.http import HttpEndpoints
from ecserve.server.http_listener import HttpListener
from ecserve.server.openai_app import OpenAIApp
from ecserve.server.servicer import SERVICE, GenerationServicer
from ecserve.types import Request, SamplingParams

log = logging.getLogger("ecserve.server")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Server:
    """One server over one engine: gRPC and the OpenAI-compatible HTTP API on one front end.
    `start` binds at once and reports NOT_SERVING while the model loads and warms up; `drain`
    is the SIGTERM path."""

    def __init__(self, core: CoreTransport | Engine | Callable[[], Engine],
                 cfg: ServerConfig) -> None:
        """core: the transport to the engine core (ProcessTransport: its own process, as
        `ecserve serve` runs it), or an engine (or its loader) whose core loop then runs on a
        thread of this process. Construct inside the running event loop (grpc.aio binds the
        server to it)."""
        self.cfg = cfg
        transport = core if isinstance(core, (ProcessTransport, ThreadTransport)) else (
            ThreadTransport(core))
        # The one front end both protocols sit on; `engine` once it has started.
        self._front = FrontEnd(transport)
        self.servicer = GenerationServicer(cfg)
        self.engine: FrontEnd | None = None
        # Set when the engine can run no further step (a lost expert-parallel rank): the
        # server then drains what it can and exits 1, for the orchestrator to restart it.
        self.failed = asyncio.Event()
        self.stop_now = asyncio.Event()  # ends a drain's grace period early (a second signal)
        self.metrics: Metrics | None = None
        self._http: HttpEndpoints | None = None
        self._draining = False  # from the first moment of a drain (its delay included)
        self.port = self.metrics_port = 0
        self.health = health.aio.HealthServicer()
        interceptors = []
        keys = read_api_keys(cfg.api_key_file) if cfg.api_key_file is not None else ()
        if keys:
            interceptors.append(ApiKeyInterceptor(keys, cfg.open_services, self._refused_key))
        # The OpenAI-compatible API, on its own port of this process and event loop.
        self.openai = OpenAIApp(cfg, self._ready, keys)
        self._template_option = (read_option(cfg.chat_template) if cfg.chat_template is not None
                                 else None)
        self._api: HttpListener | None = None
        self.http_port = 0
        self._credentials = (server_credentials(cfg.tls_cert_file, cfg.tls_key_file,
                                                cfg.tls_client_ca_file)
                             if cfg.tls_cert_file and cfg.tls_key_file else None)
        # Past max_request_bytes the servicer answers INVALID_ARGUMENT naming the field; far
        # past it gRPC refuses the message itself (RESOURCE_EXHAUSTED) before it is buffered.
        # gRPC sets SO_REUSEPORT by default: a second server would then bind the same port
        # silently and take half the connections. Off unless asked for.
        options = [("grpc.max_receive_message_length", 4 * cfg.max_request_bytes),
                   ("grpc.so_reuseport", int(cfg.reuse_port))]
        if cfg.max_connection_age is not None:
            # GOAWAY after this long, so clients reconnect and long-lived HTTP/2 connections
            # spread again over the replicas a balancer has now.
            options.append(("grpc.max_connection_age_ms", int(cfg.max_connection_age * 1000)))
            if cfg.max_connection_age_grace is not None:
                options.append(("grpc.max_connection_age_grace_ms",
                                int(cfg.max_connection_age_grace * 1000)))
        self.grpc = grpc.aio.server(interceptors=interceptors, options=options)
        self.grpc.add_generic_rpc_handlers([self.servicer.handler()])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            [SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc,
            pool=_MethodAwarePool(descriptor_pool.Default()))

    async def start(self) -> int:
        """Listen, load the model, warm it up, then report SERVING. Returns the bound port."""
        await self._set_health(NOT_SERVING)
        address = f"{self.cfg.host}:{self.cfg.port}"
        refused = (f"cannot listen on {address}: the address is in use or not this machine's "
                   "(another server? --port chooses another; --reuse-port shares one on "
                   "purpose)")
        if not self.cfg.reuse_port:
            # Found before gRPC binds: its failure also logs a line of its own to stderr.
            try:
                _probe(self.cfg.host, self.cfg.port)
            except OSError as e:
                raise OSError(f"{refused} ({e.strerror})") from None
        try:
            self.port = (self.grpc.add_insecure_port(address) if self._credentials is None
                         else self.grpc.add_secure_port(address, self._credentials))
        except RuntimeError as e:
            raise OSError(f"{refused} ({e})") from None
        if self.cfg.metrics:
            self._start_http()
        if self.cfg.http:
            self._start_api()
        await self.grpc.start()
        log.info("health NOT_SERVING on %s:%d while the model loads", self.cfg.host, self.port)
        live = await self._start_engine()
        live.on_lost = self._engine_lost
        template = self._chat_template(live)
        if self.cfg.warmup:
            await self._warmup(live)
        self._start_metrics(live)
        self.servicer.engine = live
        self.openai.attach(live, template)
        await self._set_health(SERVING)
        log.info("serving model %s on %s:%d (gRPC)%s", live.info.model_name, self.cfg.host,
                 self.port, "" if self._api is None else
                 f" and {self._api.scheme}://{self.cfg.host}:{self.http_port} (HTTP API)")
        return self.port

    def _start_api(self) -> None:
        """The OpenAI-compatible API's port, bound now: /health answers 503 while loading."""
        cfg = self.cfg
        self._api = HttpListener(self.openai, cfg.host, cfg.http_port, reuse_port=cfg.reuse_port,
                                 cert_file=cfg.tls_cert_file, key_file=cfg.tls_key_file,
                                 client_ca_file=cfg.tls_client_ca_file)
        self._api.start()
        self.http_port = self._api.port

    def _chat_template(self, live: FrontEnd) -> ChatTemplate | None:
        info = live.info
        tokenizer = info.tokenizer

        def special(token_id: int | None) -> str:
            text = getattr(tokenizer, "token_text", None)
            return text(token_id) if text is not None and token_id is not None else ""

        template = load_chat_template(self._template_option, info.model_dir,
                                      special(info.model_cfg.bos_token_id),
                                      special(info.model_cfg.eos_token_id))
        if template is not None:
            log.info("chat template: %s", template.origin)
        return template

    async def _start_engine(self) -> FrontEnd:
        self.engine = self._front
        await self._front.start()
        return self._front

    def _start_metrics(self, live: FrontEnd) -> None:
        """After the warm-up, so its generation is not counted."""
        if not self.cfg.metrics:
            return
        info = live.info
        exchange = live.expert_traffic if live.expert_traffic() is not None else None
        self.metrics = Metrics(info.model_cfg, info.device, self.cfg.expert_metrics,
                               info.held_experts, exchange, core_pid=live.core_pid,
                               kv_blocks=info.kv_blocks)
        live.observer = self.servicer.metrics = self.openai.metrics = self.metrics

    def _start_http(self) -> None:
        """/metrics, /healthz, /readyz: bound now, so probes answer while the model loads."""
        host = self.cfg.metrics_host or self.cfg.host
        try:
            self._http = HttpEndpoints(host, self.cfg.metrics_port, self._ready, self._alive,
                                       self._scrape)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {host}:{self.cfg.metrics_port}: "
                          f"{e.strerror} (another server? --metrics-port chooses another, "
                          "0 any)") from None
        self.metrics_port = self._http.port
        log.info("metrics on http://%s:%d/metrics (and /healthz, /readyz)", host,
                 self.metrics_port)

    def _ready(self) -> tuple[bool, str]:
        """For /readyz (called on the HTTP thread): takes new work now?"""
        live = self.servicer.engine
        if live is not None and live.lost is not None:
            return False, f"the engine stopped: {live.lost}"
        if self._draining:
            return False, "draining"
        if live is None:
            return False, "loading the model"
        return True, "ready"

    def _alive(self) -> tuple[bool, str]:
        """For /healthz: false only once the engine can run no further step."""
        live = self.engine
        if live is not None and live.lost is not None:
            return False, f"the engine stopped: {live.lost}"
        return True, "alive"

    def _scrape(self, accept: str) -> tuple[bytes, str] | None:
        return None if self.metrics is None else self.metrics.render(accept)

    async def _warmup(self, live: FrontEnd) -> None:
        """One short generation, so the first client does not pay for lazy initialisation."""
        prompt = tuple(live.info.encode("warm up"))
        queue = live.submit(Request("warmup", prompt, SamplingParams(max_new_tokens=4, seed=0)))
        while not (item := await queue.get()).finished:
            pass
        log.info("warm-up generation done (%s)", item.finish_reason)

    def _refused_key(self) -> None:
        if self.metrics is not None:
            self.metrics.reject("UNAUTHENTICATED", "grpc")

    def _engine_lost(self, reason: str) -> None:
        log.critical("the engine can run no further step (%s); stopping with exit code 1",
                     reason)
        self.failed.set()

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE):  # "" is the whole server, as load balancers probe it
            await self.health.set(name, status)

    async def close(self) -> None:
        """After a failed start: stop whatever had started, at once (nothing was served)."""
        await self.grpc.stop(None)
        if self._api is not None:
            await self._api.stop()
        if self.engine is not None:
            await self.engine.stop()
        if self._http is not None:
            self._http.close()

    async def drain(self, grace: float) -> None:
        """Report NOT_SERVING, keep taking requests for the drain delay (balancers notice
        meanwhile), then refuse new ones, let live ones finish for up to `grace` seconds, and
        stop."""
        self._draining = True
        await self.health.enter_graceful_shutdown()  # every service NOT_SERVING from now on
        delay = self.cfg.drain_delay
        if delay > 0 and not self.failed.is_set() and not self.stop_now.is_set():
            log.info("NOT_SERVING; still taking requests for the drain delay (%.1f s)", delay)
            with contextlib.suppress(asyncio.TimeoutError):  # a second signal ends it early
                await asyncio.wait_for(self.stop_now.wait(), delay)
        self.servicer.draining = self.openai.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        live = self.engine
        if live is not None:
            log.info("draining %d live requests (grace %.1f s)", live.num_live, grace)
            while live.num_live and loop.time() < deadline and not self.stop_now.is_set():
                await asyncio.sleep(0.02)
            if live.num_live:
                log.warning("%s: cancelling %d requests",
                            "stopping now" if self.stop_now.is_set() else "grace period over",
                            live.num_live)
                live.cancel_all()
        # Handlers that already hold their last event get a moment to send it.
        await self.grpc.stop(grace=1.0)
        if self._api is not None:
            await self._api.stop()
        if live is not None:
            await live.stop()
        if self._http is not None:  # last, so a final scrape sees the drain
            self._http.close()
        log.info("drained; stopped")


class _MethodAwarePool:
    """The descriptor pool as reflection sees it, also finding the file of a service method
    (python protobuf finds only services), so `grpcurl describe pkg.Service.Method` works."""

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, name: str) -> Any:  # protobuf's name
        try:
            return self._pool.FindFileContainingSymbol(name)
        except KeyError:
            service, _, method = name.rpartition(".")
            if method not in self._pool.FindServiceByName(service).methods_by_name:
                raise
            return self._pool.FindFileContainingSymbol(service)


def serve_model(load: EngineLoader, model: str | None, cfg: ServerConfig,
                core: CoreSpec | None) -> int:
    """`ecserve serve`: the engine that `load` builds, in an engine-core process run as
    `core` says, or on a thread of this process when `core` is None; then serve until a
    signal or the engine's loss (the exit code)."""
    if core is not None:
        return serve(ProcessTransport(load, core, model), cfg)
    closers: list[Callable[[], None]] = []

    def load_here() -> Engine:
        engine, close = load()
        if close is not None:
            closers.append(close)
        return engine

    try:
        return serve(load_here, cfg)
    finally:
        for close in closers:  # after the drain: the engine thread has stopped
            close()


def _probe(host: str, port: int) -> None:
    """OSError if a listener holds host:port. SO_REUSEADDR, as gRPC's own sockets, so a port
    whose last connections are in TIME_WAIT (a restart) still counts as free."""
    if port == 0:
        return
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror:
        return  # gRPC reports a name it cannot resolve
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(addr)


def serve(engine: CoreTransport | Callable[[], Engine], cfg: ServerConfig) -> int:
    """Run a server until SIGTERM or SIGINT (exit code 0) or until its engine is lost (1),
    then drain it; returns the exit code."""

    async def main() -> None:
        nonlocal code
        server = Server(engine, cfg)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():  # a second Ctrl-C (or SIGTERM) during the drain: stop now
                log.warning("second signal: ending the drain now")
                server.stop_now.set()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        starting = asyncio.ensure_future(server.start())
        stopped = asyncio.ensure_future(stop.wait())
        failed = asyncio.ensure_future(server.failed.wait())
        await asyncio.wait([starting, stopped, failed], return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            if (error := starting.exception()) is not None:
                # A failed start (port in use, bad model): close what started, then let the
                # caller print one line (`ecserve serve` exits 2). Health never said SERVING.
                stopped.cancel()
                failed.cancel()
                await server.close()
                raise error
            await asyncio.wait([stopped, failed], return_when=asyncio.FIRST_COMPLETED)
        else:
            starting.cancel()
        code = 1 if server.failed.is_set() else 0
        await server.drain(cfg.grace_period)
        stopped.cancel()
        failed.cancel()

    code = 0
    _run(main())
    return code


def _run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # Windows has no uvloop
        asyncio.run(main)
    else:
        uvloop.run(main)
