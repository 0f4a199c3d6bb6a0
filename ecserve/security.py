"""TLS, mutual TLS and API keys, as clients use them (the server's side: server/auth.py), and
the options of every command that calls a server.

Light (grpc is imported when a channel is made), so the command line's parser can use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecserve.config.fields import flag
from ecserve.errors import ConfigError

API_KEY_ENV = "ECSERVE_API_KEY"
DEFAULT_ADDRESS = "127.0.0.1:50051"


class SecurityError(ConfigError):
    """A certificate, key or key file that cannot be used; the message names the file."""


def read_file(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SecurityError(f"{what} {path}: {e.strerror}") from None
    if not data.strip():
        raise SecurityError(f"{what} {path}: empty")
    return data


def read_api_keys(path: str) -> tuple[bytes, ...]:
    """One key per line (several: rotation without a restart of the clients); blank lines and
    lines starting with # are skipped."""
    lines = read_file(path, "API key file").decode().splitlines()
    keys = tuple(line.strip().encode() for line in lines
                 if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise SecurityError(f"API key file {path}: no key in it")
    return keys


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches a server: plaintext by default; TLS when `tls` or any file is
    given (the system's CA roots unless `ca_file`); an API key as bearer metadata."""

    tls: bool = False
    ca_file: str | None = None  # verify the server's certificate against this CA
    cert_file: str | None = None  # mutual TLS: this client's certificate chain
    key_file: str | None = None  # and its key
    server_name: str | None = None  # the name checked in the server's certificate
    api_key: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise SecurityError("a client certificate needs its key: give both "
                                "--tls-cert-file and --tls-key-file")

    @property
    def uses_tls(self) -> bool:
        return self.tls or any((self.ca_file, self.cert_file, self.server_name))

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    def _credentials(self) -> tuple[Any, list[tuple[str, str]]]:
        import grpc

        creds = grpc.ssl_channel_credentials(
            root_certificates=read_file(self.ca_file, "CA") if self.ca_file else None,
            private_key=read_file(self.key_file, "TLS key") if self.key_file else None,
            certificate_chain=read_file(self.cert_file, "TLS certificate") if self.cert_file
            else None)
        options = ([("grpc.ssl_target_name_override", self.server_name)]
                   if self.server_name else [])
        return creds, options

    def channel(self, address: str) -> Any:
        """A grpc.Channel."""
        import grpc

        if not self.uses_tls:
            return grpc.insecure_channel(address)
        creds, options = self._credentials()
        return grpc.secure_channel(address, creds, options)

    def aio_channel(self, address: str) -> Any:
        """A grpc.aio.Channel."""
        import grpc

        if not self.uses_tls:
            return grpc.aio.insecure_channel(address)
        creds, options = self._credentials()
        return grpc.aio.secure_channel(address, creds, options)


@dataclass(frozen=True)
class ClientOptions:
    """How a command (client, health, bench) reaches a server: its flags."""

    address: str = field(default=DEFAULT_ADDRESS, metadata=flag(metavar="HOST:PORT"))
    """The server's gRPC address."""
    tls: bool = False
    """Connect with TLS, checking the server against the system's CAs."""
    tls_ca_file: str | None = field(default=None, metadata=flag(metavar="PEM"))
    """Connect with TLS, checking the server against this CA."""
    tls_cert_file: str | None = field(default=None, metadata=flag(metavar="PEM"))
    """Mutual TLS: this client's certificate (with tls_key_file)."""
    tls_key_file: str | None = field(default=None, metadata=flag(metavar="PEM"))
    """Mutual TLS: this client's key."""
    tls_server_name: str | None = field(default=None, metadata=flag(metavar="NAME"))
    """The name the server's certificate must carry; default: the address's host."""
    api_key_file: str | None = field(default=None, metadata=flag(metavar="PATH"))
    """Send the first key in this file as a bearer token; default: $ECSERVE_API_KEY."""

    def security(self) -> ClientSecurity:
        key = (read_api_keys(self.api_key_file)[0].decode() if self.api_key_file
               else os.environ.get(API_KEY_ENV) or None)
        return ClientSecurity(self.tls, self.tls_ca_file, self.tls_cert_file, self.tls_key_file,
                              self.tls_server_name, key)
