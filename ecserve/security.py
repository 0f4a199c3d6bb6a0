"""TLS, mutual TLS and API keys, as clients use them (the server's side: server/auth.py).

Light (grpc is imported when a channel is made), so every command's flags can come from here.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

API_KEY_ENV = "ECSERVE_API_KEY"


class SecurityError(ValueError):
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


def add_client_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of every command that calls a server."""
    p.add_argument("--tls", action="store_true",
                   help="connect with TLS, checking the server against the system's CAs")
    p.add_argument("--tls-ca-file", metavar="PEM", help="TLS, checking the server against this CA")
    p.add_argument("--tls-cert-file", metavar="PEM",
                   help="mutual TLS: this client's certificate (with --tls-key-file)")
    p.add_argument("--tls-key-file", metavar="PEM", help="mutual TLS: this client's key")
    p.add_argument("--tls-server-name", metavar="NAME",
                   help="the name the server's certificate must carry (default: the host)")
    p.add_argument("--api-key-file", metavar="PATH",
                   help=f"send the key in this file as a bearer token (default: ${API_KEY_ENV})")


def client_security(args: argparse.Namespace) -> ClientSecurity:
    key = (read_api_keys(args.api_key_file)[0].decode() if args.api_key_file
           else os.environ.get(API_KEY_ENV) or None)
    return ClientSecurity(args.tls, args.tls_ca_file, args.tls_cert_file, args.tls_key_file,
                          args.tls_server_name, key)
