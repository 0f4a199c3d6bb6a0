"""Ask a server's gRPC health service whether it is SERVING: exit 0 if so, else 1 (a
container's HEALTHCHECK). Light: no torch."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from ecserve.cli.flags import add_flags, from_flags
from ecserve.config.fields import flag
from ecserve.security import ClientOptions

HELP = "exit 0 if the server reports SERVING, else 1"


@dataclass(frozen=True)
class HealthOptions:
    service: str = field(default="", metadata=flag(default_text='""'))
    """The service to ask about: "" (the whole server) or ecserve.v1.GenerationService."""
    timeout: float = field(default=5.0, metadata=flag(metavar="S"))
    """Seconds to wait for the answer."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, ClientOptions)
    add_flags(p, HealthOptions)


def run(args: argparse.Namespace) -> int:
    from ecserve.client import Client

    opts, ask = from_flags(ClientOptions, args), from_flags(HealthOptions, args)
    with Client(opts.address, timeout=ask.timeout, security=opts.security()) as client:
        status = client.health(ask.service)
    print(status)
    return 0 if status == "SERVING" else 1
