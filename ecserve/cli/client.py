"""Stream a generation from a running server to the terminal (gRPC; no torch needed). The
statistics line goes to standard error."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ecserve.cli.flags import add_flags, from_flags
from ecserve.cli.generation import (
    PROMPT_HELP,
    add_generation_flags,
    read_prompt,
    routing_scope,
    sampling_params,
)
from ecserve.config.fields import flag
from ecserve.security import ClientOptions
from ecserve.wording import counted

if TYPE_CHECKING:
    from ecserve.client import Client

HELP = "stream a generation from a server to the terminal"


@dataclass(frozen=True)
class CallOptions:
    timeout: float | None = field(default=None, metadata=flag(metavar="S"))
    """The call's deadline in seconds; default: none."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help=PROMPT_HELP)
    add_flags(p, ClientOptions)
    add_flags(p, CallOptions)
    add_generation_flags(p)


def run(args: argparse.Namespace) -> int:
    prompt = read_prompt(args.prompt)
    params = sampling_params(args)
    opts = from_flags(ClientOptions, args)
    from ecserve.client import Client
    from ecserve.v1 import generation_pb2 as pb

    last = None
    with Client(opts.address, timeout=from_flags(CallOptions, args).timeout,
                security=opts.security()) as client, _cancel_on_ctrl_c(client):
        for last in client.stream(
                prompt, max_new_tokens=params.max_new_tokens, min_new_tokens=params.min_new_tokens,
                temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                seed=params.seed, presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty,
                repetition_penalty=params.repetition_penalty,
                stop_sequences=params.stop_sequences,
                routing_scope=routing_scope(args)):
            sys.stdout.write(last.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    if last is not None:
        print(f"[{counted(last.generated_token_count, 'token')}, stop: "
              f"{pb.StopReason.Name(last.stop_reason)}, seed: {last.seed}]", file=sys.stderr)
    return 0


@contextmanager
def _cancel_on_ctrl_c(client: Client) -> Iterator[None]:
    """Ctrl-C closes the channel (cancelling the stream) instead of raising inside grpc's
    locks, where a KeyboardInterrupt can surface as `RuntimeError: cannot release un-acquired
    lock`. The close runs on its own thread: the handler may run while this thread holds the
    lock the close needs."""
    import grpc

    interrupted = threading.Event()

    def on_sigint(signum: int, frame: object) -> None:
        interrupted.set()
        threading.Thread(target=client.channel.close, daemon=True).start()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    except grpc.RpcError:
        if interrupted.is_set():
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
