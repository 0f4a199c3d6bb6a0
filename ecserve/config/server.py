"""The gRPC server: where it listens, how it drains, what a request may ask, metrics, TLS."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from ecserve.config.fields import check_choice, check_choices, check_positive, flag
from ecserve.errors import ConfigError

ExpertMetrics = Literal["full", "aggregate", "off"]
EXPERT_METRICS: tuple[ExpertMetrics, ...] = typing.get_args(ExpertMetrics)
OPEN_SERVICES = ("health", "reflection")


def parse_services(text: str) -> tuple[str, ...]:
    """"health,reflection" -> ("health", "reflection"); "none" -> ()."""
    names = () if text == "none" else tuple(s.strip() for s in text.split(",") if s.strip())
    for name in names:
        check_choice("open_services", name, OPEN_SERVICES)
    return names


@dataclass(frozen=True)
class ServerConfig:
    """The server: where gRPC and the HTTP API listen, how it drains, and the limits on what a
    request asks."""

    host: str = "127.0.0.1"
    """Listen address; 0.0.0.0 (or [::]) takes outside connections (the container's)."""
    port: int = 50051
    """gRPC port; 0: any free port."""
    reuse_port: bool = False
    """Share the port with other processes on purpose (SO_REUSEPORT); without it a port in use
    is refused at start."""
    grace_period: float = field(default=30.0, metadata=flag(metavar="S"))
    """Seconds live requests get to finish after SIGTERM."""
    drain_delay: float = field(default=0.0, metadata=flag(metavar="S"))
    """Seconds after SIGTERM with health NOT_SERVING while new calls are still taken, so
    balancers stop sending before the port closes."""
    max_connection_age: float | None = field(default=None, metadata=flag(metavar="S"))
    """Send clients GOAWAY after a connection's S seconds, so they reconnect and spread over
    the replicas; default: never."""
    max_connection_age_grace: float | None = field(default=None, metadata=flag(metavar="S"))
    """After that GOAWAY, seconds calls on the old connection may still run; default: no limit
    (make it longer than the longest generation)."""
    max_request_bytes: int = field(default=1 << 20, metadata=flag(metavar="BYTES"))
    """Largest request message in bytes: larger ones get INVALID_ARGUMENT naming the field
    (4x larger: refused by gRPC itself), or HTTP 413."""
    http: bool = True
    """Serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, ...)
    beside gRPC, on the same engine."""
    http_port: int = 8000
    """Port of the OpenAI-compatible HTTP API (on host); 0: any free port."""
    chat_template: str | None = field(default=None, metadata=flag(metavar="FILE"))
    """Jinja chat template for /v1/chat/completions (a file, or a shipped one: plain);
    default: the model directory's, if it has one."""
    default_max_new_tokens: int = 16
    """max_new_tokens of a request that does not say (as OpenAI's and vLLM's APIs)."""
    max_stop_sequences: int = 8
    """Stop sequences per request."""
    max_stop_sequence_length: int = 256
    """Characters per stop sequence."""
    max_top_logprobs: int = 20
    """Alternatives per token a request may ask for."""
    warmup: bool = True
    """Run a short generation before reporting SERVING."""
    metrics: bool = True
    """Serve Prometheus metrics, /healthz and /readyz over HTTP."""
    metrics_host: str | None = None
    """Metrics bind address; default: host's."""
    metrics_port: int = 9400
    """Port of /metrics, /healthz and /readyz; 0: any free port."""
    expert_metrics: ExpertMetrics = "full"
    """Per-expert series: full (each expert) | aggregate (summed per MoE layer) | off."""
    tls_cert_file: str | None = field(default=None, metadata=flag(metavar="PEM"))
    """Serve gRPC and the HTTP API over TLS with this PEM certificate chain (with
    tls_key_file)."""
    tls_key_file: str | None = field(default=None, metadata=flag(metavar="PEM"))
    """The TLS certificate's PEM private key."""
    tls_client_ca_file: str | None = field(default=None, metadata=flag(metavar="PEM"))
    """Mutual TLS: refuse clients without a certificate signed by this CA."""
    api_key_file: str | None = field(default=None, metadata=flag(metavar="PATH"))
    """Require 'authorization: Bearer <key>' (gRPC metadata, HTTP header) with one of this
    file's keys (one per line); others get UNAUTHENTICATED (HTTP 401). The HTTP API's /health,
    /version and /metrics need none."""
    open_services: tuple[str, ...] = field(default=("health",), metadata=flag(
        metavar="LIST", parse=parse_services, default_text="health"))
    """With api_key_file, the services that need no key: health, reflection, both
    (health,reflection) or none."""

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("TLS needs a certificate and its key: give both tls_cert_file "
                              "and tls_key_file", field="tls_key_file")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ConfigError("tls_client_ca_file (mutual TLS) needs TLS: give tls_cert_file "
                              "and tls_key_file too", field="tls_client_ca_file")
        for name in self.open_services:
            check_choice("open_services", name, OPEN_SERVICES)
        for name in ("port", "metrics_port", "http_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ConfigError(f"{name} must be in [0, 65535], got {getattr(self, name)}",
                                  field=name)
        check_choices(self)
        for name in ("grace_period", "drain_delay"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0 seconds, got {getattr(self, name)}",
                                  field=name)
        for name in ("max_connection_age", "max_connection_age_grace"):
            if (v := getattr(self, name)) is not None and not v > 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {v}", field=name)
        if self.max_connection_age_grace is not None and self.max_connection_age is None:
            raise ConfigError("max_connection_age_grace needs max_connection_age",
                              field="max_connection_age_grace")
        for name in ("max_request_bytes", "default_max_new_tokens", "max_stop_sequences",
                     "max_stop_sequence_length"):
            check_positive(name, getattr(self, name))
        if self.max_top_logprobs < 0:
            raise ConfigError(f"max_top_logprobs must be >= 0, got {self.max_top_logprobs}",
                              field="max_top_logprobs")
